"""The step functions: loss, train step (with gradient accumulation), eval step.

The steps receive raw arrays (``{label: array}``, what optax, sharding and
orbax see) and run the model through `recurrent_lm.core.functional.call`,
which rebuilds it inside the trace: no per-call flattening of the model's
struct. `split_trainable` is the other direction (model -> skeleton + arrays).

The loss and gradient are sums over target tokens divided once by the batch's
token count, so accumulating over microbatches gives the same step as one
large batch. float32 master weights; with ``compute_dtype="bfloat16"`` the
step runs on bfloat16 copies of them (`named_params`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import functional
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.train import data, sharding
from recurrent_lm.train.config import OPTIMIZER_FIELDS, TrainConfig
from recurrent_lm.train.optimizer import make_optimizer

# ---------------------------------------------------------------------------
# The model as a pure function of its trainable arrays.
# ---------------------------------------------------------------------------


def split_trainable(model, mesh, rules):
    """(skeleton, {label: array}, {label: axis names}) of the trainable parameters,
    each array placed on the mesh by the rules."""
    skeleton, params, state = functional.split(model)
    if state:
        raise ValueError(
            f"the model holds state variables ({sorted(state)[:3]}...): train the ordinary"
            " model, not a sampling-mode or activation-capturing one."
        )
    param_axes = {label: tuple(value.named_shape) for label, value in params.items()}
    values = {}
    for label, value in params.items():
        array = value.unwrap(*param_axes[label])
        target = sharding.named_sharding(param_axes[label], array.shape, mesh, rules, what=label)
        values[label] = jax.device_put(array, target)
    return skeleton, values, param_axes


def named_params(param_axes, params, compute_dtype: str | None) -> dict[str, pz.nx.NamedArray]:
    """``{label: NamedArray}`` of raw ``{label: array}``, floating ones cast to
    `compute_dtype` (bfloat16 compute from float32 master weights)."""
    cast = compute_dtype and compute_dtype != "float32"

    def named(label):
        array = params[label]
        if cast and jnp.issubdtype(array.dtype, jnp.floating):
            array = array.astype(compute_dtype)
        return pz.nx.wrap(array).tag(*param_axes[label])

    return {label: named(label) for label in param_axes}


def bind_parameters(skeleton, param_axes, params):
    """The trained model: `skeleton` with ``{label: array}`` as `pz.Parameter`s."""
    return skeleton.bind_variables(
        [
            pz.Parameter(
                label=label, value=pz.nx.wrap(params[label]).tag(*param_axes[label])
            )
            for label in param_axes
        ]
    )


# ---------------------------------------------------------------------------
# Loss and steps.
# ---------------------------------------------------------------------------


def token_losses(logits, tokens, segment_pos):
    """(sum of next-token NLL over target positions, number of targets).

    logits: [batch, seq, vocabulary]; tokens, segment_pos: int32 [batch, seq];
    see `data.loss_mask`.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = data.loss_mask(segment_pos).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_token_losses(model, tokens, segment_pos, chunk_size: int):
    """`token_losses` of `model` on `tokens`, the head applied `chunk_size`
    positions at a time: the [batch, seq, vocabulary] logits never exist whole
    (8 x 8192 positions over a 256k vocabulary would be 67 GB in float32).

    Each chunk's head and cross-entropy run under `jax.checkpoint`, so the
    backward pass recomputes one chunk's logits instead of keeping them all.
    The last chunk starts early enough to fit (no padding) and counts only its
    new positions. One chunk (``seq <= chunk_size``) is the plain form.
    """
    ids, pos = functional.to_tokens(tokens), functional.to_tokens(segment_pos)
    context = DocumentContext.build(pos)
    hidden = model.final_hidden(ids, context)
    steps = tokens.shape[1]
    if steps <= chunk_size:
        logits = model.head(hidden, context=context)
        return token_losses(logits.unwrap(*axes.TOKEN_AXES, axes.VOCABULARY), tokens, segment_pos)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    mask = jnp.pad(data.loss_mask(segment_pos), ((0, 0), (0, 1))).astype(jnp.float32)

    @jax.checkpoint
    def chunk_loss(first):
        start = jnp.minimum(first, steps - chunk_size)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk_size, axis=1)
        h = pz.nx.nmap(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk_size))(
            hidden.untag(axes.SEQ)
        ).tag(axes.SEQ)
        logits = model.head(h, context=context.positions(start, chunk_size))
        logp = jax.nn.log_softmax(
            logits.unwrap(*axes.TOKEN_AXES, axes.VOCABULARY).astype(jnp.float32)
        )
        nll = -jnp.take_along_axis(logp, take(targets)[..., None], axis=-1)[..., 0]
        new = (start + jnp.arange(chunk_size) >= first).astype(jnp.float32)
        weight = take(mask) * new
        return jnp.sum(nll * weight), jnp.sum(weight)

    def add_chunk(carry, first):
        total, count = carry
        loss, n = chunk_loss(first)
        return (total + loss, count + n), None

    firsts = jnp.arange(0, steps, chunk_size)
    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(add_chunk, (zero, zero), firsts)[0]


def make_loss_sum(param_axes, compute_dtype: str, loss_chunk_size: int):
    """loss_sum(params, skeleton, tokens, pos) -> (NLL sum, target count)."""

    def loss_sum(params, skeleton, tokens, pos):
        named = named_params(param_axes, params, compute_dtype)
        model, _ = functional.bind(skeleton, named, {})
        return chunked_token_losses(model, tokens, pos, loss_chunk_size)

    return loss_sum


def make_train_step(loss_sum, optimizer: optax.GradientTransformation):
    """train_step(params, opt_state, skeleton, *batch) -> (params, opt_state,
    metrics).

    `loss_sum(params, skeleton, *microbatch) -> (loss sum, target count)`;
    each array of `batch` is [grad_accum, microbatch, ...] (for text: the
    tokens and segment positions, [grad_accum, microbatch, seq]; other tasks
    bring their own arrays, e.g. `recurrent_lm.synthetics`' labels).
    """
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def accumulate(params, skeleton, batch):
        def micro(carry, microbatch):
            grads, total, count = carry
            (loss, n), g = grad_fn(params, skeleton, *microbatch)
            return (jax.tree.map(jnp.add, grads, g), total + loss, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        if batch[0].shape[0] == 1:
            return micro(init, tuple(x[0] for x in batch))[0]
        return jax.lax.scan(micro, init, batch)[0]

    def train_step(params, opt_state, skeleton, *batch):
        grads, total, count = accumulate(params, skeleton, batch)
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

    return train_step


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    train_step: Any
    """(params, opt_state, skeleton, tokens, pos) -> (params, opt_state, metrics);
    params and opt_state are donated."""
    eval_step: Any
    """(params, skeleton, tokens, pos) -> (NLL sum, target count)."""
    optimizer: optax.GradientTransformation


@functools.lru_cache(maxsize=8)
def _step_functions(cfg_key: tuple, param_axes_items: tuple) -> StepFunctions:
    """Compiled step functions, cached so repeated runs in a process reuse them."""
    cfg = TrainConfig(**dict(cfg_key))
    optimizer = make_optimizer(cfg, dict(param_axes_items))
    loss_sum = make_loss_sum(dict(param_axes_items), cfg.compute_dtype, cfg.loss_chunk_size)
    return StepFunctions(
        train_step=jax.jit(make_train_step(loss_sum, optimizer), donate_argnums=(0, 1)),
        eval_step=jax.jit(loss_sum),
        optimizer=optimizer,
    )


def step_functions(
    cfg: TrainConfig, param_axes: dict[str, tuple[str, ...]]
) -> StepFunctions:
    """The jitted steps of a run with these settings and parameters."""
    keys = (*OPTIMIZER_FIELDS, "decay_steps", "steps", "compute_dtype", "loss_chunk_size")
    cfg_key = tuple((k, getattr(cfg, k)) for k in keys)
    return _step_functions(cfg_key, tuple(sorted(param_axes.items())))
