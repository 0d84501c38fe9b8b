"""RWKV-4 (arXiv 2305.13048): the "Pile" language models.

A stack of `ResidualBlock`s whose temporal block is time mixing (token shift +
WKV recurrence, `layers.wkv.TimeMix`) and whose channel block is channel mixing
(token shift + squared-ReLU MLP, `layers.channel_mix.ChannelMix`); LayerNorm
everywhere, an extra LayerNorm on the embeddings (block 0's ``pre_ln``), an
untied head. Parameter labels mirror HF transformers' names without the
``rwkv.`` prefix (``blocks.3.attention.time_decay`` ...), see
`checkpoints_conversion.rwkv`.

HF's ``rescale_every`` (halving the residual stream every few blocks at
inference, an fp16 overflow guard) is kept in the config for round trips but
not applied: through the LayerNorms it changes the result only by the norm
epsilon (~1e-4 on logits), and training never applies it.
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
    recurrence,
)
from recurrent_lm.layers.channel_mix import ChannelMix
from recurrent_lm.layers.wkv import TimeMix
from recurrent_lm.params import build_initialised

# torch's LayerNorm default: HF builds ln_out without the config's epsilon.
LN_OUT_EPS = 1e-5
# BlinkDL initialises the embeddings uniform in [-EMBEDDING_INIT, EMBEDDING_INIT].
EMBEDDING_INIT = 1e-4


def _pile(hidden_size: int, num_hidden_layers: int) -> dict:
    return dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)


PRESETS_VALUES: dict[str, dict] = {
    # The released RWKV-4 Pile models (HF hub RWKV/rwkv-4-*-pile).
    "169m": _pile(768, 12),
    "430m": _pile(1024, 24),
    "1b5": _pile(2048, 24),
    "3b": _pile(2560, 32),
    "7b": _pile(4096, 32),
    "14b": _pile(5120, 40),
    # For tests, demos and training smoke runs.
    "tiny": dict(vocab_size=512, context_length=256, hidden_size=128, num_hidden_layers=4),
}


@dataclasses.dataclass(frozen=True)
class RwkvConfig(Config):
    """RWKV-4 hyper-parameters, with the field names of HF's RwkvConfig.

    Attributes:
      vocab_size: number of tokens (50277: the GPT-NeoX-20B tokenizer).
      context_length: the training context (HF's CUDA kernel limit); the
        model itself runs any length.
      hidden_size: model width C ("embedding").
      num_hidden_layers: number of blocks.
      attention_hidden_size: width A of k, v, r and the WKV recurrence
        ("wkv"); None means hidden_size.
      intermediate_size: channel-mix hidden width F ("mlp"); None means
        4 * hidden_size.
      layer_norm_epsilon: epsilon of the block LayerNorms (the final one uses
        1e-5, as HF does).
      bos_token_id, eos_token_id: special ids (0 for the Pile models).
      rescale_every: HF's inference-only rescaling period; stored, not applied
        (see the module docstring).
      tie_word_embeddings: share the embedding table with the head.
      param_dtype: dtype of the parameters; computation follows it, the WKV
        recurrence always runs in float32.
      scan_method: the WKV scan implementation (`recurrence.SCAN_METHODS`;
        None picks the backend default).
    """

    model_type: ClassVar[str] = "rwkv"
    presets: ClassVar[dict[str, dict]] = PRESETS_VALUES

    vocab_size: int = field(50277, rules.POSITIVE_INT)
    context_length: int = field(1024, rules.POSITIVE_INT)
    hidden_size: int = field(4096, rules.POSITIVE_INT)
    num_hidden_layers: int = field(32, rules.POSITIVE_INT)
    attention_hidden_size: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    intermediate_size: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    layer_norm_epsilon: float = field(1e-5, rules.POSITIVE)
    bos_token_id: int = field(0, rules.NON_NEGATIVE_INT)
    eos_token_id: int = field(0, rules.NON_NEGATIVE_INT)
    rescale_every: int = field(6, rules.INT)
    tie_word_embeddings: bool = field(False, rules.BOOL)
    param_dtype: str = field("float32", rules.PARAM_DTYPE)
    scan_method: str | None = field(None, rules.optional(rules.one_of(*recurrence.SCAN_METHODS)))

    def derived(self):
        return {
            "attention_hidden_size": self.attention_hidden_size or self.hidden_size,
            "intermediate_size": self.intermediate_size or 4 * self.hidden_size,
        }

    def check(self):
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                yield f"{name} {getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"


PRESETS: dict[str, RwkvConfig] = {name: RwkvConfig.from_preset(name) for name in PRESETS_VALUES}


def build_model(config: RwkvConfig, key: jax.Array | None) -> DecoderLM:
    """Builds an RWKV-4 initialised as BlinkDL's RWKV-LM does.

    Args:
      config: the hyper-parameters (and build options such as ``scan_method``).
      key: PRNG key; None builds the structure with empty parameter slots, to
        be filled from a checkpoint.
    """
    # One compiled call rather than op by op (orthogonal matrices take a QR each).
    return build_initialised(_build, config, key, source="RWKV initialisation")


def _build(config: RwkvConfig, key: jax.Array | None) -> DecoderLM:
    dtype = jnp.dtype(config.param_dtype)
    width, layers = config.hidden_size, config.num_hidden_layers
    embed = {axes.EMBEDDING: width}
    vocab = {axes.VOCABULARY: config.vocab_size}
    table = pz.nn.EmbeddingTable(
        embeddings=pz.nn.make_parameter(
            "embeddings.embeddings",
            key,
            _uniform_init,
            {**vocab, **embed},
            dtype,
            bound=EMBEDDING_INIT,
        ),
        vocabulary_axis=axes.VOCABULARY,
    )
    norm = lambda name, eps=config.layer_norm_epsilon: LayerNorm.from_config(
        name, key, width, eps=eps, dtype=dtype
    )
    if config.tie_word_embeddings:
        head = pz.nn.EmbeddingDecode(table)
    else:
        head = _head(key, embed, vocab, dtype)
    blocks = [
        ResidualBlock(
            temporal_pre_norm=norm(f"blocks.{i}.ln1"),
            temporal_block=TimeMix.from_config(
                f"blocks.{i}.attention",
                key,
                width,
                config.attention_hidden_size,
                layer=i,
                num_layers=layers,
                scan_method=config.scan_method,
                dtype=dtype,
            ),
            channel_pre_norm=norm(f"blocks.{i}.ln2"),
            mlp_block=ChannelMix.from_config(
                f"blocks.{i}.feed_forward",
                key,
                width,
                config.intermediate_size,
                layer=i,
                num_layers=layers,
                dtype=dtype,
            ),
        )
        for i in range(layers)
    ]
    return DecoderLM(
        config=config,
        # Block 0's pre_ln normalises the embeddings: it belongs to the embedder.
        embedder=pz.nn.Sequential(
            [EmbeddingLookup(table), norm("blocks.0.pre_ln")]
        ),
        blocks=pz.nn.Sequential(blocks),
        final_norm=norm("ln_out", LN_OUT_EPS),
        head=head,
    )


def _uniform_init(key, named_shape, dtype, *, bound: float):
    data = jax.random.uniform(
        key, tuple(named_shape.values()), jnp.float32, -bound, bound
    )
    return pz.nx.wrap(data.astype(dtype)).tag(*named_shape)


def _head(key, embed, vocab, dtype):
    """Untied head, orthogonal with gain 0.5 sqrt(V / C) (BlinkDL)."""
    (width,), (size,) = embed.values(), vocab.values()
    gain = 0.5 * math.sqrt(max(size / width, 1.0))
    initializer = functools.partial(init.orthogonal, in_axes=tuple(embed), scale=gain)
    return dense(
        "head", key, embed, vocab, use_bias=False, initializer=initializer, dtype=dtype
    )


ARCHITECTURE = Architecture("rwkv", RwkvConfig, build_model, recurrence.default_scan_method)
