"""The training loop: any registered architecture, sharded, exactly resumable.

`train(TrainConfig(...))` (or ``python -m recurrent_lm.train``):

* builds the tokenizer and the model (`build`): a preset of ``config.model``,
  or ``init_checkpoint`` to fine-tune, optionally with LoRA adapters;
* runs repeating groups of blocks under one `jax.lax.scan` (``scan_layers``)
  and applies the ``remat`` policy (`recurrent_lm.core.stack`): checkpoints
  hold the stacked parameters, the final model is per layer again;
* places the parameters on a ("data", "fsdp", "model") mesh (rules keyed by
  named axes, `sharding`);
* optimises with optax (`optimizer`), with the jitted steps of `steps`
  (gradient accumulation, optional bfloat16 compute);
* saves params, optimizer state, step, RNG and the data iterator's position
  with orbax every ``checkpoint_interval`` steps (`checkpointing`); ``resume``
  continues from the newest intact checkpoint exactly (same per-step losses
  as an uninterrupted run) after checking that the run settings match;
* writes one JSON object per step to ``metrics_file`` (step, loss,
  tokens_per_s, grad_norm, learning_rate, step_time_s; eval_loss at the eval
  interval) and shows a tqdm progress bar (`metrics`); ``on_step_end`` sees
  the same record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from recurrent_lm.core import stack
from recurrent_lm.train import build, checkpointing, data, sharding
from recurrent_lm.train.config import TrainConfig
from recurrent_lm.train.metrics import MetricsWriter, progress_bar
from recurrent_lm.train.optimizer import init_optimizer_state, learning_rate_schedule
from recurrent_lm.train.steps import (
    StepFunctions,
    bind_parameters,
    split_trainable,
    step_functions,
)

logger = logging.getLogger(__name__)

StepHook = Callable[[int, dict[str, Any]], None]
"""``on_step_end(step, record)``: see `train`."""


@dataclasses.dataclass
class TrainResult:
    losses: dict[int, float]
    """Training loss of each step this call ran."""
    eval_losses: dict[int, float]
    start_step: int
    """0, or the step resumed from."""
    final_step: int
    model: Any
    """The trained model (LoRA adapters merged)."""
    tokenizer: Any


@dataclasses.dataclass
class TrainState:
    """What changes from step to step (a checkpoint holds it, and the data position)."""

    params: dict[str, jax.Array]
    opt_state: Any
    rng: jax.Array
    step: int = 0

    @classmethod
    def initial(cls, cfg: TrainConfig, optimizer, params, mesh) -> TrainState:
        opt_state = init_optimizer_state(optimizer, params, mesh)
        # Replicated on the mesh (not on one device): every process holds it, and
        # a multi-process checkpoint can save it.
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rng = jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), replicated)
        return cls(params, opt_state, rng)

    def checkpoint_tree(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "opt_state": self.opt_state,
            "step": np.int64(self.step),
            "rng": self.rng,
        }


def train(cfg: TrainConfig, on_step_end: StepHook | None = None) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring.

    on_step_end: called as ``on_step_end(step, record)`` after every step, once
      the step's metrics record (the dict written to ``metrics_file``) is written
      and its checkpoint, if one is due, requested (an asynchronous save may
      still be in flight). For logging or custom stopping: an exception it raises
      ends the run (after the pending checkpoint completes) and propagates.
    """
    files = _check_before_writing(cfg)
    tokenizer, tokenizer_path = build.prepare_tokenizer(cfg)
    corpus, iterator = _load_data(cfg, files, tokenizer)
    mesh = sharding.make_mesh(cfg.mesh)
    cfg = build.resolve_grad_accum(cfg, mesh)
    model, rules = build.initial_model(
        cfg, tokenizer.vocab_size, mesh, cfg.sharding_overrides
    )
    model = stack.prepared(model, scan=cfg.scan_layers, remat=cfg.remat)
    model = sharding.shard_residual_stream(model, mesh, rules)
    skeleton, params, param_axes = split_trainable(model, mesh, rules)
    fns = step_functions(cfg, param_axes)
    state = TrainState.initial(cfg, fns.optimizer, params, mesh)
    run = _run_record(cfg, model.config, tokenizer_path, corpus)
    checkpointer = _open_checkpointer(cfg)
    try:
        if cfg.resume:
            _restore(checkpointer, state, iterator, run)
        start_step = state.step
        loop = StepLoop(cfg, fns, skeleton, mesh, corpus, iterator, checkpointer, run)
        losses, eval_losses = loop.run(state, on_step_end)
    finally:
        if checkpointer:
            checkpointer.close()
    final = stack.unscan_layers(bind_parameters(skeleton, param_axes, state.params))
    final = sharding.unshard_residual_stream(final)
    final = build.finish_model(cfg, final, tokenizer_path)
    return TrainResult(losses, eval_losses, start_step, state.step, final, tokenizer)


# ---------------------------------------------------------------------------
# Set-up and resume.
# ---------------------------------------------------------------------------


def _check_before_writing(cfg: TrainConfig) -> list[str]:
    """The data files; validates everything cheap before touching the checkpoint dir."""
    files = data.data_files(cfg.data)
    build.check_model_settings(cfg)
    if cfg.checkpoint_dir:
        checkpointing.check_directory(cfg.checkpoint_dir, resume=cfg.resume)
    return files


def _load_data(cfg: TrainConfig, files, tokenizer):
    """(corpus, this process's batch iterator)."""
    corpus = data.load_corpus(
        files,
        tokenizer,
        cfg.seq_len,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    iterator = data.BatchIterator(
        corpus.train,
        cfg.batch_size,
        cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return corpus, iterator


def _run_record(cfg: TrainConfig, model_config, tokenizer_path, corpus) -> dict:
    """What a resume must match: the settings, model config, tokenizer and data."""
    run = cfg.run_settings()
    run.update(
        model_config=model_config.to_dict(),
        tokenizer_sha256=build.file_digest(tokenizer_path),
        data_fingerprint=corpus.fingerprint,
    )
    return json.loads(json.dumps(run))


def _open_checkpointer(cfg: TrainConfig) -> checkpointing.Checkpointer | None:
    if not cfg.checkpoint_dir:
        return None
    return checkpointing.Checkpointer(
        cfg.checkpoint_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints
    )


def _restore(checkpointer, state: TrainState, iterator, run: dict) -> None:
    """Loads the newest intact checkpoint into `state` and `iterator`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
        ),
        state.checkpoint_tree(),
    )
    step, restored, data_state = checkpointer.restore_latest(abstract, run)
    state.params = restored["params"]
    state.opt_state = restored["opt_state"]
    state.rng = restored["rng"]
    state.step = step
    iterator.set_state(data_state)
    logger.info("resumed from step %d", step)


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


class StepLoop:
    """Steps a `TrainState` to the last step: train, evaluate, report, checkpoint."""

    def __init__(
        self,
        cfg: TrainConfig,
        fns: StepFunctions,
        skeleton,
        mesh,
        corpus: data.Corpus,
        iterator: data.BatchIterator,
        checkpointer: checkpointing.Checkpointer | None,
        run_record: dict,
    ):
        self.cfg, self.fns, self.skeleton = cfg, fns, skeleton
        self.corpus, self.iterator = corpus, iterator
        self.checkpointer, self.run_record = checkpointer, run_record
        self.batch_sharding = sharding.batch_sharding(mesh, 3, batch_dim=1)
        self.eval_sharding = sharding.batch_sharding(mesh, 2)
        self.schedule = learning_rate_schedule(cfg)
        self.last = min(cfg.steps, cfg.stop_after or cfg.steps)

    def run(self, state: TrainState, on_step_end: StepHook | None = None):
        """(losses, eval_losses) by step, of the steps run."""
        cfg, is_main = self.cfg, jax.process_index() == 0
        metrics = MetricsWriter(cfg.metrics_file, state.step, is_main)
        bar = progress_bar(cfg.steps, state.step, cfg.progress and is_main)
        losses, eval_losses = {}, {}
        try:
            while state.step < self.last:
                record = self.train_step(state)
                losses[state.step] = record["loss"]
                if self._eval_due(state.step):
                    eval_losses[state.step] = self.evaluate(state.params)
                    record["eval_loss"] = eval_losses[state.step]
                metrics.write(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
                self._maybe_save(state)
                if on_step_end:
                    on_step_end(state.step, record)
        finally:
            bar.close()
            metrics.close()
        return losses, eval_losses

    def train_step(self, state: TrainState) -> dict[str, Any]:
        """One optimiser step on the next batch; the step's metrics record."""
        tokens, pos = next(self.iterator)
        t0 = time.perf_counter()
        state.params, state.opt_state, out = self.fns.train_step(
            state.params,
            state.opt_state,
            self.skeleton,
            self._device_batch(tokens),
            self._device_batch(pos),
        )
        loss = float(out["loss"])
        elapsed = time.perf_counter() - t0
        state.step += 1
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at step {state.step}; lower --learning-rate or check"
                " the data (the last checkpoint is kept)."
            )
        return {
            "step": state.step,
            "loss": loss,
            "tokens_per_s": self.cfg.batch_size * self.cfg.seq_len / elapsed,
            "grad_norm": float(out["grad_norm"]),
            "learning_rate": float(self.schedule(state.step - 1)),
            "step_time_s": elapsed,
            "target_tokens": int(out["target_tokens"]),
        }

    def evaluate(self, params) -> float:
        """Mean next-token loss over the held-out rows (``eval_batches`` batches)."""
        cfg, total, count = self.cfg, 0.0, 0.0
        local = cfg.batch_size // jax.process_count()
        process = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
        for tokens, pos in data.eval_batches(
            self.corpus.eval, cfg.batch_size, cfg.eval_batches
        ):
            t, p = (
                sharding.global_batch_from_local(
                    x[process], self.eval_sharding, x.shape
                )
                for x in (tokens, pos)
            )
            loss, n = self.fns.eval_step(params, self.skeleton, t, p)
            total, count = total + float(loss), count + float(n)
        return total / max(count, 1.0)

    def _eval_due(self, step: int) -> bool:
        interval = self.cfg.eval_interval
        return bool(
            interval
            and self.corpus.eval is not None
            and (step % interval == 0 or step == self.last)
        )

    def _maybe_save(self, state: TrainState) -> None:
        step = state.step
        if self.checkpointer and (
            step % self.cfg.checkpoint_interval == 0 or step == self.last
        ):
            self.checkpointer.save(
                step,
                state.checkpoint_tree(),
                self.iterator.get_state(),
                self.run_record,
            )

    def _device_batch(self, rows: np.ndarray) -> jax.Array:
        """Local rows [local_batch, seq] -> global [grad_accum, batch / grad_accum, seq]."""
        cfg = self.cfg
        local = rows.reshape(cfg.grad_accum, -1, rows.shape[-1])
        shape = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum, rows.shape[-1])
        return sharding.global_batch_from_local(local, self.batch_sharding, shape)
