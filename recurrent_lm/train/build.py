"""What a run builds before its first step (tokenizer, model) and saves after its last.

The model of ``config.model`` (a name in `recurrent_lm.core.registry`) is
built from a preset, or ``init_checkpoint`` is loaded to fine-tune it,
optionally with LoRA adapters (only they train).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import jax

from recurrent_lm import checkpoint
from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.core import registry
from recurrent_lm.train import checkpointing, data, sharding
from recurrent_lm.train.config import TrainConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
"""The run's own tokenizer (trained on the data). A given one is saved next to
the model as `tokenizer_lib.file_name` says (``tokenizer.txt`` for an RWKV World
vocabulary)."""


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def prepare_tokenizer(cfg: TrainConfig) -> tuple[tokenizer_lib.Tokenizer, str]:
    """The given tokenizer (`tokenizer_lib.load`: SentencePiece, or a World
    vocabulary ``.txt``), or the run's own (trained on the data at a fresh start)."""
    if cfg.tokenizer:
        return tokenizer_lib.load(cfg.tokenizer), cfg.tokenizer
    if not cfg.checkpoint_dir:
        raise ValueError(
            "no tokenizer: pass --tokenizer FILE, or --checkpoint-dir so that one is trained on"
            " the data and kept there (or train one: python -m recurrent_lm.tokenizer train)."
        )
    path = os.path.join(cfg.checkpoint_dir, TOKENIZER_FILE)
    if cfg.resume:
        if not os.path.exists(path):
            raise checkpointing.CheckpointDirError(
                f"--resume: {path} is missing; pass the run's --tokenizer."
            )
    else:
        # A fresh start (the directory holds no checkpoint) trains it anew: one
        # left by an earlier start that failed may come from other data.
        files = data.data_files(cfg.data)
        data.read_documents(files)  # clear errors for empty data before training one
        checkpointing.claim_directory(cfg.checkpoint_dir)
        logger.info(
            "training a %d-piece tokenizer on %s", cfg.tokenizer_vocab_size, files
        )
        tokenizer_lib.train(
            files,
            path[: -len(".model")],
            vocab_size=cfg.tokenizer_vocab_size,
            hard_vocab_limit=False,
        )
    return tokenizer_lib.Tokenizer.load(path), path


def model_config(cfg: TrainConfig, vocab_size: int):
    """The architecture's config: preset, then overrides, then the tokenizer's vocabulary."""
    model_type = registry.get(cfg.model)
    overrides = dict(cfg.config_overrides)
    overrides.setdefault("vocab_size", vocab_size)
    overrides.setdefault("param_dtype", cfg.param_dtype)
    config = model_type.config_class.from_preset(cfg.preset, **overrides)
    if config.vocab_size < vocab_size:
        raise ValueError(
            f"the model's vocab_size {config.vocab_size} is smaller than the tokenizer's"
            f" {vocab_size} pieces."
        )
    return model_type, config


def check_model_settings(cfg: TrainConfig) -> None:
    """Unknown model types, unknown presets and bad overrides fail here (cheaply)."""
    model_type = registry.get(cfg.model)
    if not cfg.init_checkpoint:
        model_type.config_class.from_preset(cfg.preset, **cfg.config_overrides)


def _fine_tuned_model(cfg: TrainConfig, vocab_size: int, mesh, rules_override):
    model_type = checkpoint.read_metadata(cfg.init_checkpoint)["model_type"]
    rules = sharding.rules_for(model_type, rules_override)
    model = sharding.load_sharded(cfg.init_checkpoint, mesh, rules)
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"{cfg.init_checkpoint} has vocab_size {model.config.vocab_size}, fewer than"
            f" the tokenizer's {vocab_size} pieces."
        )
    if cfg.lora_rank:
        from recurrent_lm import lora

        model = lora.enable_lora(
            model,
            cfg.lora_rank,
            targets=list(cfg.lora_targets) or None,
            alpha=cfg.lora_alpha,
            key=jax.random.key(cfg.seed),
        )
    return model, rules


def resolve_grad_accum(cfg: TrainConfig, mesh) -> TrainConfig:
    """`cfg` with the gradient accumulation the run steps with: ``grad_accum``, raised
    (to a divisor of the rows per device) until a microbatch holds at most
    ``max_tokens_per_device`` tokens per device, when that is set. Each microbatch
    splits evenly over the mesh's data x fsdp devices (else a clear error)."""
    ways = mesh.shape[sharding.DATA] * mesh.shape[sharding.FSDP]
    if (cfg.batch_size // cfg.grad_accum) % ways:
        raise ValueError(
            f"the microbatch ({cfg.batch_size} / grad_accum {cfg.grad_accum}) is not divisible"
            f" by the mesh's data x fsdp = {ways} devices: make --batch-size a multiple of"
            f" {ways * cfg.grad_accum}."
        )
    if cfg.max_tokens_per_device is None:
        return cfg
    rows = cfg.batch_size // ways  # per device, per step
    accum = next(
        (a for a in range(cfg.grad_accum, rows + 1)
         if rows % a == 0 and rows // a * cfg.seq_len <= cfg.max_tokens_per_device),
        rows,
    )
    if accum != cfg.grad_accum:
        logger.info(
            "grad_accum %d: microbatches of %d x %d tokens per device"
            " (max_tokens_per_device %d)", accum, rows // accum, cfg.seq_len,
            cfg.max_tokens_per_device,
        )
    return dataclasses.replace(cfg, grad_accum=accum)


def initial_model(cfg: TrainConfig, vocab_size: int, mesh, rules_override):
    """(model, sharding rules): ``init_checkpoint`` loaded into its shardings, or a
    new model of the preset."""
    if cfg.init_checkpoint:
        return _fine_tuned_model(cfg, vocab_size, mesh, rules_override)
    model_type, config = model_config(cfg, vocab_size)
    rules = sharding.rules_for(model_type.name, rules_override)
    model = sharding.init_sharded(
        model_type.build_model, config, jax.random.key(cfg.seed), mesh, rules
    )
    return model, rules


def save_model(model, tokenizer_path: str, directory: str) -> None:
    """`recurrent_lm.save` of the model plus its tokenizer (``tokenizer.model``, or
    ``tokenizer.txt`` for a World vocabulary; every process calls it)."""
    checkpoint.save(
        model, directory, extra_files={tokenizer_lib.file_name(tokenizer_path): tokenizer_path}
    )


def finish_model(cfg: TrainConfig, model, tokenizer_path: str):
    """The trained model with LoRA merged; saves adapters / model where asked."""
    if cfg.lora_rank:
        from recurrent_lm import lora

        if cfg.save_adapters and jax.process_index() == 0:
            lora.save_adapters(model, cfg.save_adapters)
        model = lora.merge_lora(model)
    if cfg.save_model:
        save_model(model, tokenizer_path, cfg.save_model)
    return model

