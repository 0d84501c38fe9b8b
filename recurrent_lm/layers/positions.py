"""Segment positions: how packed documents and padding are described.

Every model takes ``segment_pos``, a NamedArray {"batch", "seq"} of int32:
0 marks the first token of a document, k the k-th token after it, and a
negative value (-1) marks padding. Recurrences reset where ``segment_pos == 0``;
attention never crosses a document start; padding is never a reset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes


def require_segment_pos(segment_pos, layer: str) -> pz.nx.NamedArray:
    if segment_pos is None:
        raise ValueError(
            f"{layer} needs the side input segment_pos (NamedArray {{'batch',"
            " 'seq'}}); call it through a model, or pass segment_pos=... ."
        )
    return segment_pos


def default_segment_pos(tokens: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """Positions 0..T-1 in every row: one document per row, no padding."""
    seq_len = tokens.named_shape[axes.SEQ]
    return pz.nx.arange(axes.SEQ, seq_len, dtype=jnp.int32).broadcast_like(tokens)


def document_starts(segment_pos: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """Boolean {"batch", "seq"}: True where a document starts."""
    return segment_pos == 0


def segment_ids(segment_pos: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """int32 {"batch", "seq"}: how many documents have started up to each token.

    Left padding before the first document gets id 0. Computed with an
    associative scan: `jnp.cumsum` is O(T^2) on XLA:CPU in JAX 0.10.
    """
    starts = document_starts(segment_pos).astype(jnp.int32)
    return pz.nx.nmap(
        lambda s: jax.lax.associative_scan(jnp.add, s)
    )(starts.untag(axes.SEQ)).tag(axes.SEQ)
