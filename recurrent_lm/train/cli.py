"""Pretrain or fine-tune a recurrent_lm model from text files.

    python -m recurrent_lm.train --model griffin --preset tiny --data corpus.txt \\
        --steps 1000 --batch-size 16 --seq-len 256 --checkpoint-dir run/ \\
        --metrics-file run/metrics.jsonl [--resume] [--tokenizer tokenizer.model]

--tokenizer is a SentencePiece model or an RWKV World vocabulary ``.txt``;
without it, a SentencePiece tokenizer is trained on the data and kept in the
checkpoint directory. Multi-host: pass --coordinator-address,
--num-processes and --process-id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and run the same command on every host.

A released-size preset (every preset but "tiny") fills the settings its command
line leaves out from its pretraining recipe (`recipes`: bfloat16 compute, scanned
and rematerialised layers, chunked loss, FSDP over all devices, gradient
accumulation sized to the devices); the run logs what it filled.

The flags are generated from `TrainConfig`'s fields, one each: ``--field-name``
(or the spelling in the field's metadata), typed by the annotation; booleans
get ``--name`` / ``--no-name``; tuple fields repeat (``--data A --data B``);
dict fields take repeated KEY=VALUE (JSON values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Collection, Sequence
from typing import Any

from recurrent_lm.train import loop, recipes, sharding
from recurrent_lm.train.config import GROUPS, TrainConfig
from recurrent_lm.user_errors import reports_user_errors

logger = logging.getLogger(__name__)

DISTRIBUTED_ARGS = ("coordinator_address", "num_processes", "process_id")
"""Flags that are not TrainConfig fields: jax.distributed.initialize's."""
COMPILE_ONLY_ARGS = ("compile_only", "report")
"""Flags that are not TrainConfig fields: `compile_only` instead of a run."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["hidden_size=128", "block_types=[\"recurrent\"]"]`` -> dict (JSON values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad override {item!r}: expected KEY=VALUE.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _base_type(hint) -> type:
    """int for ``int`` and ``int | None``; the origin (tuple, dict) for generics."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) or hint


def _field_argument(field: dataclasses.Field, kind: type) -> tuple[list[str], dict]:
    """(option strings, add_argument keywords) of one TrainConfig field."""
    meta = field.metadata
    flags = [meta["flag"] or "--" + field.name.replace("_", "-"), *meta["aliases"]]
    kwargs = {"dest": field.name, "help": meta["help"]}
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if kind is bool:
        kwargs.update(action=argparse.BooleanOptionalAction, default=field.default)
    elif kind in (tuple, dict):  # repeated; converted in config_from_args
        kwargs.update(action="append", default=[])
    else:
        kwargs.update(type=kind, default=field.default, choices=meta["choices"])
    return flags, kwargs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default unless it is empty or the help already names one."""

    def _get_help_string(self, action):
        empty = action.default is None or action.default == []
        if empty or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The CLI's parser. ``suppress_defaults``: flags not given leave no attribute
    (which settings a command line sets, so a preset's recipe fills the rest)."""
    p = argparse.ArgumentParser(
        prog="python -m recurrent_lm.train",
        description=__doc__.split("\n")[0],
        epilog="Defaults shown are the plain ones; a released-size preset (all but 'tiny') fills"
        " the settings not given from its pretraining recipe: "
        + ", ".join(f"{k}={v}" for k, v in recipes.PRETRAINING.items()) + ".",
        formatter_class=_HelpFormatter,
    )
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flags, kwargs = _field_argument(field, _base_type(hints[field.name]))
        if suppress_defaults:
            kwargs["default"] = argparse.SUPPRESS
        groups[field.metadata["group"]].add_argument(*flags, **kwargs)
    g = groups["distribution"]
    g.add_argument(
        "--coordinator-address", help="jax.distributed coordinator host:port"
    )
    g.add_argument("--num-processes", type=int, help="processes in the run")
    g.add_argument("--process-id", type=int, help="this process's index")
    g.add_argument(
        "--compile-only",
        metavar="TOPOLOGY",
        help="compile the training step for a TPU slice (e.g. v5e:4x4) with libtpu, report"
        " memory, flops and collectives, and exit (no data, no training)",
    )
    g.add_argument("--report", metavar="FILE", help="--compile-only: write the report as JSON")
    return p


def config_from_args(
    args: argparse.Namespace, given: Collection[str] | None = None
) -> TrainConfig:
    """The `TrainConfig` of parsed flags: those `given` on the command line, then the
    preset's recipe (`recipes`), then the defaults. ``given=None``: every field
    is taken from `args` as it is (no recipe)."""
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name)
        if _base_type(hints[field.name]) is dict:
            value = parse_overrides(value)
        values[field.name] = value
    if given is None:
        return TrainConfig(**values)
    explicit = {name: value for name, value in values.items() if name in given}
    explicit.update(model=values["model"], preset=values["preset"])
    applied = {k: v for k, v in recipes.recipe(values["model"], values["preset"]).items()
               if k not in given}
    if applied:
        logger.info(
            "preset %s trains with its recipe: %s (flags override)", values["preset"],
            ", ".join(f"{k}={v}" for k, v in applied.items()),
        )
    return TrainConfig.for_preset(**explicit)


def given_settings(argv: Sequence[str] | None) -> set[str]:
    """The TrainConfig fields that `argv` sets explicitly."""
    probe = build_parser(suppress_defaults=True).parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return fields & set(vars(probe))


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # force: importing orbax already gave the root logger absl's WARNING handler,
    # which would hide the run's INFO lines (hold-out, resume).
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sharding.maybe_initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id
    )
    if args.report and not args.compile_only:
        raise ValueError("--report needs --compile-only TOPOLOGY.")
    config = config_from_args(args, given_settings(argv))
    if args.compile_only:
        from recurrent_lm.train import compile_only

        compile_only.run(config, args.compile_only, args.report)
        return 0
    result = loop.train(config)
    last = result.losses.get(result.final_step)
    summary = f"done: step {result.final_step}"
    if last is not None:
        summary += f", loss {last:.4f}"
    if result.eval_losses:
        step = max(result.eval_losses)
        summary += f", eval loss {result.eval_losses[step]:.4f} (step {step})"
    print(summary, file=sys.stderr)
    return 0
