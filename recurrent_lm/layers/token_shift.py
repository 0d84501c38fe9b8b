"""RWKV's token shift: each position sees the previous position's features."""

from __future__ import annotations

import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import positions


def token_shift(
    x: pz.nx.NamedArray,
    segment_pos: pz.nx.NamedArray,
    previous: pz.nx.NamedArray | None,
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """``shifted[t] = x[t - 1]``, continuing from `previous`, cut at document starts.

    Args:
      x: {..., "seq", features}.
      segment_pos: {"batch", "seq"}; where a document starts (0) the shifted
        value is 0, as at the start of a stream: packed documents never see
        each other.
      previous: {..., features}, the last input of the previous call (None:
        zeros, a fresh stream).

    Returns:
      ``(shifted, last)``: `shifted` like `x`; `last` = ``x[-1]``, the
      `previous` of a call that continues the stream.
    """
    last = x[{axes.SEQ: -1}]
    if previous is None:
        previous = pz.nx.zeros(dict(last.named_shape), x.dtype)
    previous = previous.astype(x.dtype)[{axes.SEQ: None}]
    steps = x.named_shape[axes.SEQ]
    if steps == 1:
        shifted = previous
    else:
        shifted = pz.nx.concatenate(
            [previous, x[{axes.SEQ: pz.slice[: steps - 1]}]], axes.SEQ
        )
    starts = positions.document_starts(segment_pos)
    shifted = pz.nx.nmap(jnp.where)(starts, jnp.zeros((), x.dtype), shifted)
    return shifted, last
