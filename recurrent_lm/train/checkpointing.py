"""Training checkpoints with orbax's `CheckpointManager`.

A training directory holds ``recurrent_lm_train.json`` (the marker that says
the directory is ours) and one orbax step directory per checkpoint with three
items: ``state`` (parameters, optimizer state, step, RNG key data; restored
straight into the target shardings), ``data`` (the data iterator's position)
and ``run`` (the settings that determine the trajectory: architecture, model
config, data and tokenizer fingerprints, optimiser...). orbax writes each step
to a temporary directory and renames it when complete, so a process killed
mid-save leaves no half checkpoint behind. Once orbax has committed a step
(in the background when saves are asynchronous), ``recurrent_lm_checksums.json``
records the size and CRC32C of each of its files (`recurrent_lm.integrity`).
A resume checks them first: a checkpoint whose files changed (a flipped block,
a truncation), or that has no manifest (the process stopped between commit and
manifest), is moved aside to ``corrupt-STEP`` with a `CorruptCheckpointWarning`
naming the problem, and the previous one is used; with none intact left, the
resume fails with one error.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax

from recurrent_lm import integrity

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
        self._keep, self._async = keep, async_save
        self._manager = self._new_manager()
        self._manifest_writer = ThreadPoolExecutor(1, "checkpoint-manifest")
        self._pending: Future | None = None

    def _new_manager(self):
        ocp = self._ocp
        # No max_to_keep: orbax would delete the oldest checkpoint as soon as the
        # newest is committed, before its manifest is written; `_prune` deletes
        # only once the newer ones are complete.
        return ocp.CheckpointManager(
            self.path,
            item_names=("state", "data", "run"),
            options=ocp.CheckpointManagerOptions(
                create=True, enable_async_checkpointing=self._async
            ),
        )

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.path, str(step))

    def save(self, step: int, state, data_state: dict, run: dict) -> None:
        """Starts saving `step`; its manifest is written once orbax has committed it."""
        self._finish_pending()
        args = self._ocp.args
        saved = self._manager.save(
            step,
            args=args.Composite(
                state=args.StandardSave(state),
                data=args.JsonSave(data_state),
                run=args.JsonSave(run),
            ),
        )
        if saved:
            self._pending = self._manifest_writer.submit(self._write_manifest, step)

    def _write_manifest(self, step: int) -> None:
        """Waits until orbax has committed `step`, then records its checksums."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            integrity.write_manifest(self._step_dir(step))

    def _finish_pending(self) -> None:
        """Waits for the last save and its manifest (raising their error), then prunes."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
            self._prune()

    def _prune(self) -> None:
        """Deletes all but the newest `keep` checkpoints (the newest is complete now;
        only called after a save of ours, so a refused resume deletes nothing)."""
        for step in sorted(self._manager.all_steps())[: -self._keep]:
            self._manager.delete(step)

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self._manifest_writer.shutdown()
            self._manager.close()

    def restore_latest(self, abstract_state, run: dict):
        """(step, state, data_state) of the newest intact checkpoint.

        Raises:
          RunMismatchError: the checkpoint's run settings differ from `run`.
          CheckpointDirError: no intact checkpoint is left.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._restore_step(step, abstract_state, run)
            except RunMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means unusable
                self._quarantine(step, e)
                continue
            return step, restored["state"], restored["data"]
        raise CheckpointDirError(
            f"no intact checkpoint left in {self.path} to resume from (each was corrupt or"
            " incomplete and was moved aside to corrupt-STEP); start again without"
            " --resume, or copy an intact checkpoint back into it."
        )

    def _restore_step(self, step: int, abstract_state, run: dict) -> dict:
        """{"state", "data"} of `step`, after checking its files and run settings."""
        # A step without a manifest was committed by orbax but the process stopped
        # before the manifest was written: nothing vouches for its files, so it is
        # treated as incomplete and the previous checkpoint (which has one) is used.
        integrity.verify(self._step_dir(step))
        args = self._ocp.args
        saved_run = self._manager.restore(
            step, args=args.Composite(run=args.JsonRestore())
        )["run"]
        diff = differences(saved_run, run)
        if diff:
            raise RunMismatchError(
                f"cannot resume from {self.path} (step {step}): the run settings differ"
                " from the checkpoint's:\n  "
                + "\n  ".join(diff)
                + "\nUse the checkpoint's settings, or start a new run in a new directory."
            )
        return self._manager.restore(
            step,
            args=args.Composite(
                state=args.StandardRestore(abstract_state), data=args.JsonRestore()
            ),
        )

    def _quarantine(self, step: int, error: Exception) -> None:
        """Moves a corrupt or incomplete step aside (kept for inspection) and warns."""
        self._manager.wait_until_finished()
        target = self._aside_path(step)
        if isinstance(error, integrity.CorruptCheckpointError):
            reason = str(error).rstrip(".")  # names the file
        else:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        message = (
            f"checkpoint step {step} in {self.path} is corrupt or incomplete and cannot be"
            f" restored ({reason}); moved it to {target} and falling back to the previous"
            " checkpoint."
        )
        warnings.warn(message, CorruptCheckpointWarning, stacklevel=3)
        logger.warning(message)
        if jax.process_index() == 0:
            os.replace(self._step_dir(step), target)
        self._manager.close()
        self._manager = self._new_manager()

    def _aside_path(self, step: int) -> str:
        """corrupt-STEP, or corrupt-STEP.N if an earlier one was moved aside already."""
        target = os.path.join(self.path, f"corrupt-{step}")
        n = 1
        while os.path.exists(target if n == 1 else f"{target}.{n}"):
            n += 1
        return target if n == 1 else f"{target}.{n}"
