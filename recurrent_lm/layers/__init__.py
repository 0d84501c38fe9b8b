"""Shared named-axis building blocks (axis vocabulary: `recurrent_lm.axes`).

One concept per module: the linear-recurrence primitive (`recurrence`), segment
positions (`positions`), norms, linear and block-diagonal layers, causal
convolution, RG-LRU, rotary embeddings, attention, gated MLP, embeddings and
the residual block, and H3's state-space layers (`ssm`). Each layer's docstring states its named axes in and out.
"""

from recurrent_lm.layers.attention import Attention, attend, causal_mask
from recurrent_lm.layers.conv import CausalConv1D, causal_conv_1d
from recurrent_lm.layers.embeddings import bfloat16_sqrt, embedding_table
from recurrent_lm.layers.linear import BlockDiagonalLinear, dense
from recurrent_lm.layers.mlp import MLP, GatedMLP, gelu_tanh
from recurrent_lm.layers.norms import LayerNorm, RMSNorm
from recurrent_lm.layers.positions import (
    default_segment_pos,
    document_starts,
    segment_ids,
)
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
    "GatedMLP",
    "LayerNorm",
    "RMSNorm",
    "ResidualBlock",
    "RotaryEmbedding",
    "ShiftSSM",
    "apply_rope",
    "attend",
    "bfloat16_sqrt",
    "causal_conv_1d",
    "causal_mask",
    "default_scan_method",
    "default_segment_pos",
    "dense",
    "document_starts",
    "embedding_table",
    "gelu_tanh",
    "linear_scan",
    "segment_ids",
]
