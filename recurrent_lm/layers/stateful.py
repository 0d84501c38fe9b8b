"""Stateful twins of temporal layers, and the registry the sampling handler reads.

A twin holds the original layer (its parameters are the same `pz.Parameter`
objects) plus its state in a `pz.StateVariable`, and calls the layer's own
``forward(x, ..., state) -> (y, new_state)``: the math is written once, and a
call on a chunk of any length continues the stream.

Side inputs of the sampling wrapper (`recurrent_lm.sampling.SamplingLM`),
besides ``segment_pos``:

* ``stream_pos`` int {"batch", "seq"}: the position of each token in the whole
  stream (pads included), for attention windows and cache slots;
* ``document_id`` int {"batch", "seq"}: how many documents have started in the
  stream up to each token, so that attention never crosses a document start;
* ``state_is_empty`` (static bool, default False): the caller guarantees the
  state is the initial one (a prefill of fresh streams), so twins may skip
  reading it.

Architectures register the twins of their temporal layers with
`register_twins`; `to_sampling_mode` swaps every registered layer type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import attention, conv, positions, rg_lru, sites


@dataclasses.dataclass(frozen=True)
class TwinContext:
    """What a twin factory needs to size its state.

    Attributes:
      batch_size: rows of the sampling batch.
      max_length: capacity of caches that must hold the whole stream (global
        attention); None when the caller gave none.
      label: a unique label for the twin's state variable.
    """

    batch_size: int
    max_length: int | None
    label: str


TwinFactory = Callable[[pz.nn.Layer, TwinContext], pz.nn.Layer]
_TWINS: dict[type, TwinFactory] = {}


def register_twins(twins: Mapping[type, TwinFactory]) -> None:
    """Registers ``{layer type: factory(layer, context) -> stateful twin}``."""
    _TWINS.update(twins)


def registered_twins() -> dict[type, TwinFactory]:
    return dict(_TWINS)


class StatefulTwin(pz.nn.Layer):
    """Base of every stateful twin: it wraps the ordinary layer as ``layer``."""

    layer: pz.nn.Layer


sites.register_transparent_fields(StatefulTwin, "layer")


def write_state(variable: pz.StateVariable, value) -> None:
    """Stores a twin's new state, in the axis order of the old one."""
    # Keep the axis order of the state fixed: it is a while-loop carry.
    variable.value = pz.nx.order_like(value, variable.value)


_write_state = write_state


def require_side_input(value, name: str, layer: str):
    if value is None:
        raise ValueError(
            f"{layer} is a sampling-mode layer and needs the side input {name}; call it"
            " through the SamplingLM returned by recurrent_lm.sampling.to_sampling_mode."
        )
    return value


@pz.pytree_dataclass
class StatefulConv1D(StatefulTwin):
    """`CausalConv1D` that carries its last K-1 inputs between calls.

    State: ``history`` {"batch", "conv_taps": K-1, axis}, in the parameter
    dtype, zeroed where a document starts after an entry (so the next call
    applies the same document cuts as one call over the whole stream).
    """

    layer: conv.CausalConv1D
    history: pz.StateVariable

    @classmethod
    def from_layer(cls, layer: conv.CausalConv1D, context: TwinContext) -> StatefulConv1D:
        history = layer.empty_history({axes.BATCH: context.batch_size})
        return cls(layer=layer, history=pz.StateVariable(history, label=context.label))

    def __call__(self, x, *, segment_pos=None, **_unused_side_inputs):
        segment_pos = positions.require_segment_pos(segment_pos, "StatefulConv1D")
        y, history = self.layer.forward(x, segment_pos, self.history.value)
        _write_state(self.history, history)
        return y


@pz.pytree_dataclass
class StatefulRGLRU(StatefulTwin):
    """`RGLRU` that carries its hidden state between calls.

    State: ``hidden`` {"batch", "lru"}, float32 whatever the parameter dtype.
    """

    layer: rg_lru.RGLRU
    hidden: pz.StateVariable

    @classmethod
    def from_layer(cls, layer: rg_lru.RGLRU, context: TwinContext) -> StatefulRGLRU:
        width = layer.a_param.value.named_shape[axes.LRU]
        hidden = pz.nx.zeros({axes.BATCH: context.batch_size, axes.LRU: width}, jnp.float32)
        return cls(layer=layer, hidden=pz.StateVariable(hidden, label=context.label))

    def __call__(self, x, *, segment_pos=None, **_unused_side_inputs):
        segment_pos = positions.require_segment_pos(segment_pos, "StatefulRGLRU")
        y, hidden = self.layer.forward(x, segment_pos, self.hidden.value)
        _write_state(self.hidden, hidden)
        return y


@pz.pytree_dataclass
class KVCache(pz.Struct):
    """Keys and values of the last `slots` tokens, in a ring buffer.

    Slot ``i % slots`` holds token ``i`` of the stream. Keys are stored after
    RoPE. ``index`` is the stream index of each slot's token (-1: empty);
    ``document`` its document id.

    Named axes: keys, values {"batch", "kv_heads", "projection", "kv_seq"};
    index, document {"batch", "kv_seq"}. "kv_seq" is stored last: a one-token
    write is then an in-place update and attention reads the keys without a
    transposed copy (measured on XLA:CPU decoding).
    """

    keys: pz.nx.NamedArray
    values: pz.nx.NamedArray
    index: pz.nx.NamedArray
    document: pz.nx.NamedArray

    @classmethod
    def empty(cls, batch_size: int, slots: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        kv_shape = {axes.BATCH: batch_size, axes.KV_HEADS: kv_heads, axes.PROJECTION: head_dim,
                    axes.KV_SEQ: slots}
        slot_shape = {axes.BATCH: batch_size, axes.KV_SEQ: slots}
        return cls(
            keys=pz.nx.zeros(kv_shape, dtype),
            values=pz.nx.zeros(kv_shape, dtype),
            index=pz.nx.full(slot_shape, -1, jnp.int32),
            document=pz.nx.zeros(slot_shape, jnp.int32),
        )

    @property
    def slots(self) -> int:
        return self.index.named_shape[axes.KV_SEQ]

    def write(self, keys, values, index, document) -> KVCache:
        """Stores new tokens ({"kv_seq": T} each) at slots ``index % slots``."""
        slots = self.slots
        steps = index.named_shape[axes.KV_SEQ]
        if steps > slots:  # only the last `slots` tokens survive
            keep = {axes.KV_SEQ: pz.slice[steps - slots :]}
            keys, values, index, document = (t[keep] for t in (keys, values, index, document))

        def put(buffer, new, idx):
            return buffer.at[idx % slots].set(new.astype(buffer.dtype))

        def scatter(buffer, new):
            return pz.nx.nmap(put)(buffer.untag(axes.KV_SEQ), new.untag(axes.KV_SEQ),
                                   index.untag(axes.KV_SEQ)).tag(axes.KV_SEQ)

        return KVCache(
            keys=scatter(self.keys, keys),
            values=scatter(self.values, values),
            index=scatter(self.index, index),
            document=scatter(self.document, document),
        )


@pz.pytree_dataclass
class CachedAttention(StatefulTwin):
    """`Attention` over a KV cache: a ring buffer of the window (W + 1 slots:
    the W previous tokens and the current one) for local attention, or a cache
    of ``max_length`` slots for global attention.

    A chunk attends over the cached tokens plus itself (so a chunk of any
    length continues the stream), then is written into the cache. A single
    token (decoding) is written first and attends over the cache alone, which
    saves copying the cache into a concatenation every step.
    Side inputs: ``segment_pos``, ``stream_pos``, ``document_id``.
    """

    layer: attention.Attention
    cache: pz.StateVariable

    @classmethod
    def from_layer(cls, layer: attention.Attention, context: TwinContext) -> CachedAttention:
        if layer.window_size is not None:
            slots = layer.window_size + 1
        elif context.max_length is not None:
            slots = context.max_length
        else:
            raise ValueError(
                "the model has global attention layers, whose cache holds the whole"
                " stream: pass max_length to to_sampling_mode."
            )
        kv_axes, dtype = layer.key_spec()
        cache = KVCache.empty(
            context.batch_size, slots, kv_axes[axes.KV_HEADS], kv_axes[axes.PROJECTION], dtype
        )
        return cls(layer=layer, cache=pz.StateVariable(cache, label=context.label))

    @property
    def holds_whole_stream(self) -> bool:
        """True for global attention: the stream may not outgrow the cache."""
        return self.layer.window_size is None

    def __call__(self, x, *, segment_pos=None, stream_pos=None, document_id=None,
                 state_is_empty: bool = False, **_unused_side_inputs):
        segment_pos = positions.require_segment_pos(segment_pos, "CachedAttention")
        stream_pos = require_side_input(stream_pos, "stream_pos", "CachedAttention")
        document_id = require_side_input(document_id, "document_id", "CachedAttention")
        cache: KVCache = self.cache.value
        q, k, v = self.layer.project(x, segment_pos)
        k, v = attention.to_kv_seq(k), attention.to_kv_seq(v)
        new_index, new_document = attention.to_kv_seq(stream_pos), attention.to_kv_seq(document_id)
        updated = cache.write(k, v, new_index, new_document)
        if state_is_empty:
            # A fresh stream (the caller knows): nothing cached to attend to.
            keys, values, index, document = k, v, new_index, new_document
        elif x.named_shape[axes.SEQ] == 1:
            # Every slot the token may see survives its own write.
            keys, values, index, document = updated.keys, updated.values, updated.index, updated.document
        else:
            join = lambda old, new: pz.nx.concatenate([old, new.astype(old.dtype)], axes.KV_SEQ)
            keys, values = join(cache.keys, k), join(cache.values, v)
            index, document = join(cache.index, new_index), join(cache.document, new_document)
        mask = attention.attention_mask(stream_pos, document_id, index, document, self.layer.window_size)
        out = self.layer.attend(q, keys, values, mask)
        _write_state(self.cache, updated)
        return out

