"""Shared named-axis building blocks (axis vocabulary: `recurrent_lm.axes`).

One concept per module: the linear-recurrence primitive (`recurrence`) and its matrix-state
form (`matrix_recurrence`: diagonal-plus-rank-one transitions), the
document-aware causal filter (`causal_filter`: conv, shift SSM, token shift),
norms, linear and block-diagonal layers, causal convolution, RG-LRU, rotary
embeddings, attention and its KV cache, gated MLP, token and learned position
embeddings, the residual block, H3's state-space layers (`ssm`), RWKV-4's time
and channel mixes (`wkv`, `channel_mix`), RWKV-7's (`rwkv7`), Mamba-1's and Mamba-2's
mixers (`mamba`, `mamba2`). Each layer's docstring states its
named axes in and out; temporal layers implement
`recurrent_lm.core.state.StatefulLayer`. This package imports no architecture.
"""

from recurrent_lm.layers.attention import Attention, KVCache, attend, causal_mask
from recurrent_lm.layers.causal_filter import causal_filter, token_shift
from recurrent_lm.layers.conv import CausalConv1D
from recurrent_lm.layers.embeddings import (
    EmbeddingLookup,
    LearnedPositions,
    bfloat16_sqrt,
    embedding_table,
)
from recurrent_lm.layers.linear import BlockDiagonalLinear, dense
from recurrent_lm.layers.matrix_recurrence import matrix_scan
from recurrent_lm.layers.mlp import MLP, GatedMLP, gelu_tanh
from recurrent_lm.layers.norms import LayerNorm, RMSNorm, ScaledRMSNorm
from recurrent_lm.layers.recurrence import (
    SCAN_METHODS,
    default_scan_method,
    linear_scan,
)
from recurrent_lm.layers.residual import ResidualBlock
from recurrent_lm.layers.rg_lru import RGLRU
from recurrent_lm.layers.rope import RotaryEmbedding, apply_rope
from recurrent_lm.layers.ssm import DiagonalSSM, ShiftSSM

__all__ = [
    "MLP",
    "RGLRU",
    "SCAN_METHODS",
    "Attention",
    "BlockDiagonalLinear",
    "CausalConv1D",
    "DiagonalSSM",
    "EmbeddingLookup",
    "GatedMLP",
    "KVCache",
    "LayerNorm",
    "LearnedPositions",
    "RMSNorm",
    "ResidualBlock",
    "ScaledRMSNorm",
    "RotaryEmbedding",
    "ShiftSSM",
    "apply_rope",
    "attend",
    "bfloat16_sqrt",
    "causal_filter",
    "causal_mask",
    "default_scan_method",
    "dense",
    "embedding_table",
    "gelu_tanh",
    "linear_scan",
    "matrix_scan",
    "token_shift",
]
