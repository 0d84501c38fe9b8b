"""The optimiser: learning-rate schedule and the optax chain.

Global-norm clipping, then AdamW under linear warmup + cosine (or constant /
linear) decay, weight decay on matrices only.
"""

from __future__ import annotations

import jax
import optax

from recurrent_lm import axes
from recurrent_lm.train.config import TrainConfig


def _decay_schedule(cfg: TrainConfig, decay_steps: int) -> optax.Schedule:
    if cfg.lr_schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if cfg.lr_schedule == "linear":
        end = cfg.learning_rate * cfg.min_lr_ratio
        return optax.linear_schedule(cfg.learning_rate, end, decay_steps)
    return optax.cosine_decay_schedule(
        cfg.learning_rate, decay_steps, alpha=cfg.min_lr_ratio
    )


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` over ``warmup_steps``, then the decay."""
    warmup = min(cfg.warmup_steps, cfg.total_decay_steps)
    after = _decay_schedule(cfg, max(cfg.total_decay_steps - warmup, 1))
    if not warmup:
        return after
    if warmup == 1:
        ramp = optax.constant_schedule(cfg.learning_rate)
    else:
        ramp = optax.linear_schedule(
            cfg.learning_rate / warmup, cfg.learning_rate, warmup - 1
        )
    return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(cfg: TrainConfig, param_axes=None) -> optax.GradientTransformation:
    """The optax chain; `param_axes` ({label: axis names}) tells the matrices
    of scanned stacks (whose "stack" axis adds a dimension) from vectors."""

    # Weight decay on matrices only: not on norms, biases or gate vectors.
    def decay_mask(params):
        if param_axes is None:
            return jax.tree.map(lambda v: v.ndim >= 2, params)
        return {k: sum(a != axes.STACK for a in param_axes[k]) >= 2 for k in params}

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
