"""Shared test helpers for Gemma: random official-format trees and penzai's reference.

The reference is penzai 0.2.5's own Gemma converter
(`penzai.models.transformer.variants.gemma.gemma_from_pretrained_checkpoint`),
which only knows the five released presets: each case registers its shapes as
an extra preset for the duration of the call, so the converter's own mapping
code runs unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import numpy as np
from griffin_cases import documents, on_device, segment_layout
from penzai import pz

ROOT = "transformer"


@dataclasses.dataclass(frozen=True)
class GemmaCase:
    """A random official-format Gemma and inputs with plain, packed and padded rows."""

    name: str
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int  # one branch (the official "hidden_dim")
    layers: int
    vocab: int
    seq: int
    batch: int
    gemma2: bool = False
    window: int = 4096
    attn_cap: float | None = None
    final_cap: float | None = None
    head_dim_normalize: bool = True
    gating_transposed: bool = False
    seed: int = 0

    def overrides(self) -> dict:
        """The config fields the shapes cannot give."""
        if not self.gemma2:
            return {}
        return dict(
            sliding_window_size=self.window,
            attention_logit_soft_cap=self.attn_cap,
            final_logit_soft_cap=self.final_cap,
            query_head_dim_normalize=self.head_dim_normalize,
        )

    def penzai_preset(self) -> dict:
        from penzai.models.transformer.variants import llamalike_common as lc

        preset = dict(
            num_decoder_blocks=self.layers, vocab_size=self.vocab, num_kv_heads=self.kv_heads,
            query_head_multiplier=self.heads // self.kv_heads, embedding_dim=self.width,
            projection_dim=self.head_dim, mlp_hidden_dim=self.mlp,
        )
        if not self.head_dim_normalize:
            preset["query_scaling_factor"] = (self.width // self.heads) ** -0.5
        if self.gemma2:
            preset.update(
                attention_type=(lc.AttentionTypeSlidingWindowCausal(self.window),
                                lc.AttentionTypeGlobalCausal()),
                use_post_attn_norm=True, use_post_ffw_norm=True,
                final_logit_softcap=self.final_cap, attn_logits_soft_cap=self.attn_cap,
            )
        return preset


CASES = {
    # Gemma 1 multi-query: odd head count, 3 layers.
    "gemma1_mqa": GemmaCase("gemma1_mqa", 48, 3, 1, 10, 40, 3, 61, 13, 4),
    # Gemma 1 multi-head: fused qkv_einsum.
    "gemma1_mha": GemmaCase("gemma1_mha", 40, 2, 2, 16, 24, 2, 37, 11, 4, seed=1),
    # Gemma 2: grouped-query (3 query heads per KV head), soft caps small enough
    # to bite, window 4 < seq 17, query scaling by width / heads, the
    # transposed gating layout of the 9B/27B releases.
    "gemma2_gqa": GemmaCase(
        "gemma2_gqa", 36, 6, 2, 12, 30, 4, 53, 17, 4, gemma2=True, window=4, attn_cap=3.0,
        final_cap=2.0, head_dim_normalize=False, gating_transposed=True, seed=2,
    ),
}


def official_shapes(case: GemmaCase) -> dict[str, tuple[int, ...]]:
    """Flat-key official leaves ``{"transformer/layer_0/attn/q_einsum/w": shape}``."""
    D, H, KV, hd, F = case.width, case.heads, case.kv_heads, case.head_dim, case.mlp
    shapes = {"embedder/input_embedding": (case.vocab, D), "final_norm/scale": (D,)}
    for i in range(case.layers):
        layer = f"layer_{i}"
        norms = ["pre_attention_norm", "pre_ffw_norm"]
        if case.gemma2:
            norms += ["post_attention_norm", "post_ffw_norm"]
        shapes.update({f"{layer}/{n}/scale": (D,) for n in norms})
        shapes[f"{layer}/mlp/gating_einsum/w"] = (2, F, D) if case.gating_transposed else (2, D, F)
        shapes[f"{layer}/mlp/linear/w"] = (F, D)
        shapes[f"{layer}/attn/attn_vec_einsum/w"] = (H, hd, D)
        if KV == H:
            shapes[f"{layer}/attn/qkv_einsum/w"] = (3, H, D, hd)
        else:
            shapes[f"{layer}/attn/q_einsum/w"] = (H, D, hd)
            shapes[f"{layer}/attn/kv_einsum/w"] = (2, KV, D, hd)
    return {f"{ROOT}/{p}": s for p, s in shapes.items()}


@functools.cache
def official_params(case: GemmaCase, dtype=np.float32) -> dict:
    """Random leaves in the release's flat-key form: ``{"transformer/layer_0/attn/
    q_einsum": {"w": array}}``. Norm scales are non-zero (zeros would hide
    mistakes in them)."""
    rng = np.random.default_rng(100 + case.seed)
    params: dict = {}
    for path, shape in official_shapes(case).items():
        module, leaf = path.rsplit("/", 1)
        fan_in = shape[-2] if len(shape) >= 2 else 1
        scale = 0.3 if leaf == "scale" else (1.0 if "embedding" in leaf else fan_in**-0.5)
        params.setdefault(module, {})[leaf] = (scale * rng.standard_normal(shape)).astype(dtype)
    return params


@contextlib.contextmanager
def penzai_preset(case: GemmaCase):
    """Registers `case` as a preset of penzai's Gemma converter while inside."""
    from penzai.models.transformer.variants import gemma as pz_gemma

    name = f"test_{case.name}"
    pz_gemma._GEMMA_PRESETS[name] = case.penzai_preset()
    pz_gemma._NEEDS_GATING_TRANSPOSE[name] = case.gating_transposed
    try:
        yield name
    finally:
        del pz_gemma._GEMMA_PRESETS[name]
        del pz_gemma._NEEDS_GATING_TRANSPOSE[name]


def penzai_model(case: GemmaCase, params=None, **kwargs):
    from penzai.models.transformer.variants import gemma as pz_gemma

    params = official_params(case) if params is None else params
    with penzai_preset(case) as preset:
        return pz_gemma.gemma_from_pretrained_checkpoint(params, preset_name=preset, **kwargs)


# One compiled function for every call: same structure and shapes compile once.
_penzai_forward = pz.variable_jit(lambda model, tokens, pos: model(tokens, token_positions=pos))


def penzai_logits(model, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """penzai's logits [batch, seq, vocab] (compiled)."""
    tokens = pz.nx.wrap(on_device(ids)).tag("batch", "seq")
    pos = pz.nx.wrap(on_device(positions)).tag("batch", "seq")
    out = _penzai_forward(model, tokens, pos)
    return np.asarray(out.unwrap("batch", "seq", "vocabulary"))


def penzai_reference(case: GemmaCase, model, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """penzai's logits for each document run alone, placed where our model has
    them (pads: NaN). penzai has no document ids, so packed documents are split
    into rows of their own, right-padded (causal: the padding is never seen)."""
    docs = documents(pos)
    rows = np.zeros((len(docs), case.seq), np.int32)
    for k, (row, a, b) in enumerate(docs):
        rows[k, : b - a] = ids[row, a:b]
    positions = np.tile(np.arange(case.seq, dtype=np.int32), (len(docs), 1))
    logits = penzai_logits(model, rows, positions)
    out = np.full(ids.shape + (case.vocab,), np.nan, np.float32)
    for k, (row, a, b) in enumerate(docs):
        out[row, a:b] = logits[k, : b - a]
    return out


def case_inputs(case: GemmaCase):
    ids = np.asarray(
        jax.random.randint(jax.random.key(7 + case.seed), (case.batch, case.seq), 0, case.vocab),
        np.int32,
    )
    return ids, segment_layout(case.batch, case.seq)


def max_relative_error_real(actual, expected) -> float:
    """Max |a - e| / max |e| over the real (non-NaN) positions of `expected`."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    real = ~np.isnan(expected)
    return float(np.abs(actual - expected)[real].max() / np.abs(expected[real]).max())
