"""Stateful sampling mode: any model, its temporal layers carrying their state.

    sampler = to_sampling_mode(model, batch_size=2)
    logits = sampler(prompt_chunk_1)      # {"batch", "seq", "vocabulary"}
    logits = sampler(prompt_chunk_2)      # continues the same streams
    logits = sampler(next_tokens)         # decoding is a chunk of length 1

The handler knows no architecture: it wraps every `StatefulLayer` of the model
(found by type with `pz.select`) in the generic `Stateful` wrapper, refuses a
temporal layer without the protocol, and wraps the model in `SamplingLM`, which
owns the stream counters and builds each call's `DocumentContext` from them.
Each call's logits equal those of the ordinary model run on everything fed so
far (packed documents and padding included).

Pure form, for `jax.jit` / `lax.while_loop` (state in, state out)::

    apply, params, state = recurrent_lm.functional(sampler)
    logits, state = apply(params, state, ids)          # ids: int [batch, T]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import model as model_lib
from recurrent_lm.core import sites, stack
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import Stateful, StatefulLayer, TemporalLayer, order_like
from recurrent_lm.layers.attention import Attention


@pz.pytree_dataclass
class SamplingLM(pz.nn.Layer):
    """A model in stateful sampling mode.

    Calling it on tokens {"batch": batch_size, "seq": T} (any T >= 1) continues
    every row's stream and returns logits {"batch", "seq", "vocabulary"}.
    Without ``segment_pos``, positions continue from the previous call (a
    fresh stream starts a document at 0); with it, 0 starts a new document and
    -1 marks padding, exactly as for the ordinary model.

    Attributes:
      model: the model, each temporal layer wrapped in `Stateful`.
      stream_index: {"batch"} int32, tokens consumed so far per row.
      next_position: {"batch"} int32, the default segment position of the
        next token.
      documents: {"batch"} int32, documents started so far per row.
      batch_size: rows (static).
      stream_capacity: the most tokens a stream may hold (global-attention
        caches), or None when unbounded (recurrences, local ring buffers).
    """

    model: model_lib.DecoderLM
    stream_index: pz.StateVariable
    next_position: pz.StateVariable
    documents: pz.StateVariable
    batch_size: int = dataclasses.field(metadata={"pytree_node": False})
    stream_capacity: int | None = dataclasses.field(metadata={"pytree_node": False})

    @property
    def config(self):
        return self.model.config

    # Site names read through the wrapper: a site keeps its ordinary-model name.
    transparent_fields = ("model",)

    def __call__(self, tokens, /, *, segment_pos=None, **side_inputs):
        model_lib.reject_side_inputs(side_inputs, "a sampling-mode model")
        model_lib.check_tokens(tokens, self.config.vocab_size)
        if tokens.named_shape[axes.BATCH] != self.batch_size:
            raise ValueError(
                f"tokens have batch {tokens.named_shape[axes.BATCH]} but this sampling-mode"
                f" model was built for batch_size={self.batch_size}."
            )
        if segment_pos is not None:
            model_lib.check_segment_pos(segment_pos, tokens)
        self._check_capacity(tokens.named_shape[axes.SEQ])
        return model_lib.call_forward(self, tokens, segment_pos)

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

    def forward(self, tokens, segment_pos=None, *, last_position_only: bool = False,
                new_streams: bool = False):
        """Runs the chunk and advances the state.

        Args:
          tokens, segment_pos: as for ``__call__`` (segment_pos may be None).
          last_position_only: compute logits for the last position only (the
            "seq" axis keeps size 1), skipping the vocabulary projection
            elsewhere: all a prefill needs.
          new_streams: start fresh streams with this chunk, discarding the
            state (a command, not a promise: the result is always that of
            fresh streams). Layers then skip reading their state.
        """
        steps = pz.nx.arange(axes.SEQ, tokens.named_shape[axes.SEQ], dtype=jnp.int32)
        if new_streams:
            if segment_pos is None:
                segment_pos = steps.broadcast_like(tokens)
            context = DocumentContext.build(segment_pos)
        else:
            if segment_pos is None:
                segment_pos = self.next_position.value + steps
            context = DocumentContext.build(
                segment_pos,
                stream_offset=self.stream_index.value,
                documents_before=self.documents.value,
            )
        logits = self.model.run(tokens, context, last_position_only)
        last = {axes.SEQ: -1}
        last_pos = segment_pos[last]
        self.stream_index.value = order_like(context.stream_pos[last] + 1, self.stream_index.value)
        self.documents.value = order_like(context.document_id[last], self.documents.value)
        self.next_position.value = order_like(
            pz.nx.nmap(jnp.where)(last_pos >= 0, last_pos + 1, 0).astype(jnp.int32),
            self.next_position.value,
        )
        return logits





def _unsupported_temporal_layers(model) -> list[str]:
    """Layers that mix along "seq" but cannot carry a state, by site name."""
    selection = pz.select(model).at_subtrees_where(
        lambda node: (isinstance(node, TemporalLayer) and not isinstance(node, StatefulLayer))
        or isinstance(node, (pz.nn.Attention, pz.nn.KVCachingAttention))
    )
    return [
        f"{sites.path_name(model, keypath)} ({type(node).__name__})"
        for keypath, node in zip(selection.get_keypaths(), selection.get_sequence())
    ]


def to_sampling_mode(model: model_lib.DecoderLM, *, batch_size: int, max_length: int | None = None) -> SamplingLM:
    """Returns `model` in stateful sampling mode, with empty state.

    Args:
      model: an ordinary (stateless) recurrent_lm model; a scanned one
        (`recurrent_lm.scan_layers`) is unscanned first, so the state labels
        and sites read per layer.
      batch_size: number of rows the state holds.
      max_length: capacity of global-attention caches (which hold the whole
        stream); not needed for recurrences and local (windowed) attention,
        whose state has a fixed size.
    """
    if isinstance(model, SamplingLM):
        raise TypeError("the model is already in sampling mode.")
    if not isinstance(model, model_lib.DecoderLM):
        raise TypeError(f"expected a recurrent_lm model, got {type(model).__name__}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
    model = stack.unscan_layers(model)
    unsupported = _unsupported_temporal_layers(model)
    if unsupported:
        raise TypeError(
            f"these layers mix along 'seq' but do not implement the state protocol"
            f" (recurrent_lm.core.state.StatefulLayer), so sampling mode cannot continue"
            f" their streams: {', '.join(unsupported)}. Implement initial_state and"
            " forward(x, context, state) for them."
        )
    wrapped = (
        pz.select(model)
        .at_instances_of(StatefulLayer)
        .apply(
            lambda keypath, layer: Stateful.wrap(
                layer, batch_size=batch_size, max_length=max_length,
                label="sampler." + sites.path_name(model, keypath),
            ),
            with_keypath=True,
        )
    )
    global_attention = (
        pz.select(model)
        .at_instances_of(Attention)
        .where(lambda layer: layer.window_size is None)
        .count()
    )
    zeros = lambda label: pz.StateVariable(
        pz.nx.zeros({axes.BATCH: batch_size}, jnp.int32), label=f"sampler.{label}"
    )
    return SamplingLM(
        model=wrapped,
        stream_index=zeros("stream_index"),
        next_position=zeros("next_position"),
        documents=zeros("documents"),
        batch_size=batch_size,
        stream_capacity=max_length if global_attention else None,
    )


def to_stateless(sampler: SamplingLM) -> model_lib.DecoderLM:
    """The ordinary model back from a sampling-mode one (same parameters)."""
    return pz.select(sampler.model).at_instances_of(Stateful).apply(lambda wrapper: wrapper.layer)
