"""Mamba (arXiv 2312.00752): the selective state-space language models of
state-spaces/mamba-*-hf.

A stack of one-branch `ResidualBlock`s, ``x + mixer(norm(x))``, whose mixer is
Mamba-1's selective scan (`layers.mamba.MambaMixer`); RMS norms with a scale
stored as is (`ScaledRMSNorm`), a final ``norm_f``, a head tied to the
embeddings (the released models; HF's ``lm_head.weight`` is then not stored).
With ``residual_in_fp32`` the residual stream is float32 whatever the
parameter dtype, as in HF.

Parameter labels mirror HF's names without ``backbone.``
(``layers.3.mixer.A_log``, ``layers.3.mixer.in_proj.weights`` ...), see
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
    recurrence,
)
from recurrent_lm.layers.mamba import MambaMixer, TimeStepInit
from recurrent_lm.layers.norms import ScaledRMSNorm
from recurrent_lm.params import build_initialised

# The GPT-NeoX-20B vocabulary of the Pile models, padded to a multiple of 8.
VOCAB_SIZE = 50280

PRESETS_VALUES: dict[str, dict] = {
    # The released models (state-spaces/mamba-*-hf).
    "130m": dict(hidden_size=768, num_hidden_layers=24),
    "370m": dict(hidden_size=1024, num_hidden_layers=48),
    "790m": dict(hidden_size=1536, num_hidden_layers=48),
    "1.4b": dict(hidden_size=2048, num_hidden_layers=48),
    "2.8b": dict(hidden_size=2560, num_hidden_layers=64),
    # For tests, demos and training smoke runs.
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=4),
}

AUTO = "auto"
_RANK = rules.Rule(
    lambda v: v == AUTO or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    '"auto" or a positive integer',
)
HIDDEN_ACTS = ("silu",)
TIME_STEP_INIT_SCHEMES = ("random", "constant")


@dataclasses.dataclass(frozen=True)
class MambaConfig(Config):
    """Mamba hyper-parameters, with the field names of HF's ``MambaConfig``
    (and HF's defaults).

    Attributes:
      vocab_size, hidden_size, num_hidden_layers: vocabulary, width D
        ("embedding"), blocks.
      state_size: N, the state per channel ("state").
      expand: the mixer's width is ``intermediate_size = expand * D`` ("inner").
      conv_kernel: taps of the causal depthwise convolution.
      time_step_rank: R, the width of dt's low-rank path; "auto" means
        ``ceil(D / 16)`` (stored as the number).
      layer_norm_epsilon: epsilon of every RMS norm.
      use_bias: biases on ``in_proj`` and ``out_proj``.
      use_conv_bias: a bias on the convolution.
      hidden_act: the mixer's activation ("silu", the only one supported).
      residual_in_fp32: keep the residual stream in float32 whatever the
        parameter dtype.
      tie_word_embeddings: the head is the embedding matrix (the releases).
      pad_token_id, bos_token_id, eos_token_id: special ids (0, the NeoX
        tokenizer's ``<|endoftext|>``, for all three).
      initializer_range, time_step_scale, time_step_min, time_step_max,
        time_step_init_scheme, time_step_floor, rescale_prenorm_residual:
        HF's initialisation (`build_model`).
      param_dtype: dtype of the parameters; computation follows it, the
        recurrence runs in float32 (float64 for float64 parameters).
      scan_method: the `linear_scan` form (`recurrence.SCAN_METHODS`; None
        picks the backend default).
      scan_chunk_size: chunk length of the "chunked" form.
    """

    model_type: ClassVar[str] = "mamba"
    presets: ClassVar[dict[str, dict]] = PRESETS_VALUES

    vocab_size: int = field(VOCAB_SIZE, rules.POSITIVE_INT)
    hidden_size: int = field(768, rules.POSITIVE_INT)
    state_size: int = field(16, rules.POSITIVE_INT)
    num_hidden_layers: int = field(32, rules.POSITIVE_INT)
    layer_norm_epsilon: float = field(1e-5, rules.POSITIVE)
    pad_token_id: int = field(0, rules.NON_NEGATIVE_INT)
    bos_token_id: int = field(0, rules.NON_NEGATIVE_INT)
    eos_token_id: int = field(0, rules.NON_NEGATIVE_INT)
    expand: int = field(2, rules.POSITIVE_INT)
    conv_kernel: int = field(4, rules.POSITIVE_INT)
    use_bias: bool = field(False, rules.BOOL)
    use_conv_bias: bool = field(True, rules.BOOL)
    hidden_act: str = field("silu", rules.one_of(*HIDDEN_ACTS))
    initializer_range: float = field(0.1, rules.POSITIVE)
    residual_in_fp32: bool = field(True, rules.BOOL)
    time_step_rank: int | str = field(AUTO, _RANK)
    time_step_scale: float = field(1.0, rules.POSITIVE)
    time_step_min: float = field(0.001, rules.POSITIVE)
    time_step_max: float = field(0.1, rules.POSITIVE)
    time_step_init_scheme: str = field("random", rules.one_of(*TIME_STEP_INIT_SCHEMES))
    time_step_floor: float = field(1e-4, rules.NON_NEGATIVE)
    rescale_prenorm_residual: bool = field(False, rules.BOOL)
    tie_word_embeddings: bool = field(True, rules.BOOL)
    param_dtype: str = field("float32", rules.PARAM_DTYPE)
    scan_method: str | None = field(None, rules.optional(rules.one_of(*recurrence.SCAN_METHODS)))
    scan_chunk_size: int = field(recurrence.DEFAULT_CHUNK_SIZE, rules.POSITIVE_INT)

    def derived(self):
        if self.time_step_rank == AUTO:
            return {"time_step_rank": math.ceil(self.hidden_size / 16)}
        return {}

    def check(self):
        if self.time_step_min > self.time_step_max:
            yield f"time_step_min {self.time_step_min} exceeds time_step_max {self.time_step_max}"
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                yield f"{name} {getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def time_step(self) -> TimeStepInit:
        return TimeStepInit(self.time_step_min, self.time_step_max, self.time_step_floor,
                            self.time_step_scale, self.time_step_init_scheme)


PRESETS: dict[str, MambaConfig] = {name: MambaConfig.from_preset(name) for name in PRESETS_VALUES}


def build_model(config: MambaConfig, key: jax.Array | None) -> DecoderLM:
    """Builds a Mamba initialised as transformers' ``MambaPreTrainedModel`` does.

    Embeddings (and an untied head) normal with std ``initializer_range``,
    norm scales 1; each mixer as `MambaMixer.from_config` says, its
    out-projection divided by ``sqrt(num_hidden_layers)`` with
    ``rescale_prenorm_residual``.

    Args:
      config: the hyper-parameters (and build options such as ``scan_method``).
      key: PRNG key; None builds the structure with empty parameter slots, to
        be filled from a checkpoint.
    """
    return build_initialised(_build, config, key, source="Mamba initialisation")


def _build(config: MambaConfig, key: jax.Array | None) -> DecoderLM:
    dtype = jnp.dtype(config.param_dtype)
    width = {axes.EMBEDDING: config.hidden_size}
    norm = lambda name: ScaledRMSNorm.from_config(name, key, width, eps=config.layer_norm_epsilon, dtype=dtype)
    normal = lambda key, shape, dtype: init.normal(key, shape, dtype, std=config.initializer_range)
    out_scale = 1 / math.sqrt(config.num_hidden_layers) if config.rescale_prenorm_residual else 1.0
    blocks = [
        ResidualBlock.temporal_only(
            norm(f"layers.{i}.norm"),
            MambaMixer.from_config(
                f"layers.{i}.mixer", key, config.hidden_size, config.intermediate_size,
                config.state_size, config.time_step_rank, config.conv_kernel,
                use_bias=config.use_bias, use_conv_bias=config.use_conv_bias,
                initializer_range=config.initializer_range, time_step=config.time_step,
                out_scale=out_scale, scan_method=config.scan_method,
                chunk_size=config.scan_chunk_size, dtype=dtype,
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


ARCHITECTURE = Architecture("mamba", MambaConfig, build_model, recurrence.default_scan_method)
