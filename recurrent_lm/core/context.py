"""The document context: where documents start, computed once per model call.

Every model takes ``segment_pos``, a NamedArray {"batch", "seq"} of int32:
0 marks the first token of a document, k the k-th token after it, and a
negative value (-1) marks padding. Recurrences reset where a document starts;
attention never crosses a document start; padding is never a reset.

The model turns ``segment_pos`` into a `DocumentContext` once, at its top, and
passes it to every layer as the side input ``context``: layers read the reset
flags, document ids and stream positions from it and never recompute them.
Sampling mode builds the same context from its stream counters, so a layer
cannot tell a chunk of a stream from the whole stream.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes

# `since_start` where no document started in the call: larger than any lag.
NO_START_IN_CALL = 2**30


def default_segment_pos(tokens: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """Positions 0..T-1 in every row: one document per row, no padding."""
    seq_len = tokens.named_shape[axes.SEQ]
    return pz.nx.arange(axes.SEQ, seq_len, dtype=jnp.int32).broadcast_like(tokens)


def _scan_along_seq(fn, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    # An associative scan: cumsum / cummax along "seq" lower to reduce_window,
    # which XLA:CPU runs in O(T^2) (JAX 0.10).
    return pz.nx.nmap(lambda v: jax.lax.associative_scan(fn, v))(x.untag(axes.SEQ)).tag(axes.SEQ)


@pz.pytree_dataclass
class DocumentContext(pz.Struct):
    """How the tokens of one call sit in their documents and streams.

    Every field is an int or bool NamedArray {"batch", "seq"}.

    Attributes:
      segment_pos: position within the document (-1: padding); RoPE reads it.
      starts: True where a document starts (``segment_pos == 0``): where
        recurrences reset and causal filters are cut.
      since_start: tokens since the latest document start in this call (0 at a
        start); `NO_START_IN_CALL` where no document started in the call up to
        the token, so every earlier token (the state) is still reachable. A
        causal filter's lag-l tap at t is live iff ``l <= since_start[t]``.
      document_id: documents started in the stream up to each token
        (attention never crosses ids).
      stream_pos: the index of each token in its stream, pads included
        (attention windows and cache slots).
      new_streams: static; True when the state before this call is the initial
        state (an ordinary forward pass, or a sampling call that starts fresh
        streams), so layers may skip reading it.
    """

    segment_pos: pz.nx.NamedArray
    starts: pz.nx.NamedArray
    since_start: pz.nx.NamedArray
    document_id: pz.nx.NamedArray
    stream_pos: pz.nx.NamedArray
    new_streams: bool = dataclasses.field(default=True, metadata={"pytree_node": False})

    @classmethod
    def build(
        cls,
        segment_pos: pz.nx.NamedArray,
        *,
        stream_offset: pz.nx.NamedArray | None = None,
        documents_before: pz.nx.NamedArray | None = None,
    ) -> DocumentContext:
        """The context of one call.

        Args:
          segment_pos: int {"batch", "seq"}.
          stream_offset: int {"batch"}, tokens of each stream before this call
            (None: fresh streams).
          documents_before: int {"batch"}, documents started in each stream
            before this call (None: fresh streams).
        """
        steps = segment_pos.named_shape[axes.SEQ]
        index = pz.nx.arange(axes.SEQ, steps, dtype=jnp.int32)
        starts = segment_pos == 0
        last_start = _scan_along_seq(jnp.maximum, pz.nx.nmap(jnp.where)(starts, index, -1))
        since_start = pz.nx.nmap(jnp.where)(last_start >= 0, index - last_start, NO_START_IN_CALL)
        document_id = _scan_along_seq(jnp.add, starts.astype(jnp.int32))
        stream_pos = index.broadcast_like(segment_pos)
        fresh = stream_offset is None and documents_before is None
        if stream_offset is not None:
            stream_pos = stream_pos + stream_offset
        if documents_before is not None:
            document_id = document_id + documents_before
        return cls(
            segment_pos=segment_pos,
            starts=starts,
            since_start=since_start.astype(jnp.int32),
            document_id=document_id,
            stream_pos=stream_pos,
            new_streams=fresh,
        )

    @classmethod
    def for_tokens(cls, tokens: pz.nx.NamedArray) -> DocumentContext:
        """One document per row, fresh streams (for calling a layer by hand)."""
        return cls.build(default_segment_pos(tokens))

    @property
    def steps(self) -> int:
        return self.segment_pos.named_shape[axes.SEQ]

    def positions(self, start, size: int) -> DocumentContext:
        """The context of positions ``start .. start + size - 1`` (`start` may be
        traced: a loss that applies the head a chunk of positions at a time)."""

        def take(x):
            return pz.nx.nmap(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size))(
                x.untag(axes.SEQ)
            ).tag(axes.SEQ)

        fields = ("segment_pos", "starts", "since_start", "document_id", "stream_pos")
        return dataclasses.replace(self, **{f: take(getattr(self, f)) for f in fields})


def require_context(context, layer: str) -> DocumentContext:
    """`context`, or a clear error for a layer called without one."""
    if not isinstance(context, DocumentContext):
        raise ValueError(
            f"{layer} needs the side input context=DocumentContext (got"
            f" {type(context).__name__}); call it through a model, or pass"
            " context=recurrent_lm.core.context.DocumentContext.build(segment_pos)."
        )
    return context
