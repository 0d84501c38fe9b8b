"""Mamba-2 (arXiv 2405.21060): the SSD language models of state-spaces/mamba2-*.

A stack of one-branch `ResidualBlock`s, ``x + mixer(norm(x))``, whose mixer is
Mamba-2's SSD (`layers.mamba2.Mamba2Mixer`: a scalar decay per head on the
matrix-state primitive, groups of heads sharing B and C, a gated RMS norm per
group); RMS norms with a scale stored as is, a final ``norm_f``, a head tied
to the embeddings (the releases) or not (HF's default). With
``residual_in_fp32`` the residual stream is float32 whatever the parameter
dtype, as in HF.

Parameter labels mirror HF's names without ``backbone.``
(``layers.3.mixer.dt_bias``, ``layers.3.mixer.in_proj.weights`` ...), see
`checkpoints_conversion.mamba`.
"""

from __future__ import annotations

import dataclasses
import math
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
    EmbeddingLookup,
    ResidualBlock,
    dense,
    embedding_table,
    init,
    matrix_recurrence,
)
from recurrent_lm.layers.mamba import TimeStepInit
from recurrent_lm.layers.mamba2 import Mamba2Mixer
from recurrent_lm.layers.norms import ScaledRMSNorm
from recurrent_lm.params import build_initialised

# The GPT-NeoX-20B vocabulary of the Pile models, padded to a multiple of 16.
VOCAB_SIZE = 50288


def _release(hidden_size: int, num_hidden_layers: int) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        state_size=128, head_dim=64, n_groups=1, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )


PRESETS_VALUES: dict[str, dict] = {
    # The released models (state-spaces/mamba2-*).
    "130m": _release(768, 24),
    "370m": _release(1024, 48),
    "780m": _release(1536, 48),
    "1.3b": _release(2048, 48),
    "2.7b": _release(2560, 64),
    # For tests, demos and training smoke runs.
    "tiny": dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=4, state_size=32, head_dim=32,
        n_groups=1, chunk_size=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
        eos_token_id=0,
    ),
}

HIDDEN_ACTS = ("silu",)
_LIMIT = rules.Rule(
    lambda v: len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    and 0 <= v[0] <= v[1],
    "a pair (low, high) with 0 <= low <= high",
    convert=lambda v: tuple(float(x) for x in v),
)


@dataclasses.dataclass(frozen=True)
class Mamba2Config(Config):
    """Mamba-2 hyper-parameters, with the field names of HF's ``Mamba2Config``
    (and HF's defaults).

    Attributes:
      vocab_size, hidden_size, num_hidden_layers: vocabulary, width D
        ("embedding"), blocks.
      num_heads, head_dim: the mixer's heads ("heads") of head_dim
        ("projection"); ``num_heads * head_dim = expand * D``. None heads
        means ``expand * D / head_dim``.
      state_size: N, the state's key width ("state").
      n_groups: groups of heads sharing B and C ("groups"); divides the heads.
      expand: the mixer's width is ``intermediate_size = expand * D``.
      conv_kernel: taps of the causal depthwise convolution over x, B, C.
      layer_norm_epsilon: epsilon of every RMS norm (the gated one too).
      use_bias: biases on ``in_proj`` and ``out_proj``.
      use_conv_bias: a bias on the convolution.
      hidden_act: the mixer's activation ("silu", the only one supported).
      time_step_limit: ``(low, high)``, dt's clip after the softplus.
      residual_in_fp32: keep the residual stream in float32 whatever the
        parameter dtype.
      tie_word_embeddings: the head is the embedding matrix.
      pad_token_id, bos_token_id, eos_token_id: special ids.
      initializer_range, time_step_min, time_step_max, time_step_floor,
        rescale_prenorm_residual: HF's initialisation (`build_model`).
      chunk_size: chunk length of `matrix_scan`'s "chunked" form.
      param_dtype: dtype of the parameters; computation follows it, the
        recurrence runs in float32 (float64 for float64 parameters).
      scan_method: the `matrix_scan` form
        (`matrix_recurrence.MATRIX_SCAN_METHODS`; None picks the default).
    """

    model_type: ClassVar[str] = "mamba2"
    presets: ClassVar[dict[str, dict]] = PRESETS_VALUES

    vocab_size: int = field(32768, rules.POSITIVE_INT)
    hidden_size: int = field(4096, rules.POSITIVE_INT)
    num_hidden_layers: int = field(64, rules.POSITIVE_INT)
    num_heads: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    head_dim: int = field(64, rules.POSITIVE_INT)
    state_size: int = field(128, rules.POSITIVE_INT)
    n_groups: int = field(8, rules.POSITIVE_INT)
    expand: int = field(2, rules.POSITIVE_INT)
    conv_kernel: int = field(4, rules.POSITIVE_INT)
    layer_norm_epsilon: float = field(1e-5, rules.POSITIVE)
    use_bias: bool = field(False, rules.BOOL)
    use_conv_bias: bool = field(True, rules.BOOL)
    hidden_act: str = field("silu", rules.one_of(*HIDDEN_ACTS))
    time_step_limit: tuple[float, float] = field((0.0, math.inf), _LIMIT)
    residual_in_fp32: bool = field(True, rules.BOOL)
    tie_word_embeddings: bool = field(False, rules.BOOL)
    pad_token_id: int = field(1, rules.NON_NEGATIVE_INT)
    bos_token_id: int = field(0, rules.NON_NEGATIVE_INT)
    eos_token_id: int = field(2, rules.NON_NEGATIVE_INT)
    initializer_range: float = field(0.1, rules.POSITIVE)
    time_step_min: float = field(0.001, rules.POSITIVE)
    time_step_max: float = field(0.1, rules.POSITIVE)
    time_step_floor: float = field(1e-4, rules.NON_NEGATIVE)
    rescale_prenorm_residual: bool = field(False, rules.BOOL)
    chunk_size: int = field(256, rules.POSITIVE_INT)
    param_dtype: str = field("float32", rules.PARAM_DTYPE)
    scan_method: str | None = field(
        None, rules.optional(rules.one_of(*matrix_recurrence.MATRIX_SCAN_METHODS))
    )

    def derived(self):
        if self.num_heads is None and not self.intermediate_size % self.head_dim:
            return {"num_heads": self.intermediate_size // self.head_dim}
        return {}

    def check(self):
        if self.num_heads is None:
            yield (f"head_dim {self.head_dim} does not divide expand * hidden_size ="
                   f" {self.intermediate_size}")
            return
        if self.num_heads * self.head_dim != self.intermediate_size:
            yield (f"num_heads * head_dim = {self.num_heads * self.head_dim} but expand *"
                   f" hidden_size = {self.intermediate_size}; they must be equal")
        if self.num_heads % self.n_groups:
            yield f"n_groups {self.n_groups} does not divide num_heads {self.num_heads}"
        if self.time_step_min > self.time_step_max:
            yield f"time_step_min {self.time_step_min} exceeds time_step_max {self.time_step_max}"
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                yield f"{name} {getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: x, B and C end to end."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size


PRESETS: dict[str, Mamba2Config] = {name: Mamba2Config.from_preset(name) for name in PRESETS_VALUES}


def build_model(config: Mamba2Config, key: jax.Array | None) -> DecoderLM:
    """Builds a Mamba-2 initialised as transformers' ``Mamba2PreTrainedModel`` does.

    Embeddings (and an untied head) normal with std ``initializer_range``,
    norm scales 1; each mixer as `Mamba2Mixer.from_config` says, its
    out-projection divided by ``sqrt(num_hidden_layers)`` with
    ``rescale_prenorm_residual``.

    Args:
      config: the hyper-parameters (and build options such as ``scan_method``).
      key: PRNG key; None builds the structure with empty parameter slots, to
        be filled from a checkpoint.
    """
    return build_initialised(_build, config, key, source="Mamba-2 initialisation")


def _build(config: Mamba2Config, key: jax.Array | None) -> DecoderLM:
    dtype = jnp.dtype(config.param_dtype)
    width = {axes.EMBEDDING: config.hidden_size}
    norm = lambda name: ScaledRMSNorm.from_config(name, key, width, eps=config.layer_norm_epsilon, dtype=dtype)
    normal = lambda key, shape, dtype: init.normal(key, shape, dtype, std=config.initializer_range)
    out_scale = 1 / math.sqrt(config.num_hidden_layers) if config.rescale_prenorm_residual else 1.0
    time_step = TimeStepInit(config.time_step_min, config.time_step_max, config.time_step_floor)
    blocks = [
        ResidualBlock.temporal_only(
            norm(f"layers.{i}.norm"),
            Mamba2Mixer.from_config(
                f"layers.{i}.mixer", key, config.hidden_size, config.num_heads, config.head_dim,
                config.state_size, config.n_groups, config.conv_kernel,
                use_bias=config.use_bias, use_conv_bias=config.use_conv_bias,
                norm_eps=config.layer_norm_epsilon, initializer_range=config.initializer_range,
                time_step=time_step, time_step_limit=config.time_step_limit, out_scale=out_scale,
                scan_method=config.scan_method, chunk_size=config.chunk_size, dtype=dtype,
            ),
        )
        for i in range(config.num_hidden_layers)
    ]
    table = embedding_table("embeddings", key, config.vocab_size, config.hidden_size,
                            std=config.initializer_range, dtype=dtype)
    embedder = [EmbeddingLookup(table)]
    if config.residual_in_fp32 and dtype.itemsize <= 4:
        # HF keeps the residual stream in float32 from block 0's addition on;
        # block 0's norm reads the embeddings, which a float32 copy keeps exactly.
        embedder.append(pz.nn.CastToDType(jnp.float32))
    if config.tie_word_embeddings:
        head = pz.nn.EmbeddingDecode(table)
    else:
        head = dense("lm_head", key, width, {axes.VOCABULARY: config.vocab_size}, use_bias=False,
                     initializer=normal, dtype=dtype)
    return DecoderLM(
        config=config,
        embedder=pz.nn.Sequential(embedder),
        blocks=pz.nn.Sequential(blocks),
        final_norm=norm("norm_f"),
        head=head,
    )


ARCHITECTURE = Architecture(
    "mamba2", Mamba2Config, build_model, matrix_recurrence.default_matrix_scan_method
)
