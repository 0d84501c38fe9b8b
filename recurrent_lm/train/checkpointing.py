"""Training checkpoints with orbax's `CheckpointManager`.

A training directory holds ``recurrent_lm_train.json`` (the marker that says
the directory is ours) and one orbax step directory per checkpoint with three
items: ``state`` (parameters, optimizer state, step, RNG key data; restored
straight into the target shardings), ``data`` (the data iterator's position)
and ``run`` (the settings that determine the trajectory: architecture, model
config, data and tokenizer fingerprints, optimiser...). orbax writes each step
to a temporary directory and renames it when complete, so a process killed
mid-save leaves no half checkpoint behind; a checkpoint damaged later
(truncated files) fails to restore, is moved aside with a warning, and the
previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax

logger = logging.getLogger(__name__)

MARKER = "recurrent_lm_train.json"
MARKER_FORMAT = "recurrent_lm.train"


class CheckpointDirError(ValueError):
    """The checkpoint directory cannot be used as asked (nothing was written)."""


class RunMismatchError(ValueError):
    """A resume whose settings differ from the checkpoint's; lists each difference."""


class CorruptCheckpointWarning(UserWarning):
    pass


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        lines = []
        for key in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                lines.append(f"{name}: not in the checkpoint, now {current[key]!r}")
            elif key not in current:
                lines.append(f"{name}: checkpoint {saved[key]!r}, now absent")
            else:
                lines += differences(saved[key], current[key], name)
        return lines
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return (
        [] if saved == current else [f"{prefix}: checkpoint {saved!r}, now {current!r}"]
    )


def _is_empty(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def _step_dirs(path: str) -> list[int]:
    return (
        sorted(int(n) for n in os.listdir(path) if n.isdigit())
        if os.path.isdir(path)
        else []
    )


def check_directory(path: str, *, resume: bool) -> None:
    """Refuses directories that are not ours, and starting over an existing run."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointDirError(f"checkpoint dir {path} is a file, not a directory.")
    marker = os.path.join(path, MARKER)
    if not _is_empty(path):
        if not os.path.isfile(marker):
            raise CheckpointDirError(
                f"checkpoint dir {path} is not empty and has no {MARKER}: it is not a"
                " recurrent_lm training directory. Choose a new or empty directory;"
                " nothing was written."
            )
        with open(marker) as f:
            try:
                content = json.load(f)
            except json.JSONDecodeError:
                content = {}
        if content.get("format") != MARKER_FORMAT:
            raise CheckpointDirError(f"{marker} is not a recurrent_lm training marker.")
    if resume:
        if not _step_dirs(path):
            raise CheckpointDirError(
                f"--resume: no checkpoint in {path} to resume from; drop --resume to start."
            )
    elif _step_dirs(path):
        raise CheckpointDirError(
            f"checkpoint dir {path} already holds checkpoints (steps {_step_dirs(path)});"
            " pass --resume to continue that run, or choose a new directory."
        )


def claim_directory(path: str) -> None:
    """Creates `path` with our marker (process 0), before anything is written in it,
    so that a run that fails after writing (e.g. its tokenizer) can be started again."""
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        marker = os.path.join(path, MARKER)
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                json.dump({"format": MARKER_FORMAT, "version": 1}, f)


class Checkpointer:
    """Saves and restores training state in one directory (see module doc)."""

    def __init__(self, path: str, *, keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.path = os.path.abspath(path)
        claim_directory(self.path)
        self._ocp = ocp
        self._manager = self._new_manager(keep, async_save)
        self._keep, self._async = keep, async_save

    def _new_manager(self, keep, async_save):
        ocp = self._ocp
        return ocp.CheckpointManager(
            self.path,
            item_names=("state", "data", "run"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def save(self, step: int, state, data_state: dict, run: dict) -> None:
        args = self._ocp.args
        self._manager.save(
            step,
            args=args.Composite(
                state=args.StandardSave(state),
                data=args.JsonSave(data_state),
                run=args.JsonSave(run),
            ),
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore_latest(self, abstract_state, run: dict):
        """(step, state, data_state) of the newest intact checkpoint.

        Raises:
          RunMismatchError: the checkpoint's run settings differ from `run`.
          CheckpointDirError: no intact checkpoint is left.
        """
        args = self._ocp.args
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                saved_run = self._manager.restore(
                    step, args=args.Composite(run=args.JsonRestore())
                )["run"]
            except Exception as e:  # noqa: BLE001 - any failure means unreadable
                self._quarantine(step, e)
                continue
            diff = differences(saved_run, run)
            if diff:
                raise RunMismatchError(
                    f"cannot resume from {self.path} (step {step}): the run settings differ"
                    " from the checkpoint's:\n  "
                    + "\n  ".join(diff)
                    + "\nUse the checkpoint's settings, or start a new run in a new directory."
                )
            try:
                restored = self._manager.restore(
                    step,
                    args=args.Composite(
                        state=args.StandardRestore(abstract_state),
                        data=args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001
                self._quarantine(step, e)
                continue
            return step, restored["state"], restored["data"]
        raise CheckpointDirError(
            f"no intact checkpoint left in {self.path} to resume from."
        )

    def _quarantine(self, step: int, error: Exception) -> None:
        """Moves a damaged step aside (kept for inspection) and warns."""
        self._manager.wait_until_finished()
        target = os.path.join(self.path, f"corrupt-{step}")
        message = (
            f"checkpoint step {step} in {self.path} is damaged and cannot be restored"
            f" ({type(error).__name__}: {str(error).splitlines()[0][:200]}); moved it to"
            f" {target} and falling back to the previous checkpoint."
        )
        warnings.warn(message, CorruptCheckpointWarning, stacklevel=3)
        logger.warning(message)
        if jax.process_index() == 0:
            os.replace(os.path.join(self.path, str(step)), target)
        self._manager.close()
        self._manager = self._new_manager(self._keep, self._async)
