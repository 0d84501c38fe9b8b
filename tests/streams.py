"""Test helpers: run a temporal layer's state protocol on named inputs.

Each call is one compiled program (context and layer together): run eagerly,
a layer compiles every op for every new chunk length (~25 ms each on CPU).
"""


import jax
import jax.numpy as jnp
import numpy as np
from griffin_cases import on_device
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core.context import DocumentContext


def context(pos, *, stream_offset: int | None = None, documents_before=None) -> DocumentContext:
    """The context of `pos` ({"batch", "seq"} NamedArray or [batch, seq] array);
    with an offset the call continues streams (``new_streams`` False)."""
    if not isinstance(pos, pz.nx.NamedArrayBase):
        pos = pz.nx.wrap(on_device(pos if isinstance(pos, jax.Array) else np.asarray(pos, np.int32))).tag(*axes.TOKEN_AXES)
    batch = pos.named_shape[axes.BATCH]
    as_batch = lambda v: pz.nx.wrap(jnp.broadcast_to(jnp.asarray(v, jnp.int32), (batch,))).tag(axes.BATCH)
    offset = None if stream_offset is None else as_batch(stream_offset)
    documents = None if documents_before is None else as_batch(documents_before)
    if offset is not None and documents is None:
        documents = as_batch(0)
    return DocumentContext.build(pos, stream_offset=offset, documents_before=documents)


def _forward_inline(layer, x, pos, state, stream_offset, documents_before):
    return layer.forward(x, context(pos, stream_offset=stream_offset, documents_before=documents_before), state)


_forward_compiled = pz.variable_jit(_forward_inline)


def _forward(layer, x, pos, state, stream_offset, documents_before):
    inside_a_trace = isinstance(x.data_array, jax.core.Tracer)
    return (_forward_inline if inside_a_trace else _forward_compiled)(
        layer, x, pos, state, stream_offset, documents_before)


def run_fresh(layer, x, pos):
    """``layer.forward`` on fresh streams: ``(y, state after)``."""
    if not isinstance(pos, pz.nx.NamedArrayBase):
        pos = pz.nx.wrap(on_device(pos if isinstance(pos, jax.Array) else np.asarray(pos, np.int32))).tag(*axes.TOKEN_AXES)
    return _forward(layer, x, pos, layer.initial_state(pos.named_shape[axes.BATCH]), None, None)


def run_from(layer, x, pos, state):
    """``layer.forward`` continuing from `state` (at stream offset 0)."""
    return _forward(layer, x, pos, state, 0, None)


def continue_in_pieces(layer, x, pos, bounds, max_length=None):
    """Runs `layer` chunk by chunk (``bounds`` along "seq"), carrying its state."""
    raw = np.asarray(pos.unwrap(*axes.TOKEN_AXES))
    state = layer.initial_state(raw.shape[0], max_length=max_length)
    pieces = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        piece = {axes.SEQ: pz.slice[lo:hi]}
        documents = (raw[:, :lo] == 0).sum(axis=1)
        y, state = _forward(layer, x[piece], pos[piece], state, lo, documents)
        pieces.append(y)
    return pz.nx.concatenate(pieces, axes.SEQ), state
