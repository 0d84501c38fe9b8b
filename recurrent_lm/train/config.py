"""`TrainConfig`: every setting of a training run.

Each field carries its command-line help in its metadata (`setting`), from
which `cli` generates one flag per field: ``--field-name`` (unless the
metadata names another), typed from the annotation.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from recurrent_lm.core.stack import REMAT_POLICIES
from recurrent_lm.train import recipes

SCHEDULES = ("cosine", "linear", "constant")
COMPUTE_DTYPES = ("float32", "bfloat16")
GROUPS = {
    "model": "model",
    "data": "data",
    "optimisation": "optimisation",
    "output": "evaluation, checkpoints, output",
    "distribution": "distribution",
}
"""The CLI's argument groups (id: title), in order; each field's metadata names one."""

OPTIMIZER_FIELDS = (
    "learning_rate",
    "lr_schedule",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "adam_b1",
    "adam_b2",
    "adam_eps",
    "grad_clip",
)
"""The TrainConfig fields that define the optimiser (with the schedule length)."""

_POSITIVE = (
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "loss_chunk_size",
    "keep_checkpoints",
    "checkpoint_interval",
    "eval_batches",
    "tokenizer_vocab_size",
)
_NON_NEGATIVE = ("warmup_steps", "eval_interval", "lora_rank")


def setting(
    default: Any = None,
    help: str = "",  # noqa: A002 - argparse's name
    *,
    group: str,
    factory=None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
):
    """A TrainConfig field with its CLI help, group and (optional) flag spelling."""
    assert group in GROUPS, group
    metadata = {"help": help, "group": group, "flag": flag, "aliases": aliases}
    metadata.update(choices=choices, metavar=metavar)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the CLI flags, one to one; see `cli`).

    ``data`` and ``lora_targets`` may be given as lists (stored as tuples);
    ``grad_clip=0`` means no clipping (stored as None).
    """

    # model
    model: str = setting(
        "griffin", "architecture (a registered model type)", group="model"
    )
    preset: str = setting("tiny", "config preset of the architecture", group="model")
    config_overrides: dict[str, Any] = setting(
        help="override a config field (JSON value), e.g. hidden_size=128",
        group="model",
        factory=dict,
        flag="--config",
        metavar="KEY=VALUE",
    )
    param_dtype: str = setting("float32", "master weight dtype", group="model")
    compute_dtype: str = setting(
        "float32",
        "dtype the step computes in (masters stay in param_dtype)",
        group="model",
        choices=COMPUTE_DTYPES,
    )
    scan_layers: bool = setting(
        True,
        "run repeating groups of blocks under one lax.scan over stacked parameters"
        " (compiles each group once; same numbers; checkpoints hold the stacked"
        " parameters, the saved model per-layer ones)",
        group="model",
    )
    remat: str = setting(
        "none",
        "what the backward pass keeps of each block group: everything (none), its"
        " input only (block), or the matrix products' outputs (dots)",
        group="model",
        choices=REMAT_POLICIES,
    )
    init_checkpoint: str | None = setting(
        None, "fine-tune this recurrent_lm.save directory", group="model", metavar="DIR"
    )
    lora_rank: int = setting(0, "LoRA adapters of this rank (0: off)", group="model")
    lora_alpha: float | None = setting(
        None, "LoRA scale numerator (scale = alpha / rank)", group="model"
    )
    lora_targets: tuple[str, ...] = setting(
        (),
        "adapt Linear layers whose weight label matches (default: all)",
        group="model",
        flag="--lora-target",
        metavar="REGEX",
    )
    # data
    data: tuple[str, ...] = setting(
        (),
        "text/.jsonl file, directory or glob (repeatable)",
        group="data",
        metavar="PATH",
    )
    tokenizer: str | None = setting(
        None,
        "SentencePiece model, or RWKV World vocabulary (.txt) (default: train one on the data)",
        group="data",
    )
    tokenizer_vocab_size: int = setting(
        1024, "pieces of the tokenizer trained when none is given", group="data"
    )
    seq_len: int = setting(128, "tokens per row", group="data")
    batch_size: int = setting(8, "global batch (rows)", group="data")
    eval_fraction: float = setting(
        0.05,
        "share held out for evaluation: of the documents, or of the token stream's"
        " tail when the documents are too few (one plain text file)",
        group="data",
    )
    # optimisation
    steps: int = setting(100, "optimiser steps of the whole run", group="optimisation")
    seed: int = setting(
        0, "initialisation, data order and held-out split", group="optimisation"
    )
    learning_rate: float = setting(
        3e-3, "peak learning rate", group="optimisation", aliases=("--lr",)
    )
    lr_schedule: str = setting(
        "cosine", "decay after the warmup", group="optimisation", choices=SCHEDULES
    )
    warmup_steps: int = setting(10, "linear warmup steps", group="optimisation")
    decay_steps: int | None = setting(
        None, "schedule length (default: --steps)", group="optimisation"
    )
    min_lr_ratio: float = setting(
        0.1, "final learning rate / peak (cosine, linear)", group="optimisation"
    )
    weight_decay: float = setting(
        0.1, "AdamW weight decay (matrices only)", group="optimisation"
    )
    adam_b1: float = setting(0.9, "AdamW beta1", group="optimisation")
    adam_b2: float = setting(0.95, "AdamW beta2", group="optimisation")
    adam_eps: float = setting(1e-8, "AdamW epsilon", group="optimisation")
    grad_clip: float | None = setting(1.0, "global norm; 0: off", group="optimisation")
    grad_accum: int = setting(
        1, "microbatches per step (same global batch)", group="optimisation"
    )
    max_tokens_per_device: int | None = setting(
        None,
        "raise grad_accum until a microbatch holds at most this many tokens per device"
        " (activation memory grows with them; default: grad_accum as given)",
        group="optimisation",
    )
    loss_chunk_size: int = setting(
        256,
        "positions per chunk of the head and cross-entropy (the whole"
        " [tokens, vocabulary] logits are never formed)",
        group="optimisation",
    )
    # evaluation, checkpoints, output
    eval_interval: int = setting(
        0, "evaluate every N steps and at the last step (0: never)", group="output"
    )
    eval_batches: int = setting(
        8, "batches of held-out rows per evaluation", group="output"
    )
    checkpoint_dir: str | None = setting(
        None, "run directory: checkpoints (and the trained tokenizer)", group="output"
    )
    checkpoint_interval: int = setting(
        100, "save every N steps and at the end", group="output"
    )
    keep_checkpoints: int = setting(3, "newest checkpoints kept", group="output")
    async_checkpoints: bool = setting(
        True,
        "save checkpoints in the background while training goes on",
        group="output",
    )
    resume: bool = setting(
        False, "continue the run in --checkpoint-dir", group="output"
    )
    metrics_file: str | None = setting(
        None, "JSONL, one object per step", group="output"
    )
    save_model: str | None = setting(
        None,
        "write the final model (recurrent_lm.save) and its tokenizer here",
        group="output",
        metavar="DIR",
    )
    save_adapters: str | None = setting(
        None, "write the LoRA adapters alone here", group="output", metavar="DIR"
    )
    stop_after: int | None = setting(
        None, "stop (with a checkpoint) after this step", group="output"
    )
    progress: bool = setting(True, "show a progress bar", group="output")
    # distribution
    mesh: str | None = setting(
        None,
        "e.g. data=2,fsdp=2,model=2 (default: all devices on data)",
        group="distribution",
    )
    sharding_overrides: dict[str, Any] = setting(
        help="override a sharding rule, e.g. embedding=model or mlp=null",
        group="distribution",
        factory=dict,
        flag="--shard",
        metavar="AXIS=MESH_AXIS",
    )

    def __post_init__(self):
        for name in ("data", "lora_targets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.grad_clip == 0:
            object.__setattr__(self, "grad_clip", None)
        errors = self._errors()
        if errors:
            raise ValueError("invalid training settings: " + "; ".join(errors) + ".")

    def _errors(self) -> list[str]:
        errors = []
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lr_schedule not in SCHEDULES:
            errors.append(f"lr_schedule {self.lr_schedule!r} is not one of {SCHEDULES}")
        if self.remat not in REMAT_POLICIES:
            errors.append(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            errors.append(
                f"compute_dtype {self.compute_dtype!r} is not one of {COMPUTE_DTYPES}"
            )
        if not self.learning_rate > 0:
            errors.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not errors and self.batch_size % self.grad_accum:
            errors.append(
                f"grad_accum {self.grad_accum} does not divide batch_size {self.batch_size}"
            )
        if self.max_tokens_per_device is not None and self.max_tokens_per_device < 1:
            errors.append(
                f"max_tokens_per_device must be positive, got {self.max_tokens_per_device}"
            )
        if self.resume and not self.checkpoint_dir:
            errors.append("resume needs a checkpoint_dir")
        if self.lora_rank and not self.init_checkpoint:
            errors.append("LoRA fine-tunes a trained model: give init_checkpoint")
        if self.save_adapters and not self.lora_rank:
            errors.append("save_adapters needs LoRA (lora_rank > 0)")
        return errors

    @classmethod
    def for_preset(cls, model: str = "griffin", preset: str = "tiny", **settings) -> TrainConfig:
        """The settings of a run of `preset`: `settings`, then the preset's recipe
        (`recipes`: bfloat16, remat, FSDP for released sizes), then the defaults."""
        return cls(model=model, preset=preset, **{**recipes.recipe(model, preset), **settings})

    @property
    def total_decay_steps(self) -> int:
        return self.decay_steps or self.steps

    def run_settings(self) -> dict[str, Any]:
        """The settings a resume must share with the checkpoint (not steps, mesh, I/O)."""
        keys = (
            "model",
            "preset",
            "config_overrides",
            "seq_len",
            "batch_size",
            "seed",
            *OPTIMIZER_FIELDS,
            "grad_accum",
            "param_dtype",
            "compute_dtype",
            "scan_layers",
            "eval_fraction",
            "init_checkpoint",
            "lora_rank",
            "lora_alpha",
            "lora_targets",
        )
        settings = {k: getattr(self, k) for k in keys}
        settings["decay_steps"] = self.total_decay_steps
        settings["lora_targets"] = list(self.lora_targets)
        return json.loads(json.dumps(settings))
