"""Stateful sampling mode: any model, with its temporal layers swapped for twins.

    sampler = to_sampling_mode(model, batch_size=2)
    logits = sampler(prompt_chunk_1)      # {"batch", "seq", "vocabulary"}
    logits = sampler(prompt_chunk_2)      # continues the same streams
    logits = sampler(next_tokens)         # decoding is a chunk of length 1

The handler knows no architecture: it swaps every layer whose type an
architecture registered with `recurrent_lm.layers.stateful.register_twins`
(found with `pz.select`), and wraps the model in `SamplingLM`, which owns the
stream positions. Each call's logits equal those of the ordinary model run on
everything fed so far (packed documents and padding included).

Functional form, for `jax.jit` / `lax.while_loop` (state in, state out)::

    step, params, state = functional(sampler)
    logits, state = step(params, state, ids)          # ids: int [batch, T]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import positions, sites, stateful
from recurrent_lm.models import base


@pz.pytree_dataclass
class SamplingLM(pz.nn.Layer):
    """A model in stateful sampling mode.

    Calling it on tokens {"batch": batch_size, "seq": T} (any T >= 1) continues
    every row's stream and returns logits {"batch", "seq", "vocabulary"}.
    Without ``segment_pos``, positions continue from the previous call (a
    fresh stream starts a document at 0); with it, 0 starts a new document and
    -1 marks padding, exactly as for the ordinary model.

    Attributes:
      model: the model, its temporal layers replaced by stateful twins.
      stream_index: {"batch"} int32, tokens consumed so far per row.
      next_position: {"batch"} int32, the default segment position of the
        next token.
      documents: {"batch"} int32, documents started so far per row.
      batch_size: rows (static).
      stream_capacity: the most tokens a stream may hold (global-attention
        caches), or None when unbounded (recurrences, local ring buffers).
    """

    model: base.DecoderLM
    stream_index: pz.StateVariable
    next_position: pz.StateVariable
    documents: pz.StateVariable
    batch_size: int = dataclasses.field(metadata={"pytree_node": False})
    stream_capacity: int | None = dataclasses.field(metadata={"pytree_node": False})

    @property
    def config(self):
        return self.model.config

    def __call__(self, tokens, /, *, segment_pos=None, **side_inputs):
        if side_inputs:
            raise TypeError(
                f"unknown keyword arguments {sorted(side_inputs)}; a sampling-mode model"
                " takes tokens and optionally segment_pos."
            )
        base.check_tokens(tokens, self.config.vocab_size)
        if tokens.named_shape[axes.BATCH] != self.batch_size:
            raise ValueError(
                f"tokens have batch {tokens.named_shape[axes.BATCH]} but this sampling-mode"
                f" model was built for batch_size={self.batch_size}."
            )
        if segment_pos is not None:
            base.check_segment_pos(segment_pos, tokens)
        self._check_capacity(tokens.named_shape[axes.SEQ])
        return base.call_forward(self, tokens, segment_pos)

    def _check_capacity(self, steps: int) -> None:
        index = self.stream_index.value.data_array
        if self.stream_capacity is None or isinstance(index, jax.core.Tracer):
            return
        longest = int(jnp.max(index)) + steps
        if longest > self.stream_capacity:
            raise ValueError(
                f"this call would make the stream {longest} tokens long, but the global"
                f" attention caches hold {self.stream_capacity} (max_length); build the"
                " sampling mode with a larger max_length."
            )

    def forward(self, tokens, segment_pos=None, last_position_only: bool = False,
                state_is_empty: bool = False):
        """Runs the chunk and advances the state.

        Args:
          tokens, segment_pos: as for ``__call__`` (segment_pos may be None).
          last_position_only: compute logits for the last position only (the
            "seq" axis keeps size 1), skipping the vocabulary projection
            elsewhere: all a prefill needs.
          state_is_empty: promise that the state is the initial one (fresh
            streams), so that layers skip reading it. A wrong promise gives
            wrong results; only the generation prefill makes it.
        """
        steps = pz.nx.arange(axes.SEQ, tokens.named_shape[axes.SEQ], dtype=jnp.int32)
        if segment_pos is None:
            segment_pos = self.next_position.value + steps
        document_id = self.documents.value + positions.segment_ids(segment_pos)
        logits = self.model.forward(
            tokens,
            segment_pos,
            last_position_only=last_position_only,
            stream_pos=self.stream_index.value + steps,
            document_id=document_id,
            state_is_empty=state_is_empty,
        )
        last = {axes.SEQ: -1}
        last_pos = segment_pos[last]
        self.stream_index.value = self.stream_index.value + tokens.named_shape[axes.SEQ]
        self.documents.value = pz.nx.order_like(document_id[last], self.documents.value)
        self.next_position.value = pz.nx.order_like(
            pz.nx.nmap(jnp.where)(last_pos >= 0, last_pos + 1, 0).astype(jnp.int32),
            self.next_position.value,
        )
        return logits


sites.register_transparent_fields(SamplingLM, "model")


def _twin_factory(layer, twins) -> Callable | None:
    for cls in type(layer).__mro__:
        if cls in twins:
            return twins[cls]
    return None


def to_sampling_mode(model: base.DecoderLM, *, batch_size: int, max_length: int | None = None) -> SamplingLM:
    """Returns `model` in stateful sampling mode, with empty state.

    Args:
      model: an ordinary (stateless) recurrent_lm model.
      batch_size: number of rows the state holds.
      max_length: capacity of global-attention caches (which hold the whole
        stream); not needed for recurrences and local (windowed) attention,
        whose state has a fixed size.
    """
    if isinstance(model, SamplingLM):
        raise TypeError("the model is already in sampling mode.")
    if not isinstance(model, base.DecoderLM):
        raise TypeError(f"expected a recurrent_lm model, got {type(model).__name__}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
    twins = stateful.registered_twins()

    def swap(keypath, layer):
        label = "sampler" + pz.pretty_keystr(keypath, model)
        context = stateful.TwinContext(batch_size=batch_size, max_length=max_length, label=label)
        return _twin_factory(layer, twins)(layer, context)

    swapped = (
        pz.select(model)
        .at_subtrees_where(lambda node: _twin_factory(node, twins) is not None)
        .apply(swap, with_keypath=True)
    )
    global_caches = (
        pz.select(swapped)
        .at_instances_of(stateful.CachedAttention)
        .where(lambda layer: layer.holds_whole_stream)
        .count()
    )
    zeros = lambda label: pz.StateVariable(
        pz.nx.zeros({axes.BATCH: batch_size}, jnp.int32), label=f"sampler.{label}"
    )
    return SamplingLM(
        model=swapped,
        stream_index=zeros("stream_index"),
        next_position=zeros("next_position"),
        documents=zeros("documents"),
        batch_size=batch_size,
        stream_capacity=max_length if global_caches else None,
    )


def to_stateless(sampler: SamplingLM) -> base.DecoderLM:
    """The ordinary model back from a sampling-mode one (same parameters)."""
    return (
        pz.select(sampler.model)
        .at_instances_of(stateful.StatefulTwin)
        .apply(lambda twin: twin.layer)
    )


def functional(sampler: SamplingLM) -> tuple[Callable, Any, Any]:
    """``(step, params, state)``: a pure form of `sampler` for jit and loops.

    ``step(params, state, ids, segment_pos=None, last_position_only=False) ->
    (logits, state)`` takes and returns raw arrays: ids and segment_pos are int
    [batch, T]; logits are [batch, T, vocabulary] (T = 1 with
    `last_position_only`). ``params`` and ``state`` are tuples of frozen variable
    values (pytrees), to pass through `jax.jit` and to carry in
    `lax.while_loop`. No host checks run inside: validate inputs before.
    """
    skeleton, params, state = split(sampler)
    return functools.partial(pure_step, skeleton), params, state


def split(sampler: SamplingLM):
    """``(skeleton, params, state)``: the sampler without its variables, and their
    frozen values. The skeleton holds no arrays (a pytree with static leaves
    only), so it can be passed to a jitted function at no cost."""
    stateless, state = pz.unbind_state_vars(sampler, freeze=True)
    skeleton, params = pz.unbind_params(stateless, freeze=True)
    return skeleton, params, state


def pure_step(skeleton, params, state, ids, segment_pos=None, last_position_only=False,
              state_is_empty=False):
    """One call of the sampling-mode model on raw arrays: ``(logits, state)``.

    See `functional`; `state_is_empty` is `SamplingLM.forward`'s promise.
    """
    tokens = pz.nx.wrap(ids).tag(*axes.TOKEN_AXES)
    pos = None if segment_pos is None else pz.nx.wrap(segment_pos).tag(*axes.TOKEN_AXES)
    runner = _Forward(skeleton.bind_variables(params), last_position_only, state_is_empty)
    logits, state = runner.stateless_call(state, tokens, segment_pos=pos)
    return logits.unwrap(*axes.TOKEN_AXES, axes.VOCABULARY), state


@pz.pytree_dataclass
class _Forward(pz.nn.Layer):
    """Adapter: `stateless_call` runs a layer's ``__call__``; this runs ``forward``."""

    sampler: SamplingLM
    last_position_only: bool = dataclasses.field(metadata={"pytree_node": False})
    state_is_empty: bool = dataclasses.field(default=False, metadata={"pytree_node": False})

    def __call__(self, tokens, *, segment_pos=None, **_unused_side_inputs):
        return self.sampler.forward(tokens, segment_pos, self.last_position_only, self.state_is_empty)
