"""RecurrentGemma / Griffin (arXiv 2402.19427, 2404.07839).

A decoder stack of `ResidualBlock`s whose temporal block is either the
recurrent block (gated GELU branch x [Conv1D -> RG-LRU] branch) or local
multi-query attention with half-head RoPE; tied, sqrt(D)-scaled embeddings and
a tanh logit soft cap. Parameter labels mirror the official tree
(``blocks.3.recurrent_block.rg_lru.a_param`` ...), see
`checkpoints_conversion.recurrentgemma`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import ClassVar

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import config as rules
from recurrent_lm.core.config import Config, field
from recurrent_lm.core.model import DecoderLM
from recurrent_lm.core.registry import Architecture
from recurrent_lm.layers import (
    RGLRU,
    Attention,
    CausalConv1D,
    EmbeddingLookup,
    GatedMLP,
    ResidualBlock,
    RMSNorm,
    bfloat16_sqrt,
    dense,
    embedding_table,
    gelu_tanh,
    recurrence,
    rope,
)

RECURRENT = "recurrent"
ATTENTION = "attention"
BLOCK_TYPES = (RECURRENT, ATTENTION)


def griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """(recurrent, recurrent, attention) repeated, as in both releases."""
    cycle = itertools.cycle((RECURRENT, RECURRENT, ATTENTION))
    return tuple(itertools.islice(cycle, num_layers))


# Presets: field values (the rest are the defaults, or derived from these).
PRESETS_VALUES: dict[str, dict] = {
    # For tests and CPU experiments (the vocabulary follows the tokenizer in training).
    "tiny": dict(
        vocab_size=256, hidden_size=64, lru_width=64, num_attention_heads=4,
        intermediate_size=128, num_hidden_layers=3, attention_window_size=32,
    ),
    "recurrentgemma-2b": dict(
        vocab_size=256_000, hidden_size=2560, lru_width=2560, num_attention_heads=10,
        intermediate_size=7680, num_hidden_layers=26,
    ),
    "recurrentgemma-9b": dict(
        vocab_size=256_000, hidden_size=4096, lru_width=4096, num_attention_heads=16,
        intermediate_size=12288, num_hidden_layers=38,
    ),
}


@dataclasses.dataclass(frozen=True)
class GriffinConfig(Config):
    """Griffin hyper-parameters, with the field names of HF's RecurrentGemmaConfig.

    Attributes:
      vocab_size: number of tokens.
      hidden_size: model width D ("embedding").
      lru_width: RG-LRU width L ("lru"); None means hidden_size.
      num_attention_heads: query heads, and blocks of the RG-LRU gates.
      intermediate_size: width of ONE branch of the gated MLP (7680 for 2B).
      num_hidden_layers: number of residual blocks.
      block_types: one of "recurrent"/"attention" per layer; None means the
        (recurrent, recurrent, attention) pattern.
      attention_window_size: local attention sees this many previous tokens
        (plus itself).
      conv1d_width: taps of the causal convolution.
      logits_soft_cap: ``cap * tanh(logits / cap)``; 0 disables it.
      rms_norm_eps: RMSNorm epsilon.
      partial_rotary_factor: fraction of each head that RoPE rotates.
      rope_theta: RoPE base wavelength.
      num_key_value_heads: key/value heads of the attention (1 = MQA).
      embeddings_scale_by_sqrt_dim: multiply embeddings by bf16(sqrt(D)).
      param_dtype: dtype of the parameters; computation follows it (as in the
        official code), the recurrence and softmax always accumulate in float32.
      scan_method: the RG-LRU scan implementation (`recurrence.SCAN_METHODS`;
        None picks the backend default at trace time).
    """

    model_type: ClassVar[str] = "griffin"
    presets: ClassVar[dict[str, dict]] = PRESETS_VALUES

    vocab_size: int = field(256_000, rules.POSITIVE_INT)
    hidden_size: int = field(2560, rules.POSITIVE_INT)
    lru_width: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    num_attention_heads: int = field(10, rules.POSITIVE_INT)
    intermediate_size: int = field(7680, rules.POSITIVE_INT)
    num_hidden_layers: int = field(26, rules.POSITIVE_INT)
    block_types: tuple[str, ...] | None = field(None, rules.optional(rules.tuple_of(rules.one_of(*BLOCK_TYPES))))
    attention_window_size: int = field(2048, rules.POSITIVE_INT)
    conv1d_width: int = field(4, rules.POSITIVE_INT)
    logits_soft_cap: float = field(30.0, rules.NON_NEGATIVE)
    rms_norm_eps: float = field(1e-6, rules.POSITIVE)
    partial_rotary_factor: float = field(0.5, rules.FRACTION)
    rope_theta: float = field(10000.0, rules.POSITIVE)
    num_key_value_heads: int = field(1, rules.POSITIVE_INT)
    embeddings_scale_by_sqrt_dim: bool = field(True, rules.BOOL)
    param_dtype: str = field("float32", rules.PARAM_DTYPE)
    scan_method: str | None = field(None, rules.optional(rules.one_of(*recurrence.SCAN_METHODS)))

    def derived(self):
        return {
            "block_types": self.block_types or griffin_pattern(self.num_hidden_layers),
            "lru_width": self.lru_width or self.hidden_size,
        }

    def check(self):
        if len(self.block_types) != self.num_hidden_layers:
            yield (f"len(block_types) = {len(self.block_types)} but num_hidden_layers ="
                   f" {self.num_hidden_layers}")
        for name in ("hidden_size", "lru_width"):
            if getattr(self, name) % self.num_attention_heads:
                yield (f"num_attention_heads {self.num_attention_heads} does not divide"
                       f" {name} {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            yield (f"num_key_value_heads {self.num_key_value_heads} does not divide"
                   f" num_attention_heads {self.num_attention_heads}")
        elif not self.hidden_size % self.num_attention_heads and ATTENTION in self.block_types:
            try:  # only attention uses RoPE (a Hawk config may have any head width)
                rope.rotary_dims(self.head_dim, self.partial_rotary_factor)
            except ValueError as e:
                yield f"partial_rotary_factor: {e}"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, GriffinConfig] = {name: GriffinConfig.from_preset(name) for name in PRESETS_VALUES}


@pz.pytree_dataclass
class RecurrentBlock(pz.nn.Layer):
    """Griffin's temporal recurrent block.

    ``linear_out(RG-LRU(Conv1D(linear_x(x))) * gelu(linear_y(x)))``.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"};
    inside, both branches are {..., "seq", "lru"}.
    Side input: ``context`` (document cuts for the conv and the RG-LRU).
    """

    linear_y: pz.nn.Layer
    linear_x: pz.nn.Layer
    conv_1d: CausalConv1D
    rg_lru: RGLRU
    linear_out: pz.nn.Layer

    def __call__(self, x, **side_inputs):
        gate = gelu_tanh(self.linear_y(x))
        h = self.rg_lru(self.conv_1d(self.linear_x(x), **side_inputs), **side_inputs)
        return self.linear_out(h * gate)


def _recurrent_block(name, key, config: GriffinConfig, dtype) -> RecurrentBlock:
    embed, lru = {axes.EMBEDDING: config.hidden_size}, {axes.LRU: config.lru_width}
    return RecurrentBlock(
        linear_y=dense(f"{name}.linear_y", key, embed, lru, use_bias=True, dtype=dtype),
        linear_x=dense(f"{name}.linear_x", key, embed, lru, use_bias=True, dtype=dtype),
        conv_1d=CausalConv1D.from_config(
            f"{name}.conv_1d", key, config.lru_width, config.conv1d_width, dtype=dtype
        ),
        rg_lru=RGLRU.from_config(
            f"{name}.rg_lru", key, config.lru_width, config.num_attention_heads,
            scan_method=config.scan_method, dtype=dtype,
        ),
        linear_out=dense(
            f"{name}.linear_out", key, lru, embed, use_bias=True,
            init_scale=2.0 / config.num_hidden_layers, dtype=dtype,
        ),
    )


def _attention_block(name, key, config: GriffinConfig, dtype) -> Attention:
    return Attention.from_config(
        name,
        key,
        width=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        window_size=config.attention_window_size,
        rotary_fraction=config.partial_rotary_factor,
        rope_max_wavelength=config.rope_theta,
        output_bias=True,
        output_init_scale=2.0 / config.num_hidden_layers,
        dtype=dtype,
    )


def build_model(config: GriffinConfig, key: jax.Array | None) -> DecoderLM:
    """Builds a Griffin initialised as the official code does.

    Args:
      config: the hyper-parameters (and build options such as ``scan_method``).
      key: PRNG key; None builds the structure with empty parameter slots, to
        be filled from a checkpoint (``pz.bind_variables``).
    """
    dtype = jnp.dtype(config.param_dtype)
    table = embedding_table("embedder", key, config.vocab_size, config.hidden_size, dtype=dtype)
    embedder = [EmbeddingLookup(table)]
    if config.embeddings_scale_by_sqrt_dim:
        embedder.append(pz.nn.ConstantRescale(by=bfloat16_sqrt(config.hidden_size)))
    head = [pz.nn.EmbeddingDecode(table)]
    if config.logits_soft_cap:
        head.append(pz.nn.TanhSoftCap(soft_cap=config.logits_soft_cap))

    blocks = []
    for i, block_type in enumerate(config.block_types):
        name = f"blocks.{i}"
        if block_type == RECURRENT:
            temporal = _recurrent_block(f"{name}.recurrent_block", key, config, dtype)
        else:
            temporal = _attention_block(f"{name}.attention_block", key, config, dtype)
        norm = lambda part: RMSNorm.from_config(
            f"{name}.{part}", key, config.hidden_size, eps=config.rms_norm_eps, dtype=dtype
        )
        blocks.append(
            ResidualBlock(
                temporal_pre_norm=norm("temporal_pre_norm"),
                temporal_block=temporal,
                channel_pre_norm=norm("channel_pre_norm"),
                mlp_block=GatedMLP.from_config(
                    f"{name}.mlp_block", key,
                    width=config.hidden_size, hidden_width=config.intermediate_size,
                    use_bias=True, down_init_scale=2.0 / config.num_hidden_layers,
                    dtype=dtype,
                ),
            )
        )
    return DecoderLM(
        config=config,
        embedder=pz.nn.Sequential(embedder),
        blocks=pz.nn.Sequential(blocks),
        final_norm=RMSNorm.from_config(
            "final_norm", key, config.hidden_size, eps=config.rms_norm_eps, dtype=dtype
        ),
        head=pz.nn.Sequential(head),
    )


ARCHITECTURE = Architecture("griffin", GriffinConfig, build_model, recurrence.default_scan_method)
