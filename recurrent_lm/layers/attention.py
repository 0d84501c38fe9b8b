"""Causal self-attention: multi-head, multi-query or grouped-query, global or local."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import linear, positions, sites
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


def causal_mask(
    segment_pos: pz.nx.NamedArray, window_size: int | None
) -> pz.nx.NamedArray:
    """Boolean {"batch", "seq", "kv_seq"} mask of the full-sequence pass
    (see `attention_mask`)."""
    ids = positions.segment_ids(segment_pos)
    index = pz.nx.arange(axes.SEQ, segment_pos.named_shape[axes.SEQ])
    return attention_mask(index, ids, to_kv_seq(index), to_kv_seq(ids), window_size)


@pz.pytree_dataclass
class Attention(pz.nn.Layer):
    """Causal self-attention with rotary positions and an optional window.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"}.
    Side input: ``segment_pos`` {"batch", "seq"} (document cuts, RoPE positions).
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
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        *,
        width: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        window_size: int | None,
        rotary_fraction: float,
        rope_max_wavelength: float,
        query_scale: float | None = None,
        logits_soft_cap: float | None = None,
        qkv_bias: bool = False,
        output_bias: bool = True,
        output_init_scale: float = 1.0,
        dtype=jnp.float32,
    ) -> Attention:
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

    def project(self, x: pz.nx.NamedArray, segment_pos: pz.nx.NamedArray):
        """Queries, keys and values of `x`, with RoPE applied to q and k.

        Returns q {..., "seq", "heads", "projection"} and k, v
        {..., "seq", "kv_heads", "projection"}.
        """
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope is not None:
            q = self.rope(q, segment_pos=segment_pos)
            k = self.rope(k, segment_pos=segment_pos)
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

    def __call__(
        self, x: pz.nx.NamedArray, *, segment_pos=None, **_unused_side_inputs
    ) -> pz.nx.NamedArray:
        segment_pos = positions.require_segment_pos(segment_pos, "Attention")
        q, k, v = self.project(x, segment_pos)
        return self.attend(q, to_kv_seq(k), to_kv_seq(v), causal_mask(segment_pos, self.window_size))
