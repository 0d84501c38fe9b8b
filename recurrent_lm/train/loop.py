"""The training loop: any registered architecture, sharded, exactly resumable.

`train(TrainConfig(...))` (or ``python -m recurrent_lm.train``):

* builds the model of ``config.model`` (a name in `recurrent_lm.models`'
  registry) from a preset, or loads ``init_checkpoint`` to fine-tune it,
  optionally with LoRA adapters (only they train);
* initialises the parameters directly into their shardings on a ("data",
  "fsdp", "model") mesh (rules keyed by named axes, `sharding.py`);
* optimises with optax: global-norm clipping, then AdamW under linear warmup
  + cosine (or constant / linear) decay, weight decay on matrices only;
  float32 master weights, optional bfloat16 compute (`cast_parameters` inside
  the step), gradient accumulation over microbatches (the loss and gradient are
  sums over tokens divided once by the batch's token count, so accumulating
  gives the same step as one large batch);
* saves params, optimizer state, step, RNG and the data iterator's position
  with orbax every ``checkpoint_interval`` steps; ``resume`` continues from the
  newest intact checkpoint exactly (same per-step losses as an uninterrupted
  run) after checking that the run settings match;
* writes one JSON object per step to ``metrics_file`` (step, loss,
  tokens_per_s, grad_norm, learning_rate, step_time_s; eval_loss at the eval
  interval) and shows a tqdm progress bar.

The step function receives raw arrays (``{label: array}``) and rebuilds the
penzai model inside the trace: no per-call flattening of the model's struct.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from penzai import pz

from recurrent_lm import axes, checkpoint, models
from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.params import cast_parameters
from recurrent_lm.train import checkpointing, data, sharding

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")
COMPUTE_DTYPES = ("float32", "bfloat16")
TOKENIZER_FILE = "tokenizer.model"
# Tests set this to hard-kill the process right after a step's checkpoint is
# requested (an async save may still be in flight), as a pre-emption would.
_KILL_AFTER_STEP = int(os.environ.get("RECURRENT_LM_TEST_KILL_AFTER_STEP", "0")) or None


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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the CLI flags, one to one)."""

    model: str = "griffin"
    preset: str = "tiny"
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: tuple[str, ...] = ()
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 1024
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    metrics_file: str | None = None
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    eval_interval: int = 0
    eval_batches: int = 8
    eval_fraction: float = 0.05
    checkpoint_interval: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    mesh: str | None = None
    sharding_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_checkpoint: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ()
    save_model: str | None = None
    save_adapters: str | None = None
    stop_after: int | None = None
    progress: bool = True

    def __post_init__(self):
        errors = []
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "keep_checkpoints",
            "checkpoint_interval",
            "eval_batches",
            "tokenizer_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_interval", "lora_rank"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lr_schedule not in SCHEDULES:
            errors.append(f"lr_schedule {self.lr_schedule!r} is not one of {SCHEDULES}")
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
        if self.resume and not self.checkpoint_dir:
            errors.append("resume needs a checkpoint_dir")
        if self.lora_rank and not self.init_checkpoint:
            errors.append("LoRA fine-tunes a trained model: give init_checkpoint")
        if self.save_adapters and not self.lora_rank:
            errors.append("save_adapters needs LoRA (lora_rank > 0)")
        if errors:
            raise ValueError("invalid training settings: " + "; ".join(errors) + ".")

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


@dataclasses.dataclass
class TrainResult:
    losses: dict[int, float]
    eval_losses: dict[int, float]
    start_step: int
    final_step: int
    model: Any
    tokenizer: Any


# ---------------------------------------------------------------------------
# Optimiser and step functions.
# ---------------------------------------------------------------------------


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, cfg.total_decay_steps)
    decay = max(cfg.total_decay_steps - warmup, 1)
    end = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.lr_schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.lr_schedule == "linear":
        after = optax.linear_schedule(cfg.learning_rate, end, decay)
    else:
        after = optax.cosine_decay_schedule(
            cfg.learning_rate, decay, alpha=cfg.min_lr_ratio
        )
    if not warmup:
        return after
    return (
        optax.join_schedules(
            [
                optax.linear_schedule(
                    cfg.learning_rate / warmup, cfg.learning_rate, warmup - 1
                ),
                after,
            ],
            [warmup],
        )
        if warmup > 1
        else optax.join_schedules(
            [optax.constant_schedule(cfg.learning_rate), after], [warmup]
        )
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    # Weight decay on matrices only: not on norms, biases or gate vectors.
    decay_mask = lambda params: jax.tree.map(lambda v: v.ndim >= 2, params)
    parts = [] if cfg.grad_clip is None else [optax.clip_by_global_norm(cfg.grad_clip)]
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def bind_values(skeleton, param_axes, params, compute_dtype: str | None):
    """The model: `skeleton` with raw arrays ``{label: array}`` bound by label."""
    model = skeleton.bind_variables(
        [
            pz.ParameterValue(
                label=label, value=pz.nx.wrap(params[label]).tag(*param_axes[label])
            )
            for label in param_axes
        ]
    )
    if compute_dtype and compute_dtype != "float32":
        model = cast_parameters(model, compute_dtype)
    return model


def token_losses(model, tokens, segment_pos):
    """(sum of next-token NLL over target positions, number of targets).

    tokens, segment_pos: int32 [batch, seq]; see `data.loss_mask`.
    """
    named_tokens = pz.nx.wrap(tokens).tag(*axes.TOKEN_AXES)
    named_pos = pz.nx.wrap(segment_pos).tag(*axes.TOKEN_AXES)
    logits = model.forward(named_tokens, named_pos).unwrap(
        *axes.TOKEN_AXES, axes.VOCABULARY
    )
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = (segment_pos[:, 1:] > 0).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    train_step: Any
    eval_step: Any
    optimizer: optax.GradientTransformation


@functools.lru_cache(maxsize=8)
def _step_functions(cfg_key: tuple, param_axes_items: tuple) -> StepFunctions:
    """Compiled step functions, cached so repeated runs in a process reuse them."""
    cfg = TrainConfig(**dict(cfg_key))
    param_axes = dict(param_axes_items)
    optimizer = make_optimizer(cfg)
    compute = cfg.compute_dtype

    def loss_sum(params, skeleton, tokens, pos):
        return token_losses(
            bind_values(skeleton, param_axes, params, compute), tokens, pos
        )

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def train_step(params, opt_state, skeleton, tokens, pos):
        # tokens, pos: [grad_accum, microbatch, seq].
        def micro(carry, batch):
            grads, total, count = carry
            (loss, n), g = grad_fn(params, skeleton, *batch)
            return (jax.tree.map(jnp.add, grads, g), total + loss, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        if tokens.shape[0] == 1:
            (grads, total, count), _ = micro(init, (tokens[0], pos[0]))
        else:
            (grads, total, count), _ = jax.lax.scan(micro, init, (tokens, pos))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": total / count,
            "grad_norm": optax.tree.norm(grads),
            "target_tokens": count,
        }
        return params, opt_state, metrics

    def eval_step(params, skeleton, tokens, pos):
        return loss_sum(params, skeleton, tokens, pos)

    return StepFunctions(
        train_step=jax.jit(train_step, donate_argnums=(0, 1)),
        eval_step=jax.jit(eval_step),
        optimizer=optimizer,
    )


def step_functions(
    cfg: TrainConfig, param_axes: dict[str, tuple[str, ...]]
) -> StepFunctions:
    keys = (*OPTIMIZER_FIELDS, "decay_steps", "steps", "compute_dtype")
    cfg_key = tuple((k, getattr(cfg, k)) for k in keys)
    return _step_functions(cfg_key, tuple(sorted(param_axes.items())))


def init_optimizer_state(optimizer, params, mesh):
    """Moment shardings follow the parameters; scalars (counts) are replicated
    on the mesh, so every step sees the same input types (no recompilation)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda x: (
            x
            if isinstance(x.sharding, jax.sharding.NamedSharding)
            else jax.device_put(x, replicated)
        ),
        jax.jit(optimizer.init)(params),
    )


# ---------------------------------------------------------------------------
# Model, tokenizer and data set-up.
# ---------------------------------------------------------------------------


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def prepare_tokenizer(cfg: TrainConfig) -> tuple[tokenizer_lib.Tokenizer, str]:
    """The given tokenizer, or the run's own (trained on the data at the first start)."""
    if cfg.tokenizer:
        return tokenizer_lib.Tokenizer.load(cfg.tokenizer), cfg.tokenizer
    if not cfg.checkpoint_dir:
        raise ValueError(
            "no tokenizer: pass --tokenizer FILE, or --checkpoint-dir so that one is trained on"
            " the data and kept there (or train one: python -m recurrent_lm.tokenizer train)."
        )
    path = os.path.join(cfg.checkpoint_dir, TOKENIZER_FILE)
    if not os.path.exists(path):
        if cfg.resume:
            raise checkpointing.CheckpointDirError(
                f"--resume: {path} is missing; pass the run's --tokenizer."
            )
        files = data.data_files(cfg.data)
        data.read_documents(files)  # clear errors for empty data before training one
        os.makedirs(cfg.checkpoint_dir, exist_ok=True)
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
    model_type = models.get_model_type(cfg.model)
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


def initial_model(cfg: TrainConfig, vocab_size: int, mesh, rules_override):
    """(model, rules) with every parameter placed on the mesh by the rules."""
    if cfg.init_checkpoint:
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
    model_type, config = model_config(cfg, vocab_size)
    rules = sharding.rules_for(model_type.name, rules_override)
    # Built eagerly (compiling one jit of every initialiser costs ~30 s on CPU
    # even for a tiny model); `split_trainable` then places each parameter on
    # the mesh. Models too large for one host: save once, then `load_sharded`
    # (--init-checkpoint) reads each shard where it belongs.
    model = model_type.build_model(config, jax.random.key(cfg.seed))
    return model, rules


def split_trainable(model, mesh, rules):
    """(skeleton, {label: array}, {label: axis names}) of the trainable parameters."""
    skeleton, params = pz.unbind_params(model)
    param_axes = {p.label: tuple(p.value.named_shape) for p in params}
    values = {}
    for p in params:
        array = p.value.unwrap(*param_axes[p.label])
        target = sharding.named_sharding(
            param_axes[p.label], array.shape, mesh, rules, what=p.label
        )
        values[p.label] = jax.device_put(array, target)
    return skeleton, values, param_axes


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


class MetricsWriter:
    """One JSON object per line; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: str | None, start_step: int, enabled: bool):
        self.file = None
        if not path or not enabled:
            return
        kept = []
        if start_step and os.path.exists(path):
            with open(path) as f:
                kept = [
                    line
                    for line in f
                    if line.strip() and json.loads(line)["step"] <= start_step
                ]
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.file = open(path, "w")  # noqa: SIM115 - kept open for the whole run
        self.file.writelines(kept)
        self.file.flush()

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _device_batch(rows: np.ndarray, cfg: TrainConfig, batch_sharding) -> jax.Array:
    """Local rows [local_batch, seq] -> global [grad_accum, batch / grad_accum, seq]."""
    local = rows.reshape(cfg.grad_accum, -1, rows.shape[-1])
    global_shape = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum, rows.shape[-1])
    return sharding.global_batch_from_local(local, batch_sharding, global_shape)


def evaluate(fns, params, skeleton, rows, cfg, eval_sharding) -> float:
    total, count = 0.0, 0.0
    for tokens, pos in data.eval_batches(rows, cfg.batch_size, cfg.eval_batches):
        process = slice(
            jax.process_index() * (cfg.batch_size // jax.process_count()),
            (jax.process_index() + 1) * (cfg.batch_size // jax.process_count()),
        )
        t = sharding.global_batch_from_local(
            tokens[process], eval_sharding, tokens.shape
        )
        p = sharding.global_batch_from_local(pos[process], eval_sharding, pos.shape)
        loss, n = fns.eval_step(params, skeleton, t, p)
        total, count = total + float(loss), count + float(n)
    return total / max(count, 1.0)


def train(cfg: TrainConfig) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring."""
    # Validate everything cheap before touching the checkpoint directory.
    files = data.data_files(cfg.data)
    model_type = models.get_model_type(cfg.model)
    if not cfg.init_checkpoint:  # unknown presets and bad overrides fail here
        model_type.config_class.from_preset(cfg.preset, **cfg.config_overrides)
    if cfg.checkpoint_dir:
        checkpointing.check_directory(cfg.checkpoint_dir, resume=cfg.resume)

    tokenizer, tokenizer_path = prepare_tokenizer(cfg)
    corpus = data.load_corpus(
        files,
        tokenizer,
        cfg.seq_len,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    mesh = sharding.make_mesh(cfg.mesh)
    batch_ways = mesh.shape[sharding.DATA] * mesh.shape[sharding.FSDP]
    if (cfg.batch_size // cfg.grad_accum) % batch_ways:
        raise ValueError(
            f"the microbatch ({cfg.batch_size} / grad_accum {cfg.grad_accum}) is not divisible"
            f" by the mesh's data x fsdp = {batch_ways} devices."
        )
    model, rules = initial_model(
        cfg, tokenizer.vocab_size, mesh, cfg.sharding_overrides
    )
    skeleton, params, param_axes = split_trainable(model, mesh, rules)
    fns = step_functions(cfg, param_axes)
    opt_state = init_optimizer_state(fns.optimizer, params, mesh)
    rng = jax.random.key_data(jax.random.key(cfg.seed))
    step = 0

    run = cfg.run_settings()
    run.update(
        model_config=model.config.to_dict(),
        tokenizer_sha256=_file_digest(tokenizer_path),
        data_fingerprint=corpus.fingerprint,
    )
    run = json.loads(json.dumps(run))
    iterator = data.BatchIterator(
        corpus.train,
        cfg.batch_size,
        cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    manager = None
    if cfg.checkpoint_dir:
        manager = checkpointing.Checkpointer(
            cfg.checkpoint_dir,
            keep=cfg.keep_checkpoints,
            async_save=cfg.async_checkpoints,
        )
        if cfg.resume:
            state = {
                "params": params,
                "opt_state": opt_state,
                "step": np.int64(0),
                "rng": rng,
            }
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
                ),
                state,
            )
            step, restored, data_state = manager.restore_latest(abstract, run)
            params, opt_state, rng = (
                restored["params"],
                restored["opt_state"],
                restored["rng"],
            )
            iterator.set_state(data_state)
            logger.info("resumed from step %d", step)
    start_step = step
    is_main = jax.process_index() == 0
    metrics = MetricsWriter(cfg.metrics_file, start_step, is_main)
    batch_sharding = sharding.batch_sharding(mesh, 3, batch_dim=1)
    eval_sharding = sharding.batch_sharding(mesh, 2)
    schedule = learning_rate_schedule(cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses, eval_losses = {}, {}
    last = min(cfg.steps, cfg.stop_after or cfg.steps)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not (cfg.progress and is_main),
        file=sys.stderr,
        dynamic_ncols=True,
        desc="train",
    )
    try:
        while step < last:
            tokens, pos = next(iterator)
            t0 = time.perf_counter()
            params, opt_state, out = fns.train_step(
                params,
                opt_state,
                skeleton,
                _device_batch(tokens, cfg, batch_sharding),
                _device_batch(pos, cfg, batch_sharding),
            )
            loss = float(out["loss"])
            elapsed = time.perf_counter() - t0
            step += 1
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss} at step {step}; lower --learning-rate or check the data"
                    " (the last checkpoint is kept)."
                )
            record = {
                "step": step,
                "loss": loss,
                "tokens_per_s": tokens_per_step / elapsed,
                "grad_norm": float(out["grad_norm"]),
                "learning_rate": float(schedule(step - 1)),
                "step_time_s": elapsed,
                "target_tokens": int(out["target_tokens"]),
            }
            losses[step] = loss
            if (
                cfg.eval_interval
                and corpus.eval is not None
                and (step % cfg.eval_interval == 0 or step == last)
            ):
                record["eval_loss"] = eval_losses[step] = evaluate(
                    fns, params, skeleton, corpus.eval, cfg, eval_sharding
                )
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if manager and (step % cfg.checkpoint_interval == 0 or step == last):
                manager.save(
                    step,
                    {
                        "params": params,
                        "opt_state": opt_state,
                        "step": np.int64(step),
                        "rng": rng,
                    },
                    iterator.get_state(),
                    run,
                )
            if step == _KILL_AFTER_STEP:  # fault injection for the resume tests
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        metrics.close()
        if manager:
            manager.close()

    final = skeleton.bind_variables(
        [
            pz.Parameter(
                label=label, value=pz.nx.wrap(params[label]).tag(*param_axes[label])
            )
            for label in param_axes
        ]
    )
    if cfg.lora_rank:
        from recurrent_lm import lora

        if cfg.save_adapters and is_main:
            lora.save_adapters(final, cfg.save_adapters)
        final = lora.merge_lora(final)
    if cfg.save_model:
        save_model(final, tokenizer_path, cfg.save_model)
    return TrainResult(losses, eval_losses, start_step, step, final, tokenizer)


def save_model(model, tokenizer_path: str, directory: str) -> None:
    """`recurrent_lm.save` of the model plus its tokenizer.model (every process calls it)."""
    import shutil

    checkpoint.save(model, directory)
    if jax.process_index() == 0:
        shutil.copyfile(tokenizer_path, os.path.join(directory, TOKENIZER_FILE))


def ensure_models_imported() -> None:
    """Imports every architecture module present so its registration runs."""
    import importlib
    import pkgutil

    import recurrent_lm.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base":
            importlib.import_module(f"recurrent_lm.models.{info.name}")


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
