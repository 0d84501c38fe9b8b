"""Causal self-attention: multi-head, multi-query or grouped-query, global or local."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.core.context import DocumentContext, require_context
from recurrent_lm.core.state import StatefulLayer
from recurrent_lm.layers import linear
from recurrent_lm.layers import rope as rope_lib

# Finite fill for masked logits (the official Griffin value): a fully masked row
# becomes uniform instead of NaN.
MASKED_LOGIT = -2.3819763e38


def attention_probs(q, k, mask, *, query_scale: float, logits_soft_cap: float | None, dtype):
    """Attention weights for one row, on positional arrays.

    Args:
      q: [T, H, D] queries; head h uses key/value head ``h // (H / KV)``.
      k: [S, KV, D] keys.
      mask: [T, S] bool, True where a query may attend to a key.
      query_scale: multiplies the query-key products.
      logits_soft_cap: if set, ``cap * tanh(logits / cap)`` before masking.
      dtype: dtype of the result (the values' dtype).

    Returns:
      [H, T, S]; the softmax runs in float32.
    """
    steps, heads, dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(steps, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum("tkgd,skd->kgts", q, k) * query_scale
    if logits_soft_cap:
        logits = jnp.tanh(logits / logits_soft_cap) * logits_soft_cap
    logits = jnp.where(mask, logits, MASKED_LOGIT).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return probs.reshape(heads, steps, -1)


def mix_values(probs, v):
    """[H, T, S] weights times [S, KV, D] values -> [T, H, D]."""
    heads, steps, keys = probs.shape
    kv_heads = v.shape[1]
    probs = probs.reshape(kv_heads, heads // kv_heads, steps, keys)
    return jnp.einsum("kgts,skd->tkgd", probs, v).reshape(steps, heads, v.shape[-1])


def attend(q, k, v, mask, *, query_scale: float, logits_soft_cap: float | None):
    """Softmax attention for one row, on positional arrays: q [T, H, D], k and
    v [S, KV, D], mask [T, S] -> [T, H, D] in the dtype of `v` (see
    `attention_probs`)."""
    probs = attention_probs(
        q, k, mask, query_scale=query_scale, logits_soft_cap=logits_soft_cap, dtype=v.dtype
    )
    return mix_values(probs, v)


def attention_mask(
    q_index: pz.nx.NamedArray,
    q_document: pz.nx.NamedArray,
    k_index: pz.nx.NamedArray,
    k_document: pz.nx.NamedArray,
    window_size: int | None,
) -> pz.nx.NamedArray:
    """Which keys each query sees, from stream indices and document ids.

    Query n sees key m iff m is a real slot (index >= 0), both are in the same
    document, ``m <= n``, and (with a window W) ``n - m <= W``: W + 1 keys
    including itself, as in the official Griffin. Indices count tokens in the
    stream (pads included), so left padding does not shift the window.

    Args:
      q_index, q_document: int {..., "seq"}.
      k_index, k_document: int {..., "kv_seq"}; index -1 marks an empty slot.

    Returns:
      bool {..., "seq", "kv_seq"}.
    """
    mask = (q_document == k_document) & (k_index <= q_index) & (k_index >= 0)
    if window_size is not None:
        mask = mask & (q_index - k_index <= window_size)
    return mask


def to_kv_seq(x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """Renames "seq" to "kv_seq" (queries and keys laid out in the same time)."""
    return x.untag(axes.SEQ).tag(axes.KV_SEQ)


def causal_mask(context: DocumentContext, window_size: int | None) -> pz.nx.NamedArray:
    """Boolean {"batch", "seq", "kv_seq"} mask of one call over its own tokens
    (see `attention_mask`)."""
    index, document = context.stream_pos, context.document_id
    return attention_mask(index, document, to_kv_seq(index), to_kv_seq(document), window_size)


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
class Attention(StatefulLayer):
    """Causal self-attention with rotary positions and an optional window.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"}.
    Side input: ``context`` (document cuts, RoPE positions, stream positions).
    State: a `KVCache`: a ring buffer of the window (W + 1 slots: the W
    previous tokens and the current one) for local attention, or
    ``max_length`` slots for global attention (the whole stream).
    Sublayers: ``query`` {"embedding"} -> {"heads", "projection"}; ``key``,
    ``value`` {"embedding"} -> {"kv_heads", "projection"}; ``output``
    {"heads", "projection"} -> {"embedding"}; ``rope`` (or None).
    Static: ``window_size`` (None = global), ``query_scale``,
    ``logits_soft_cap`` (None = off).
    Sites: ``pattern`` (attention weights {..., "heads", "seq", "kv_seq"}) and
    ``head_outputs`` (each head's mix of values {..., "seq", "heads",
    "projection"}, before the output projection).
    """

    query: pz.nn.Layer
    key: pz.nn.Layer
    value: pz.nn.Layer
    output: pz.nn.Layer
    rope: rope_lib.RotaryEmbedding | None
    window_size: int | None = dataclasses.field(metadata={"pytree_node": False})
    query_scale: float = dataclasses.field(metadata={"pytree_node": False})
    logits_soft_cap: float | None = dataclasses.field(
        default=None, metadata={"pytree_node": False}
    )
    pattern: sites.Hook = sites.site_field()
    head_outputs: sites.Hook = sites.site_field()

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, *, width: int, num_heads: int,
                    num_kv_heads: int, head_dim: int, window_size: int | None, rotary_fraction: float,
                    rope_max_wavelength: float, query_scale: float | None = None,
                    logits_soft_cap: float | None = None, qkv_bias: bool = False, output_bias: bool = True,
                    output_init_scale: float = 1.0, dtype=jnp.float32) -> Attention:
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}."
            )
        embed = {axes.EMBEDDING: width}
        q_axes = {axes.HEADS: num_heads, axes.PROJECTION: head_dim}
        kv_axes = {axes.KV_HEADS: num_kv_heads, axes.PROJECTION: head_dim}
        return cls(
            query=linear.dense(f"{name}.query", init_base_rng, embed, q_axes, use_bias=qkv_bias, dtype=dtype),
            key=linear.dense(f"{name}.key", init_base_rng, embed, kv_axes, use_bias=qkv_bias, dtype=dtype),
            value=linear.dense(f"{name}.value", init_base_rng, embed, kv_axes, use_bias=qkv_bias, dtype=dtype),
            output=linear.dense(
                f"{name}.output", init_base_rng, q_axes, embed,
                use_bias=output_bias, init_scale=output_init_scale, dtype=dtype,
            ),
            rope=(
                rope_lib.RotaryEmbedding(rotary_fraction, rope_max_wavelength)
                if rotary_fraction
                else None
            ),
            window_size=window_size,
            query_scale=head_dim**-0.5 if query_scale is None else query_scale,
            logits_soft_cap=logits_soft_cap or None,
        )

    def key_spec(self) -> tuple[dict[str, int], jnp.dtype]:
        """Named axes {"kv_heads", "projection"} and dtype of the keys."""
        projection = pz.select(self.key).at_instances_of(pz.nn.Linear).get()
        return projection.output_axes, projection.weights.value.dtype

    def initial_state(self, batch_size: int, max_length: int | None = None) -> KVCache:
        if self.window_size is not None:
            slots = self.window_size + 1
        elif max_length is not None:
            slots = max_length
        else:
            raise ValueError(
                "the model has global attention layers, whose cache holds the whole"
                " stream: pass max_length to to_sampling_mode."
            )
        kv_axes, dtype = self.key_spec()
        return KVCache.empty(batch_size, slots, kv_axes[axes.KV_HEADS], kv_axes[axes.PROJECTION], dtype)

    def project(self, x: pz.nx.NamedArray, context: DocumentContext):
        """Queries, keys and values of `x`, with RoPE applied to q and k.

        Returns q {..., "seq", "heads", "projection"} and k, v
        {..., "seq", "kv_heads", "projection"}.
        """
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope is not None:
            q = self.rope(q, context=context)
            k = self.rope(k, context=context)
        return q, k, v

    def attend(self, q, k, v, mask) -> pz.nx.NamedArray:
        """Attention of q {"seq"} over k, v {"kv_seq"} under mask {"seq", "kv_seq"},
        followed by the output projection."""
        probs = pz.nx.nmap(
            lambda q, k, m: attention_probs(
                q, k, m,
                query_scale=self.query_scale,
                logits_soft_cap=self.logits_soft_cap,
                dtype=v.dtype,
            )
        )(
            q.untag(axes.SEQ, axes.HEADS, axes.PROJECTION),
            k.untag(axes.KV_SEQ, axes.KV_HEADS, axes.PROJECTION),
            mask.untag(axes.SEQ, axes.KV_SEQ),
        ).tag(axes.HEADS, axes.SEQ, axes.KV_SEQ)
        probs = self.pattern(probs)
        encoded = pz.nx.nmap(mix_values)(
            probs.untag(axes.HEADS, axes.SEQ, axes.KV_SEQ),
            v.untag(axes.KV_SEQ, axes.KV_HEADS, axes.PROJECTION),
        ).tag(axes.SEQ, axes.HEADS, axes.PROJECTION)
        return self.output(self.head_outputs(encoded))

    def __call__(self, x, *, context=None, **_unused_side_inputs):
        # The ordinary call attends within the call and builds no cache (the
        # protocol's default would build one and drop it: more to compile).
        context = require_context(context, type(self).__name__)
        q, k, v = self.project(x, context)
        return self.attend(q, to_kv_seq(k), to_kv_seq(v), causal_mask(context, self.window_size))

    def forward(self, x, context: DocumentContext, cache: KVCache) -> tuple[pz.nx.NamedArray, KVCache]:
        """Attention over the cached tokens and the call's own, then the call's
        keys and values written into the cache: a chunk of any length continues
        the stream. A single token (decoding) is written first and attends over
        the cache alone, which saves concatenating the cache every step."""
        q, k, v = self.project(x, context)
        k, v = to_kv_seq(k), to_kv_seq(v)
        new_index, new_document = to_kv_seq(context.stream_pos), to_kv_seq(context.document_id)
        updated = cache.write(k, v, new_index, new_document)
        if context.new_streams:  # nothing cached to attend to
            keys, values, index, document = k, v, new_index, new_document
        elif x.named_shape[axes.SEQ] == 1:  # every slot the token may see survives its write
            keys, values, index, document = updated.keys, updated.values, updated.index, updated.document
        else:
            join = lambda old, new: pz.nx.concatenate([old, new.astype(old.dtype)], axes.KV_SEQ)
            keys, values = join(cache.keys, k), join(cache.values, v)
            index, document = join(cache.index, new_index), join(cache.document, new_document)
        mask = attention_mask(context.stream_pos, context.document_id, index, document, self.window_size)
        return self.attend(q, keys, values, mask), updated
