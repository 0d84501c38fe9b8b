"""Gemma 1 and Gemma 2 (arXiv 2403.08295, 2408.00118) on the shared layers.

A decoder stack of `ResidualBlock`s whose temporal block is rotary attention
(multi-head, multi-query or grouped-query), with a gated-GELU MLP, tied
sqrt(D)-scaled embeddings and RMSNorm. Gemma 2 adds post-attention and
post-MLP norms, tanh soft caps on the attention and final logits, and local
sliding-window attention on every other layer (layer 0 local, layer 1
global, ...). Parameter labels mirror the official Flax tree
(``layer_3.attn.query.weights`` ...), see `checkpoints_conversion.gemma`.

The math follows the official Flax code (and penzai's port of it): RoPE over
the whole head with angle ``position / timescale``, queries scaled before the
query-key product, a sliding window of W keys including the current one, and
the embedding scale ``sqrt(D)`` rounded to the activation dtype.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm.core import config as rules
from recurrent_lm.core.config import Config, field
from recurrent_lm.core.model import DecoderLM
from recurrent_lm.core.registry import Architecture
from recurrent_lm.layers import (
    Attention,
    EmbeddingLookup,
    GatedMLP,
    ResidualBlock,
    RMSNorm,
    embedding_table,
    rope,
)

SOFT_CAP = rules.Rule(lambda v: v is None or rules.POSITIVE.test(v), "None (off) or > 0")
OPTIONAL_POSITIVE = rules.Rule(lambda v: v is None or rules.POSITIVE.test(v), "None or > 0")
NO_DROPOUT = rules.Rule(lambda v: v == 0, "0: recurrent_lm models have no dropout layers (the field exists"
                  " for Keras compatibility)")
ROPE_MAX_WAVELENGTH = 10_000.0


_GEMMA2 = dict(
    use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0, use_sliding_window_attention=True, sliding_window_size=4096,
)

# Shapes of the official Flax releases (vocabulary 256128, the Flax embedding
# size; Keras' presets drop the last 128 rows).
PRESETS_VALUES: dict[str, dict] = {
    "gemma-2b": dict(
        num_layers=18, num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
        intermediate_dim=32_768, head_dim=256,
    ),
    "gemma-7b": dict(
        num_layers=28, num_query_heads=16, num_key_value_heads=16, hidden_dim=3072,
        intermediate_dim=49_152, head_dim=256,
    ),
    "gemma2-2b": dict(
        num_layers=26, num_query_heads=8, num_key_value_heads=4, hidden_dim=2304,
        intermediate_dim=18_432, head_dim=256, **_GEMMA2,
    ),
    "gemma2-9b": dict(
        num_layers=42, num_query_heads=16, num_key_value_heads=8, hidden_dim=3584,
        intermediate_dim=28_672, head_dim=256, **_GEMMA2,
    ),
    "gemma2-27b": dict(
        num_layers=46, num_query_heads=32, num_key_value_heads=16, hidden_dim=4608,
        intermediate_dim=73_728, head_dim=128, query_head_dim_normalize=False, **_GEMMA2,
    ),
    # A small Gemma-2-style model for training runs and tests.
    "tiny": dict(
        vocabulary_size=256, num_layers=4, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=128, intermediate_dim=512, head_dim=32,
        **{**_GEMMA2, "sliding_window_size": 64},
    ),
}


@dataclasses.dataclass(frozen=True)
class GemmaConfig(Config):
    """Gemma hyper-parameters, with the argument names of Keras' `GemmaBackbone`.

    Attributes:
      vocabulary_size: number of tokens.
      num_layers: number of residual blocks.
      num_query_heads: query heads H.
      num_key_value_heads: key/value heads (1 = multi-query, H = multi-head,
        otherwise grouped-query; must divide H).
      hidden_dim: model width D ("embedding").
      intermediate_dim: as in Keras, the width of BOTH branches of the gated
        MLP together; each branch ("mlp") has ``intermediate_dim // 2`` units
        (32768 for Gemma 2B, whose official MLP is 16384 wide).
      head_dim: per-head width ("projection").
      query_head_dim_normalize: scale queries by ``head_dim ** -0.5``; if
        False by ``(hidden_dim // num_query_heads) ** -0.5`` (Gemma 2 27B).
      query_pre_attn_scalar: HF Gemma 2's name: when set, queries are scaled
        by ``query_pre_attn_scalar ** -0.5`` instead (any positive number;
        ``query_head_dim_normalize`` is then ignored). None for the two
        released choices above.
      use_post_ffw_norm: RMSNorm on the MLP branch before the residual add.
      use_post_attention_norm: RMSNorm on the attention branch before the add.
      attention_logit_soft_cap: ``cap * tanh(logits / cap)`` on the attention
        logits; None disables it.
      final_logit_soft_cap: the same on the output logits; None disables it.
      use_sliding_window_attention: even layers (0, 2, ...) attend to a
        sliding window; odd layers stay global.
      sliding_window_size: keys a sliding layer sees, the current one included.
      layer_norm_epsilon: RMSNorm epsilon.
      dropout: kept for Keras compatibility; recurrent_lm models are
        deterministic, so it must be 0.
      param_dtype: dtype of the parameters; activations follow it unless
        ``upcast_activations_to_float32``.
      upcast_activations_to_float32: as in penzai's Gemma: keep the parameters
        in ``param_dtype`` but cast the embeddings to float32, so every
        activation (and the sampling-mode KV cache) is float32.
    """

    model_type: ClassVar[str] = "gemma"
    presets: ClassVar[dict[str, dict]] = PRESETS_VALUES
    # ``vocab_size``: the name every other architecture uses, and the training CLI sets.
    aliases: ClassVar[dict[str, str]] = {"vocab_size": "vocabulary_size"}

    vocabulary_size: int = field(256_128, rules.POSITIVE_INT)
    num_layers: int = field(18, rules.POSITIVE_INT)
    num_query_heads: int = field(8, rules.POSITIVE_INT)
    num_key_value_heads: int = field(1, rules.POSITIVE_INT)
    hidden_dim: int = field(2048, rules.POSITIVE_INT)
    intermediate_dim: int = field(32_768, rules.POSITIVE_INT)
    head_dim: int = field(256, rules.POSITIVE_INT)
    query_head_dim_normalize: bool = field(True, rules.BOOL)
    query_pre_attn_scalar: float | None = field(None, OPTIONAL_POSITIVE)
    use_post_ffw_norm: bool = field(False, rules.BOOL)
    use_post_attention_norm: bool = field(False, rules.BOOL)
    attention_logit_soft_cap: float | None = field(None, SOFT_CAP)
    final_logit_soft_cap: float | None = field(None, SOFT_CAP)
    use_sliding_window_attention: bool = field(False, rules.BOOL)
    sliding_window_size: int = field(4096, rules.POSITIVE_INT)
    layer_norm_epsilon: float = field(1e-6, rules.POSITIVE)
    dropout: float = field(0.0, NO_DROPOUT)
    param_dtype: str = field("float32", rules.PARAM_DTYPE)
    upcast_activations_to_float32: bool = field(False, rules.BOOL)

    def check(self):
        if self.num_query_heads % self.num_key_value_heads:
            yield (f"num_key_value_heads {self.num_key_value_heads} does not divide"
                   f" num_query_heads {self.num_query_heads}")
        if self.intermediate_dim % 2:
            yield (f"intermediate_dim {self.intermediate_dim} must be even (two MLP branches of"
                   " intermediate_dim // 2 units)")
        if self.head_dim % 2:
            yield f"head_dim {self.head_dim} must be even (RoPE rotates feature pairs)"
        if (self.query_pre_attn_scalar is None and not self.query_head_dim_normalize
                and self.hidden_dim < self.num_query_heads):
            yield (f"hidden_dim {self.hidden_dim} // num_query_heads {self.num_query_heads} is 0:"
                   " no query scale (query_head_dim_normalize=False)")

    @property
    def vocab_size(self) -> int:
        """The name every recurrent_lm model's config answers to."""
        return self.vocabulary_size

    @property
    def mlp_width(self) -> int:
        """Units of ONE branch of the gated MLP (the official ``hidden_dim``)."""
        return self.intermediate_dim // 2

    @property
    def query_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar**-0.5
        width = self.head_dim if self.query_head_dim_normalize else self.hidden_dim // self.num_query_heads
        return width**-0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` uses the sliding window (even layers, as released)."""
        return self.use_sliding_window_attention and layer % 2 == 0


PRESETS: dict[str, GemmaConfig] = {name: GemmaConfig.from_preset(name) for name in PRESETS_VALUES}


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # Attention's fields first
class GemmaAttention(Attention):
    """`Attention` that scales queries before the query-key product.

    The official code (and penzai) multiply the rotated queries by the scale
    and then take the dot products; in bfloat16 that rounds differently from
    scaling the logits, so we keep its order (``query_scale`` of the base
    class is then 1). ``activation_dtype`` is the dtype of the activations
    when it differs from the parameters' (upcast models): the sampling-mode
    KV cache stores keys and values in it.

    Named axes, side inputs and sublayers: see `Attention`.
    """

    query_pre_scale: float = dataclasses.field(default=1.0, metadata={"pytree_node": False})
    activation_dtype: str | None = dataclasses.field(default=None, metadata={"pytree_node": False})

    def project(self, x, context):
        q, k, v = super().project(x, context)
        return q * jnp.asarray(self.query_pre_scale, q.dtype), k, v

    def key_spec(self):
        key_axes, dtype = super().key_spec()
        if self.activation_dtype is not None:
            dtype = jnp.promote_types(dtype, self.activation_dtype)
        return key_axes, dtype


def _attention(name, key, config: GemmaConfig, layer: int, dtype, activation_dtype) -> GemmaAttention:
    # Our windows count the keys before the current one: W keys in all is W - 1.
    window = config.sliding_window_size - 1 if config.is_sliding(layer) else None
    base_layer = Attention.from_config(
        name, key,
        width=config.hidden_dim,
        num_heads=config.num_query_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        window_size=window,
        rotary_fraction=1.0,
        rope_max_wavelength=ROPE_MAX_WAVELENGTH,
        query_scale=1.0,
        logits_soft_cap=config.attention_logit_soft_cap,
        output_bias=False,
        dtype=dtype,
    )
    fields = {f.name: getattr(base_layer, f.name) for f in dataclasses.fields(base_layer)}
    fields["rope"] = rope.RotaryEmbedding(1.0, ROPE_MAX_WAVELENGTH, divide_by_timescale=True)
    return GemmaAttention(
        **fields,
        query_pre_scale=config.query_scale,
        activation_dtype=None if activation_dtype == dtype else jnp.dtype(activation_dtype).name,
    )


@pz.pytree_dataclass
class EmbeddingScale(pz.nn.Layer):
    """Multiplies by ``sqrt(width)`` rounded to the input's dtype, as the
    official code does (``jnp.sqrt(D).astype(x.dtype)``: 45.25 in bfloat16 for
    D = 2048), whatever dtype the model is later cast to.

    Named axes: any -> same.
    """

    width: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
        return x * jnp.sqrt(jnp.float32(self.width)).astype(x.dtype)


def build_model(config: GemmaConfig, key: jax.Array | None) -> DecoderLM:
    """Builds a Gemma model.

    Args:
      config: the hyper-parameters (and ``upcast_activations_to_float32``).
      key: PRNG key; None builds the structure with empty parameter slots, to
        be filled from a checkpoint (``pz.bind_variables``).
    """
    dtype = jnp.dtype(config.param_dtype)
    activation_dtype = jnp.dtype(jnp.float32) if config.upcast_activations_to_float32 else dtype
    width = config.hidden_dim
    table = embedding_table("embedder", key, config.vocabulary_size, width, dtype=dtype)
    embedder = [EmbeddingLookup(table)]
    if activation_dtype != dtype:
        embedder.append(pz.nn.CastToDType(activation_dtype))
    embedder.append(EmbeddingScale(width))
    head = [pz.nn.EmbeddingDecode(table)]
    if config.final_logit_soft_cap:
        head.append(pz.nn.TanhSoftCap(soft_cap=config.final_logit_soft_cap))

    blocks = []
    for i in range(config.num_layers):
        name = f"layer_{i}"
        norm = lambda part, name=name: RMSNorm.from_config(
            f"{name}.{part}", key, width, eps=config.layer_norm_epsilon, dtype=dtype
        )
        blocks.append(
            ResidualBlock(
                temporal_pre_norm=norm("pre_attention_norm"),
                temporal_block=_attention(f"{name}.attn", key, config, i, dtype, activation_dtype),
                channel_pre_norm=norm("pre_ffw_norm"),
                mlp_block=GatedMLP.from_config(
                    f"{name}.mlp", key, width=width, hidden_width=config.mlp_width,
                    use_bias=False, dtype=dtype,
                ),
                temporal_post_norm=(
                    norm("post_attention_norm") if config.use_post_attention_norm else None
                ),
                channel_post_norm=norm("post_ffw_norm") if config.use_post_ffw_norm else None,
            )
        )
    return DecoderLM(
        config=config,
        embedder=pz.nn.Sequential(embedder),
        blocks=pz.nn.Sequential(blocks),
        final_norm=RMSNorm.from_config(
            "final_norm", key, width, eps=config.layer_norm_epsilon, dtype=dtype
        ),
        head=pz.nn.Sequential(head),
    )


ARCHITECTURE = Architecture("gemma", GemmaConfig, build_model)
