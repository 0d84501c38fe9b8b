"""RWKV-7 "Goose" (arXiv 2503.14456): BlinkDL's x070 language models.

A stack of `ResidualBlock`s whose temporal block is RWKV-7 time mixing (a
matrix state per head with a diagonal-plus-rank-one transition,
`layers.rwkv7.TimeMix7`) and whose channel block is a squared-ReLU MLP over
token-shifted inputs (`layers.rwkv7.ChannelMix7`); LayerNorm everywhere, an
extra LayerNorm on the embeddings (block 0's ``ln0``), an untied head. Block
0's values reach the later blocks through the side channel
`layers.rwkv7.VALUE_RESIDUAL`, which the model creates in every call.

Parameter labels mirror BlinkDL's names (``blocks.3.att.w0``,
``blocks.3.att.key.weights`` ...), see `checkpoints_conversion.rwkv`.
"""

from __future__ import annotations

import dataclasses
import functools
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
    LayerNorm,
    ResidualBlock,
    dense,
    init,
    matrix_recurrence,
)
from recurrent_lm.layers.rwkv7 import VALUE_RESIDUAL, ChannelMix7, TimeMix7
from recurrent_lm.params import build_initialised

# BlinkDL initialises the embeddings uniform in [-EMBEDDING_INIT, EMBEDDING_INIT].
EMBEDDING_INIT = 1e-4


def suggested_ranks(hidden_size: int) -> tuple[int, int, int, int]:
    """BlinkDL's low-rank widths for width C (RWKV-LM's "suggestion" formulas of
    the released models): decay and in-context rate ``1.8 sqrt(C)``, value
    residual ``1.3 sqrt(C)``, gate ``0.6 C^0.8``, each rounded to a multiple of
    32, at least 32."""
    size = lambda x: max(32, int(round(x / 32) * 32))
    root = math.sqrt(hidden_size)
    return size(1.8 * root), size(1.8 * root), size(1.3 * root), size(0.6 * hidden_size**0.8)


def _world(hidden_size: int, num_hidden_layers: int, **ranks) -> dict:
    return dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, **ranks)


PRESETS_VALUES: dict[str, dict] = {
    # The released RWKV-7 World models (BlinkDL/rwkv-7-world: RWKV-x070-World-*).
    "0.1b": _world(768, 12),
    "0.4b": _world(1024, 24, gate_low_rank=128),  # the formula says 160; the release has 128
    "1.5b": _world(2048, 24),
    "2.9b": _world(2560, 32),
    # For tests, demos and training smoke runs.
    "tiny": {"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4, "head_size": 32},
}


@dataclasses.dataclass(frozen=True)
class Rwkv7Config(Config):
    """RWKV-7 hyper-parameters.

    Attributes:
      vocab_size: number of tokens (65536: the RWKV "World" tokenizer).
      hidden_size: model width C ("embedding").
      num_hidden_layers: number of blocks.
      head_size: N, the size of a head ("state", "projection"); C / N heads.
      decay_low_rank, rate_low_rank, value_low_rank, gate_low_rank: widths of
        the low-rank paths (BlinkDL's D_DECAY_LORA, D_AAA_LORA, D_MV_LORA,
        D_GATE_LORA); None means `suggested_ranks`.
      intermediate_size: channel-mix hidden width F ("mlp"); None means
        4 * hidden_size.
      layer_norm_epsilon: epsilon of every LayerNorm (ln0, ln1, ln2, ln_out).
      group_norm_epsilon: epsilon of the per-head norm of the recurrence
        output (``ln_x``).
      first_layer_value_gate: block 0 holds the value-residual gate
        parameters ``v0, v1, v2`` it never uses, as BlinkDL's files do (kept so
        that export writes back what was read).
      bos_token_id, eos_token_id: special ids (0, the World tokenizer's
        end of text, for both).
      tie_word_embeddings: share the embedding table with the head (BlinkDL's
        models never do).
      param_dtype: dtype of the parameters; computation follows it, the
        recurrence always runs in float32.
      scan_method: the matrix-scan implementation
        (`matrix_recurrence.MATRIX_SCAN_METHODS`; None picks the default).
      scan_chunk_size: chunk length of the "chunked" form.
    """

    model_type: ClassVar[str] = "rwkv7"
    presets: ClassVar[dict[str, dict]] = PRESETS_VALUES

    vocab_size: int = field(65536, rules.POSITIVE_INT)
    hidden_size: int = field(2048, rules.POSITIVE_INT)
    num_hidden_layers: int = field(24, rules.POSITIVE_INT)
    head_size: int = field(64, rules.POSITIVE_INT)
    decay_low_rank: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    rate_low_rank: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    value_low_rank: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    gate_low_rank: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    intermediate_size: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    layer_norm_epsilon: float = field(1e-5, rules.POSITIVE)
    group_norm_epsilon: float = field(64e-5, rules.POSITIVE)
    first_layer_value_gate: bool = field(True, rules.BOOL)
    bos_token_id: int = field(0, rules.NON_NEGATIVE_INT)
    eos_token_id: int = field(0, rules.NON_NEGATIVE_INT)
    tie_word_embeddings: bool = field(False, rules.BOOL)
    param_dtype: str = field("float32", rules.PARAM_DTYPE)
    scan_method: str | None = field(
        None, rules.optional(rules.one_of(*matrix_recurrence.MATRIX_SCAN_METHODS))
    )
    scan_chunk_size: int = field(matrix_recurrence.DEFAULT_CHUNK_SIZE, rules.POSITIVE_INT)

    def derived(self):
        ranks = suggested_ranks(self.hidden_size)
        names = ("decay_low_rank", "rate_low_rank", "value_low_rank", "gate_low_rank")
        values = {name: getattr(self, name) or rank for name, rank in zip(names, ranks, strict=True)}
        values["intermediate_size"] = self.intermediate_size or 4 * self.hidden_size
        return values

    def check(self):
        if self.hidden_size % self.head_size:
            yield (
                f"hidden_size {self.hidden_size} is not divisible by head_size {self.head_size}"
            )
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                yield f"{name} {getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"

    @property
    def ranks(self) -> tuple[int, int, int, int]:
        """(decay, rate, value, gate) low-rank widths."""
        return self.decay_low_rank, self.rate_low_rank, self.value_low_rank, self.gate_low_rank

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size


PRESETS: dict[str, Rwkv7Config] = {name: Rwkv7Config.from_preset(name) for name in PRESETS_VALUES}


def build_model(config: Rwkv7Config, key: jax.Array | None) -> DecoderLM:
    """Builds an RWKV-7 initialised as BlinkDL's RWKV-LM (RWKV-v7/train_temp) does.

    Vectors follow his per-channel formulas (token-shift mixes ``1 - (c/C)^p``,
    decay ``w0`` rising with the channel plus a per-head zigzag, ``a0``,
    ``v0``, ``k_k``, ``k_a``, ``r_k``); first low-rank factors start at zero,
    second ones orthogonal with gain 0.1; receptance and value orthogonal,
    key orthogonal with gain 0.1, time-mix output and channel-mix value zero,
    channel-mix key orthogonal; ``ln_x`` scale ``((i + 1) / L)^0.7``;
    embeddings uniform in +-1e-4; head orthogonal with gain
    ``0.5 sqrt(V / C)``. (His learning-rate and weight-decay groups are the
    training loop's business.)

    Args:
      config: the hyper-parameters (and build options such as ``scan_method``).
      key: PRNG key; None builds the structure with empty parameter slots, to
        be filled from a checkpoint.
    """
    # One compiled call rather than op by op (orthogonal matrices take a QR each).
    return build_initialised(_build, config, key, source="RWKV-7 initialisation")


def _build(config: Rwkv7Config, key: jax.Array | None) -> DecoderLM:
    dtype = jnp.dtype(config.param_dtype)
    width, layers = config.hidden_size, config.num_hidden_layers
    embed = {axes.EMBEDDING: width}
    vocab = {axes.VOCABULARY: config.vocab_size}
    table = pz.nn.EmbeddingTable(
        embeddings=pz.nn.make_parameter(
            "embeddings.embeddings", key, _uniform_init, {**vocab, **embed}, dtype, bound=EMBEDDING_INIT
        ),
        vocabulary_axis=axes.VOCABULARY,
    )
    norm = lambda name: LayerNorm.from_config(name, key, width, eps=config.layer_norm_epsilon, dtype=dtype)
    head = pz.nn.EmbeddingDecode(table) if config.tie_word_embeddings else _head(key, embed, vocab, dtype)
    blocks = []
    for i in range(layers):
        time_mix = TimeMix7.from_config(
            f"blocks.{i}.att", key, width, config.head_size, config.ranks, layer=i,
            num_layers=layers, keeps_unused_value_gate=config.first_layer_value_gate,
            group_norm_eps=config.group_norm_epsilon, scan_method=config.scan_method,
            chunk_size=config.scan_chunk_size, dtype=dtype,
        )
        blocks.append(ResidualBlock(
            temporal_pre_norm=norm(f"blocks.{i}.ln1"),
            temporal_block=time_mix,
            channel_pre_norm=norm(f"blocks.{i}.ln2"),
            mlp_block=ChannelMix7.from_config(
                f"blocks.{i}.ffn", key, width, config.intermediate_size, layer=i,
                num_layers=layers, dtype=dtype,
            ),
        ))
    return DecoderLM(
        config=config,
        # Block 0's ln0 normalises the embeddings: it belongs to the embedder.
        embedder=pz.nn.Sequential([EmbeddingLookup(table), norm("blocks.0.ln0")]),
        blocks=pz.nn.Sequential(blocks),
        final_norm=norm("ln_out"),
        head=head,
        side_channels=(VALUE_RESIDUAL,),
    )


def _uniform_init(key, named_shape, dtype, *, bound: float):
    data = jax.random.uniform(key, tuple(named_shape.values()), jnp.float32, -bound, bound)
    return pz.nx.wrap(data.astype(dtype)).tag(*named_shape)


def _head(key, embed, vocab, dtype):
    """Untied head, orthogonal with gain 0.5 sqrt(V / C) (0.5 when V <= C)."""
    (width,), (size,) = embed.values(), vocab.values()
    gain = 0.5 * math.sqrt(max(size / width, 1.0))
    initializer = functools.partial(init.orthogonal, in_axes=tuple(embed), scale=gain)
    return dense("head", key, embed, vocab, use_bias=False, initializer=initializer, dtype=dtype)


ARCHITECTURE = Architecture("rwkv7", Rwkv7Config, build_model, matrix_recurrence.default_matrix_scan_method)
