"""H3, Hungry Hungry Hippos (arXiv 2212.14052), with hybrid attention layers.

A pre-LN decoder: ``x += mixer(LN1(x)); x += MLP(LN2(x))``, final LN and a
tied head over the padded vocabulary. No position embeddings in the releases;
with ``max_position_embeddings > 0``, learned ones added to the token
embeddings (the original's GPT-2 embeddings). The mixer is the H3 layer
(head_dim 1, as in every release)::

    q, k, v = q_proj(u), k_proj(u), v_proj(u)
    y = DiagSSM(ShiftSSM(k) * v)          # each SSM with its own skip D
    out = output_linear(q * y)

except at ``attn_layer_idx``, where it is causal multi-head attention (fused
qkv with biases; GPT-NeoX-style RoPE on the first ``rotary_emb_dim``
features of each head for the rotary 2.7B). Parameter labels mirror the
released checkpoints' (``blocks.3.mixer.kernel.log_dt`` ...), see
`checkpoints_conversion.h3`.

Dropout layers (embedding and residual) are built disabled: models run in
evaluation mode by default. `training_mode` enables them; a training step
then passes ``random_stream=pz.RandomStream.from_base_key(key)`` to
``model.forward``.
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
    MLP,
    Attention,
    DiagonalSSM,
    EmbeddingLookup,
    LayerNorm,
    LearnedPositions,
    ResidualBlock,
    RotaryEmbedding,
    ShiftSSM,
    dense,
    recurrence,
    ssm,
)

SSM_MODES = ("diag",)
SSM_MEASURES = ("diag-lin", "diag-inv")
# The original's head_dim > 1 lays out its output channels differently in its
# two code paths: there is no single behaviour to reproduce.
ONLY_HEAD_DIM_1 = rules.Rule(lambda v: v == 1, "1 (every released model; the original's head_dim > 1 is"
                       " inconsistent between its code paths)")
DROPOUT_RATE = rules.Rule(lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)")


PRESETS_VALUES: dict[str, dict] = {
    "125m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        attn_layer_idx=(6,),
    ),
    "355m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        attn_layer_idx=(8, 16),
    ),
    "1.3b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        attn_layer_idx=(8, 16),
    ),
    "2.7b": dict(
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=20,
        attn_layer_idx=(8, 16, 24),
    ),
    # model-2attn-rotary.pt of the 2.7B release.
    "2.7b-2attn-rotary": dict(
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=20,
        attn_layer_idx=(10, 21),
        rotary_emb_dim=64,
    ),
    # For tests, demos and the training CLI: small enough to train on a CPU.
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        attn_layer_idx=(1,),
        d_state=16,
    ),
}


@dataclasses.dataclass(frozen=True)
class H3Config(Config):
    """H3 hyper-parameters, with the field names of the HF port's H3Config.

    Attributes:
      vocab_size: rows of the (tied) embedding, i.e. the padded vocabulary
        (GPT-2's 50257 padded to a multiple of 8: 50264).
      hidden_size: model width D.
      num_hidden_layers: number of blocks.
      num_attention_heads: heads of the attention layers.
      n_inner: MLP hidden width; None means 4 * hidden_size.
      residual_dropout: dropout on every branch output (training mode only).
      embedding_dropout: dropout on the embeddings (training mode only).
      residual_in_fp32: keep the residual stream in float32 with low-precision
        parameters, as the original does (the blocks then compute in float32
        from the low-precision weights); a no-op with float32 parameters.
      layer_norm_epsilon: LayerNorm epsilon.
      initializer_range: std of the normal init of linear and embedding weights.
      rescale_prenorm_residual: scale the init std of the attention output and
        MLP down projections by 1/sqrt(2 * num_hidden_layers).
      glu_act: kept for config compatibility; it only changes the init of
        weights H3 layers do not have (the original looks for
        ``output_linear.0.weight``), so it has no effect.
      ssm_mode: "diag" (S4D), the only mode of the released models.
      ssm_measure: S4D init, "diag-lin" (released) or "diag-inv".
      attn_layer_idx: indices of the attention layers.
      d_state: N, the SSM state size (N/2 complex modes in the diagonal SSM).
      discretisation: "bilinear" (the released checkpoints') or "zoh".
      head_dim: H3 head dimension; only 1 (every release): the original's
        head_dim > 1 lays out its output channels differently in its two code
        paths, so there is no single behaviour to reproduce.
      rotary_emb_dim: RoPE features per attention head (64 for the rotary
        2.7B), 0 for none: the first ones of each head, rotate-half pairs
        (j, j + rotary_emb_dim/2), base 10000, as flash-attn's.
      attention_softmax_scale: multiplies the query-key products; None means
        1/sqrt(attention head dim) (the original's ``softmax_scale``).
      max_position_embeddings: rows of a learned position-embedding table
        added to the token embeddings at each token's position in its
        document (GPT-2 style); 0 (every release) for none. Positions past
        the table give NaN logits.
      param_dtype: dtype of the parameters (the SSMs always compute in float32).
      ssm_method: how the diagonal SSMs run over a sequence: "fft" (kernel
        convolution, the original's route) or "scan" (the recurrence).
      scan_method: `linear_scan` implementation of the "scan" route (None =
        backend default).
    """

    model_type: ClassVar[str] = "h3"
    presets: ClassVar[dict[str, dict]] = PRESETS_VALUES

    vocab_size: int = field(50264, rules.POSITIVE_INT)
    hidden_size: int = field(768, rules.POSITIVE_INT)
    num_hidden_layers: int = field(12, rules.POSITIVE_INT)
    num_attention_heads: int = field(12, rules.POSITIVE_INT)
    n_inner: int | None = field(None, rules.optional(rules.POSITIVE_INT))
    residual_dropout: float = field(0.0, DROPOUT_RATE)
    embedding_dropout: float = field(0.1, DROPOUT_RATE)
    residual_in_fp32: bool = field(True, rules.BOOL)
    layer_norm_epsilon: float = field(1e-5, rules.POSITIVE)
    initializer_range: float = field(0.02, rules.POSITIVE)
    rescale_prenorm_residual: bool = field(True, rules.BOOL)
    glu_act: bool = field(False, rules.BOOL)
    ssm_mode: str = field("diag", rules.one_of(*SSM_MODES))
    ssm_measure: str = field("diag-lin", rules.one_of(*SSM_MEASURES))
    attn_layer_idx: tuple[int, ...] = field((6,), rules.tuple_of(rules.NON_NEGATIVE_INT))
    d_state: int = field(64, rules.POSITIVE_INT)
    discretisation: str = field("bilinear", rules.one_of(*ssm.DISCRETISATIONS))
    head_dim: int = field(1, ONLY_HEAD_DIM_1)
    rotary_emb_dim: int = field(0, rules.NON_NEGATIVE_INT)
    attention_softmax_scale: float | None = field(None, rules.optional(rules.POSITIVE))
    max_position_embeddings: int = field(0, rules.NON_NEGATIVE_INT)
    param_dtype: str = field("float32", rules.PARAM_DTYPE)
    ssm_method: str = field("fft", rules.one_of(*ssm.SSM_METHODS))
    scan_method: str | None = field(None, rules.optional(rules.one_of(*recurrence.SCAN_METHODS)))

    def derived(self):
        return {"n_inner": self.n_inner or 4 * self.hidden_size}

    def check(self):
        bad = [i for i in self.attn_layer_idx if i >= self.num_hidden_layers]
        if bad:
            yield f"attn_layer_idx has {bad}, outside [0, num_hidden_layers={self.num_hidden_layers})"
        if len(set(self.attn_layer_idx)) != len(self.attn_layer_idx):
            yield f"attn_layer_idx {self.attn_layer_idx} has duplicates"
        if self.d_state % 2:
            yield f"d_state must be even (N/2 complex modes), got {self.d_state}"
        if not self.attn_layer_idx:  # the heads of no layer
            return
        if self.hidden_size % self.num_attention_heads:
            yield (f"num_attention_heads {self.num_attention_heads} does not divide"
                   f" hidden_size {self.hidden_size}")
            return
        head = self.attention_head_dim
        if self.rotary_emb_dim % 2 or self.rotary_emb_dim > head:
            yield (f"rotary_emb_dim must be even and in [0, attention head dim {head}],"
                   f" got {self.rotary_emb_dim}")

    @property
    def attention_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, H3Config] = {name: H3Config.from_preset(name) for name in PRESETS_VALUES}


@pz.pytree_dataclass
class H3Mixer(pz.nn.Layer):
    """The H3 layer: ``output_linear(q * DiagSSM(ShiftSSM(k) * v))``.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"};
    q, k, v and the SSM channels are {..., "seq", "heads": D} (head_dim 1).
    Side input: ``context`` (both SSMs restart at document starts).
    """

    q_proj: pz.nn.Layer
    k_proj: pz.nn.Layer
    v_proj: pz.nn.Layer
    ssm_k: ShiftSSM
    kernel: DiagonalSSM
    output_linear: pz.nn.Layer

    def __call__(self, x, **side_inputs):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        z = self.ssm_k(k, **side_inputs) * v
        return self.output_linear(q * self.kernel(z, **side_inputs))


def _dense(name, key, config: H3Config, in_axes, out_axes, std=None):
    """Linear + bias, weights N(0, std) (default: initializer_range), biases 0."""
    std = config.initializer_range if std is None else std
    fan_in = math.prod(in_axes.values())
    return dense(
        name,
        key,
        in_axes,
        out_axes,
        use_bias=True,
        init_scale=std * std * fan_in,
        dtype=jnp.dtype(config.param_dtype),
    )


def _dropout(rate: float) -> pz.nn.DisabledDropout:
    return pz.nn.DisabledDropout(drop_rate=rate, share_across_axes=())


def _h3_mixer(name, key, config: H3Config) -> H3Mixer:
    embed, chans = (
        {axes.EMBEDDING: config.hidden_size},
        {axes.HEADS: config.hidden_size},
    )
    dtype = jnp.dtype(config.param_dtype)
    return H3Mixer(
        q_proj=_dense(f"{name}.q_proj", key, config, embed, chans),
        k_proj=_dense(f"{name}.k_proj", key, config, embed, chans),
        v_proj=_dense(f"{name}.v_proj", key, config, embed, chans),
        ssm_k=ShiftSSM.from_config(
            f"{name}.ssm_k", key, config.hidden_size, config.d_state, dtype=dtype
        ),
        kernel=DiagonalSSM.from_config(
            f"{name}.kernel",
            key,
            config.hidden_size,
            config.d_state,
            measure=config.ssm_measure,
            discretisation=config.discretisation,
            method=config.ssm_method,
            scan_method=config.scan_method,
            dtype=dtype,
        ),
        # Not rescaled: the original's rescaling looks for output_linear.0.weight.
        output_linear=_dense(f"{name}.output_linear", key, config, chans, embed),
    )


def _attention(name, key, config: H3Config, residual_std) -> Attention:
    heads, dim = config.num_attention_heads, config.attention_head_dim
    embed = {axes.EMBEDDING: config.hidden_size}
    q_axes = {axes.HEADS: heads, axes.PROJECTION: dim}
    kv_axes = {axes.KV_HEADS: heads, axes.PROJECTION: dim}
    return Attention(
        query=_dense(f"{name}.query", key, config, embed, q_axes),
        key=_dense(f"{name}.key", key, config, embed, kv_axes),
        value=_dense(f"{name}.value", key, config, embed, kv_axes),
        output=_dense(f"{name}.output", key, config, q_axes, embed, std=residual_std),
        # A count, not a fraction of the head: e.g. 30 of 44 has no exact float fraction.
        rope=(
            RotaryEmbedding.leading(config.rotary_emb_dim, 10000.0)
            if config.rotary_emb_dim
            else None
        ),
        window_size=None,
        query_scale=config.attention_softmax_scale or dim**-0.5,
    )


def _positions(key, config: H3Config) -> LearnedPositions:
    """GPT-2 learned positions, N(0, initializer_range) as the original's nn.Embedding."""
    return LearnedPositions(
        table=pz.nn.make_parameter(
            "embedder.position_embeddings",
            key,
            ssm.normal_init,
            {axes.POSITIONS: config.max_position_embeddings, axes.EMBEDDING: config.hidden_size},
            jnp.dtype(config.param_dtype),
            std=config.initializer_range,
        )
    )


def build_model(config: H3Config, key: jax.Array | None) -> DecoderLM:
    """Builds an H3 LM initialised as the original code does.

    Args:
      config: the hyper-parameters (and build options: ``ssm_method``,
        ``scan_method``).
      key: PRNG key; None builds the structure with empty parameter slots, to
        be filled from a checkpoint.
    """
    dtype = jnp.dtype(config.param_dtype)
    std = config.initializer_range
    residual_std = (
        std / math.sqrt(2 * config.num_hidden_layers)
        if config.rescale_prenorm_residual
        else std
    )
    table = pz.nn.EmbeddingTable(
        embeddings=pz.nn.make_parameter(
            "embedder.embeddings",
            key,
            ssm.normal_init,
            {axes.VOCABULARY: config.vocab_size, axes.EMBEDDING: config.hidden_size},
            dtype,
            std=std,
        ),
        vocabulary_axis=axes.VOCABULARY,
    )
    embedder = [EmbeddingLookup(table)]
    if config.max_position_embeddings:
        embedder.append(_positions(key, config))
    if config.residual_in_fp32:  # a no-op with float32 parameters
        embedder.append(pz.nn.CastToDType(jnp.float32))
    embedder.append(_dropout(config.embedding_dropout))
    blocks = []
    for i in range(config.num_hidden_layers):
        name = f"blocks.{i}"
        if i in config.attn_layer_idx:
            mixer = _attention(f"{name}.mixer", key, config, residual_std)
        else:
            mixer = _h3_mixer(f"{name}.mixer", key, config)
        norm = lambda part, name=name: LayerNorm.from_config(
            f"{name}.{part}",
            key,
            config.hidden_size,
            eps=config.layer_norm_epsilon,
            dtype=dtype,
        )
        mlp = MLP.from_config(
            f"{name}.mlp",
            key,
            width=config.hidden_size,
            hidden_width=config.n_inner,
            use_bias=True,
            up_init_scale=std * std * config.hidden_size,
            down_init_scale=residual_std**2 * config.n_inner,
            dtype=dtype,
        )
        blocks.append(
            ResidualBlock(
                temporal_pre_norm=norm("norm1"),
                temporal_block=pz.nn.Sequential(
                    [mixer, _dropout(config.residual_dropout)]
                ),
                channel_pre_norm=norm("norm2"),
                mlp_block=pz.nn.Sequential([mlp, _dropout(config.residual_dropout)]),
            )
        )
    return DecoderLM(
        config=config,
        embedder=pz.nn.Sequential(embedder),
        blocks=pz.nn.Sequential(blocks),
        final_norm=LayerNorm.from_config(
            "final_norm",
            key,
            config.hidden_size,
            eps=config.layer_norm_epsilon,
            dtype=dtype,
        ),
        head=pz.nn.Sequential([pz.nn.EmbeddingDecode(table)]),
    )


def training_mode(model):
    """`model` with its dropout layers enabled (pass ``random_stream`` to forward)."""
    return (
        pz.select(model)
        .at_instances_of(pz.nn.DisabledDropout)
        .apply(lambda d: d.enable())
    )


def eval_mode(model):
    """`model` with its dropout layers disabled (the default after `build_model`)."""
    return (
        pz.select(model)
        .at_instances_of(pz.nn.StochasticDropout)
        .apply(lambda d: d.disable())
    )


def mixer(model: DecoderLM, layer: int) -> pz.nn.Layer:
    """The mixer (H3 layer or attention) of block `layer`."""
    return model.blocks.sublayers[layer].temporal_block.sublayers[0]


ARCHITECTURE = Architecture("h3", H3Config, build_model, recurrence.default_scan_method)
