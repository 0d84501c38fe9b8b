"""A model as a pure function of its variables: one form for jit, sampling,
decoding and training.

    apply, params, state = functional(model)
    logits, state = apply(params, state, ids)               # ids: int [batch, seq]
    logits, state = apply(params, state, ids, segment_pos, last_position_only=True)

``params`` is ``{label: NamedArray}`` (what optax updates, what sharding rules
place); ``state`` is ``{label: value}``: a sampling-mode model's caches and
stream counters, or an interpretability capture's records (empty for a plain
model). `apply` takes and returns raw arrays (the jit boundary: no pytree
flattening of the model per call) and rebuilds the model inside the trace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import model as model_lib


def split(model) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(skeleton, params, state)``: `model` without its variables, and their values.

    The skeleton holds no arrays (static leaves only), so passing it to a
    jitted function costs nothing.
    """
    stateless, state_values = pz.unbind_state_vars(model, freeze=True)
    skeleton, param_values = pz.unbind_params(stateless, freeze=True)
    return (
        skeleton,
        {p.label: p.value for p in param_values},
        {v.label: v.value for v in state_values},
    )


def bind(skeleton, params: dict[str, Any], state: dict[str, Any]):
    """``(model, variables)``: `skeleton` with `params` and fresh mutable state
    variables (``{label: pz.StateVariable}``, read back after a call)."""
    variables = {label: pz.StateVariable(value, label=label) for label, value in state.items()}
    model = skeleton.bind_variables(
        [pz.ParameterValue(label=label, value=value) for label, value in params.items()]
        + list(variables.values())
    )
    return model, variables


def to_tokens(ids) -> pz.nx.NamedArray:
    return pz.nx.wrap(jnp.asarray(ids)).tag(*axes.TOKEN_AXES)


def call(skeleton, params, state, ids, segment_pos=None, **options):
    """One call of the model `split` into `skeleton`, `params` and `state`:
    ``(logits, new_state)`` (see `functional`)."""
    bound, variables = bind(skeleton, params, state)
    pos = None if segment_pos is None else to_tokens(segment_pos)
    logits = bound.forward(to_tokens(ids), pos, **options)
    new_state = {label: variable.value for label, variable in variables.items()}
    return logits.unwrap(*axes.TOKEN_AXES, axes.VOCABULARY), new_state


def functional(model) -> tuple[Callable, dict[str, Any], dict[str, Any]]:
    """``(apply, params, state)``: `model` as a pure function.

    ``apply(params, state, ids, segment_pos=None, **options) -> (logits,
    state)``: ids and segment_pos are int arrays [batch, seq]; logits are
    [batch, seq, vocabulary]; options go to ``model.forward`` (e.g.
    ``last_position_only=True``; ``new_streams=True`` for a sampling-mode
    model). No host checks run inside: validate inputs before (see
    `jit_forward`); an id outside the vocabulary gives NaN logits in its row
    (`recurrent_lm.layers.embeddings.EmbeddingLookup`). `apply` is `call`
    with the model's skeleton bound.
    """
    skeleton, params, state = split(model)
    return functools.partial(call, skeleton), params, state


def jit_forward(model: model_lib.DecoderLM) -> Callable[..., jax.Array]:
    """A compiled ``f(ids, segment_pos=None) -> logits`` on raw arrays.

    ``ids`` and ``segment_pos`` are int arrays [batch, seq]; the result is
    [batch, seq, vocabulary]. The parameters are arguments of the compiled
    function (not baked-in constants). Token ids are range-checked on the
    host before each call.
    """
    apply, params, state = functional(model)
    run = jax.jit(lambda params, ids, pos: apply(params, state, ids, pos)[0])
    vocab_size = model.config.vocab_size

    def compiled(ids, segment_pos=None):
        ids = jnp.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, seq], got shape {ids.shape}.")
        model_lib.check_tokens(to_tokens(ids), vocab_size)
        if segment_pos is not None:
            segment_pos = jnp.asarray(segment_pos)
            if segment_pos.shape != ids.shape:
                raise ValueError(
                    f"segment_pos has shape {segment_pos.shape}, ids {ids.shape}; they must match."
                )
        return run(params, ids, segment_pos)

    return compiled
