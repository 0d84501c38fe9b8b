"""Shared layers against small NumPy references, and stream continuation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from griffin_cases import on_device
from penzai import pz
from streams import context, continue_in_pieces, run_fresh

from recurrent_lm.core.context import DocumentContext
from recurrent_lm.layers import attention, conv, embeddings, linear, norms, rg_lru, rope


def named(x, *names):
    return pz.nx.wrap(on_device(x)).tag(*names)


def random_segment_pos(rng, batch, steps):
    """Rows with random document starts and some left padding."""
    pos = np.zeros((batch, steps), np.int32)
    for row in range(batch):
        pad = rng.integers(0, 3) if row else 0
        pos[row, :pad] = -1
        p = 0
        for t in range(pad, steps):
            if t > pad and rng.uniform() < 0.15:
                p = 0
            pos[row, t] = p
            p += 1
    return pos


def numpy_conv(x, pos, w, b):
    """Depthwise causal conv over axis 1 of [B, T, C] with document cuts."""
    batch, steps, _ = x.shape
    taps = w.shape[0]
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(batch):
        for n in range(steps):
            acc = b.astype(np.float64).copy()
            for s in range(taps):
                m = n - s
                if m < 0 or any(pos[i, k] == 0 for k in range(m + 1, n + 1)):
                    continue
                acc += w[taps - 1 - s] * x[i, m]
            out[i, n] = acc
    return out


@pytest.mark.parametrize("taps", [1, 2, 4, 5])
def test_conv_matches_numpy_with_document_cuts(taps):
    rng = np.random.default_rng(taps)
    x = rng.normal(size=(3, 13, 6)).astype(np.float32)
    pos = random_segment_pos(rng, 3, 13)
    layer = conv.CausalConv1D.from_config("conv", jax.random.key(0), 6, taps)
    w = layer.weights.value.unwrap("conv_taps", "lru")
    b = rng.normal(size=(6,)).astype(np.float32)
    layer.bias.value = named(b, "lru")
    y = layer(named(x, "batch", "seq", "lru"), context=context(pos))
    np.testing.assert_allclose(
        y.unwrap("batch", "seq", "lru"), numpy_conv(x, pos, np.asarray(w), b), rtol=1e-5, atol=1e-6
    )


def split_points(rng, steps, pieces):
    cuts = sorted(rng.choice(np.arange(1, steps), pieces - 1, replace=False))
    return [0, *cuts, steps]


@pytest.mark.parametrize("seed", range(4))
def test_conv_history_continues_the_stream(seed):
    rng = np.random.default_rng(seed)
    steps = 17
    x = named(rng.normal(size=(2, steps, 5)).astype(np.float32), "batch", "seq", "lru")
    pos = named(random_segment_pos(rng, 2, steps), "batch", "seq")
    layer = conv.CausalConv1D.from_config("conv", jax.random.key(seed), 5, 4)
    full, _ = run_fresh(layer, x, pos)
    chunked, _ = continue_in_pieces(layer, x, pos, split_points(rng, steps, 4))
    np.testing.assert_allclose(
        chunked.unwrap("batch", "seq", "lru"), full.unwrap("batch", "seq", "lru"), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("seed", range(3))
def test_rg_lru_continues_from_its_state(seed):
    rng = np.random.default_rng(seed)
    steps = 23
    x = named(rng.normal(size=(2, steps, 8)).astype(np.float32), "batch", "seq", "lru")
    pos = named(random_segment_pos(rng, 2, steps), "batch", "seq")
    layer = rg_lru.RGLRU.from_config("lru", jax.random.key(seed), 8, 2)
    full, full_last = run_fresh(layer, x, pos)
    chunked, state = continue_in_pieces(layer, x, pos, split_points(rng, steps, 5))
    np.testing.assert_allclose(
        chunked.unwrap("batch", "seq", "lru"),
        full.unwrap("batch", "seq", "lru"), rtol=1e-5, atol=1e-6,
    )
    np.testing.assert_allclose(state.unwrap("batch", "lru"), full_last.unwrap("batch", "lru"), rtol=1e-5)
    assert state.dtype == jnp.float32


def test_rg_lru_reset_forgets_the_past():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 10, 4)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]], np.int32)
    layer = rg_lru.RGLRU.from_config("lru", jax.random.key(0), 4, 2)
    y = layer(named(x, "batch", "seq", "lru"), context=context(pos))
    second = layer(named(x[:, 5:], "batch", "seq", "lru"), context=context(pos[:, 5:]))
    np.testing.assert_allclose(
        y.unwrap("batch", "seq", "lru")[:, 5:], second.unwrap("batch", "seq", "lru"), rtol=1e-6, atol=1e-7
    )


def test_rg_lru_gradient_is_finite_at_full_decay():
    # sqrt(1 - a^2) at a -> 1 has an unbounded derivative; the bound keeps it finite.
    grad = jax.grad(lambda x: rg_lru.sqrt_bounded_grad(x, 1000.0))(0.0)
    assert np.isfinite(grad) and grad == pytest.approx(1000.0)


def test_block_diagonal_linear_equals_dense_block_matrix():
    rng = np.random.default_rng(0)
    layer = linear.BlockDiagonalLinear.from_config("g", jax.random.key(0), 12, 3)
    layer.bias.value = named(rng.normal(size=(3, 4)).astype(np.float32), "heads", "block_out")
    w = np.asarray(layer.weights.value.unwrap("heads", "block_in", "block_out"))
    b = np.asarray(layer.bias.value.unwrap("heads", "block_out"))
    dense = np.zeros((12, 12))
    for h in range(3):
        dense[h * 4 : (h + 1) * 4, h * 4 : (h + 1) * 4] = w[h]
    x = rng.normal(size=(5, 12)).astype(np.float32)
    y = layer(named(x, "seq", "lru")).unwrap("seq", "lru")
    np.testing.assert_allclose(y, x @ dense + b.reshape(-1), rtol=1e-5, atol=1e-6)


def test_rms_norm_matches_numpy():
    rng = np.random.default_rng(0)
    layer = norms.RMSNorm.from_config("n", jax.random.key(0), 6, eps=1e-6)
    scale = rng.normal(size=(6,)).astype(np.float32)
    layer.scale.value = named(scale, "embedding")
    x = rng.normal(size=(3, 6)).astype(np.float32)
    expected = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * (1 + scale)
    np.testing.assert_allclose(layer(named(x, "seq", "embedding")).unwrap("seq", "embedding"), expected, rtol=1e-5)


def test_scaled_rms_norm_normalises_each_group_of_heads():
    """Over {"heads": 4, "projection": 3} in 2 groups: heads 0-1 and 2-3 are each
    normalised together (Mamba-2's gated norm), the scale stored as is."""
    rng = np.random.default_rng(0)
    layer = norms.ScaledRMSNorm.from_config("n", jax.random.key(0), {"heads": 4, "projection": 3},
                                            groups=2, eps=1e-3)
    scale = rng.normal(size=(4, 3)).astype(np.float32)
    layer.scale.value = named(scale, "heads", "projection")
    x = rng.normal(size=(5, 4, 3)).astype(np.float32)
    groups = x.reshape(5, 2, 6)
    expected = (groups / np.sqrt(np.mean(groups**2, -1, keepdims=True) + 1e-3)).reshape(5, 4, 3) * scale
    y = layer(named(x, "seq", "heads", "projection")).unwrap("seq", "heads", "projection")
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="5 groups do not divide the 12 features"):
        norms.ScaledRMSNorm.from_config("n", None, {"heads": 4, "projection": 3}, groups=5)


def test_fused_parts_split_a_fused_projection_by_position():
    x = named(np.arange(2 * 11, dtype=np.float32).reshape(2, 11), "seq", "fused")
    z, b, dt = linear.fused_parts(x, [{"heads": 2, "projection": 3}, {"state": 3}, {"heads": 2}])
    np.testing.assert_array_equal(z.unwrap("seq", "heads", "projection"), np.arange(22).reshape(2, 11)[:, :6].reshape(2, 2, 3))
    np.testing.assert_array_equal(b.unwrap("seq", "state"), np.arange(22).reshape(2, 11)[:, 6:9])
    np.testing.assert_array_equal(dt.unwrap("seq", "heads"), np.arange(22).reshape(2, 11)[:, 9:])
    with pytest.raises(ValueError, match="hold 10 features but 'fused' has 11"):
        linear.fused_parts(x, [{"state": 10}])


ROPES = {
    "half": (16, lambda: rope.RotaryEmbedding(0.5, 10_000.0), 8),
    "full": (16, lambda: rope.RotaryEmbedding(1.0, 10_000.0), 16),
    # Counts (flash-attn's rotary_emb_dim): 6 of 10 as in the H3 fixture; 30 of
    # 44 is no exact float fraction of the head (44 * (30 / 44) != 30).
    "6_of_10": (10, lambda: rope.RotaryEmbedding.leading(6, 10_000.0), 6),
    "30_of_44": (44, lambda: rope.RotaryEmbedding.leading(30, 10_000.0), 30),
}


@pytest.mark.parametrize("case", sorted(ROPES))
def test_rope_rotates_leading_pairs_in_rotate_half_layout(case):
    head_dim, make, rot = ROPES[case]
    rng = np.random.default_rng(0)
    steps = 7
    x = rng.normal(size=(steps, head_dim)).astype(np.float32)
    pos = np.array([0, 1, 2, 0, 1, 5, -1], np.int32)
    y = make()(named(x, "seq", "projection"), context=DocumentContext.build(named(pos, "seq")))
    y = y.unwrap("seq", "projection")
    half = rot // 2
    expected = x.astype(np.float64).copy()  # features from `rot` on pass through
    for t in range(steps):
        for j in range(half):
            angle = pos[t] * 10_000.0 ** (-2 * j / rot)
            a, b = x[t, j], x[t, j + half]
            expected[t, j] = a * np.cos(angle) - b * np.sin(angle)
            expected[t, j + half] = b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_rope_rejects_odd_rotary_width():
    with pytest.raises(ValueError, match="must be an even integer"):
        rope.rotary_dims(12, 0.25)
    with pytest.raises(ValueError, match="must be an even integer"):
        rope.rotary_dims(44, 30 / 44)  # why counts exist
    for dims in (5, 12):
        with pytest.raises(ValueError, match=f"RoPE on {dims} features of head_dim 10"):
            rope.RotaryEmbedding.leading(dims, 10_000.0).features(10)


def test_learned_positions_add_the_row_of_each_documents_position():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(6, 4)).astype(np.float32)
    layer = embeddings.LearnedPositions(
        table=pz.Parameter(value=named(table, "positions", "embedding"), label="positions"))
    x = rng.normal(size=(2, 7, 4)).astype(np.float32)
    pos = np.array([[-1, 0, 1, 2, 0, 1, 5], [0, 1, 2, 3, 4, 5, 6]], np.int32)
    y = layer(named(x, "batch", "seq", "embedding"), context=DocumentContext.build(named(pos, "batch", "seq")))
    y = np.asarray(y.unwrap("batch", "seq", "embedding"))
    # Padding reads row 0; position 6 is past the 6-row table: NaN, not a clamped row.
    expected = x + table[np.clip(pos, 0, 5)]
    np.testing.assert_allclose(y[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(y[1, :6], expected[1, :6], rtol=1e-6)
    assert np.isnan(y[1, 6]).all()


def test_causal_mask_sees_window_plus_one_keys_within_documents():
    pos = np.array([[-1, -1, 0, 1, 2, 3, 4, 0, 1, 2]], np.int32)
    mask = attention.causal_mask(context(pos), window_size=2)
    m = np.asarray(mask.unwrap("batch", "seq", "kv_seq"))[0]
    for q in range(10):
        for k in range(10):
            same_doc = (q < 2 and k < 2) or (2 <= q < 7 and 2 <= k < 7) or (q >= 7 and k >= 7)
            assert m[q, k] == (same_doc and k <= q and q - k <= 2), (q, k)


def test_attention_groups_query_heads_onto_kv_heads():
    rng = np.random.default_rng(0)
    steps, heads, kv_heads, dim = 5, 4, 2, 3
    q = rng.normal(size=(steps, heads, dim)).astype(np.float32)
    k = rng.normal(size=(steps, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(steps, kv_heads, dim)).astype(np.float32)
    mask = np.tril(np.ones((steps, steps), bool))
    out = np.asarray(attention.attend(q, k, v, mask, query_scale=0.5, logits_soft_cap=None))
    for h in range(heads):
        g = h // (heads // kv_heads)
        logits = np.where(mask, q[:, h] @ k[:, g].T * 0.5, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[:, h], probs @ v[:, g], rtol=1e-5, atol=1e-6)


def test_context_counts_documents_and_distances_to_starts():
    pos = np.array([[-1, 0, 1, 0, 0, 1, 2, -1]], np.int32)
    ctx = DocumentContext.build(named(pos, "batch", "seq"))
    np.testing.assert_array_equal(ctx.document_id.unwrap("batch", "seq"), [[0, 1, 1, 2, 3, 3, 3, 3]])
    since = ctx.since_start.unwrap("batch", "seq")
    np.testing.assert_array_equal(since[:, 1:], [[0, 1, 0, 0, 1, 2, 3]])
    assert since[0, 0] > 1000  # no start yet: every earlier token is reachable


def test_layers_need_a_context():
    layer = conv.CausalConv1D.from_config("conv", jax.random.key(0), 4, 4)
    with pytest.raises(ValueError, match="needs the side input context"):
        layer(named(np.zeros((1, 3, 4), np.float32), "batch", "seq", "lru"))


def test_embedding_lookup_gives_nan_rows_for_ids_outside_the_vocabulary():
    """Under jit ids have no values to check: a bad one must not clamp to a
    valid row (nor -1 read the last row), but come out NaN."""
    from recurrent_lm.layers.embeddings import EmbeddingLookup, embedding_table

    table = embedding_table("e", jax.random.key(0), 5, 3)
    rows = np.asarray(table.embeddings.value.unwrap("vocabulary", "embedding"))
    ids = jnp.asarray([[0, 4, 5, -1, 2, 1 << 30, -(1 << 30)]], jnp.int32)
    lookup = jax.jit(lambda ids: EmbeddingLookup(table)(pz.nx.wrap(ids).tag("batch", "seq")))
    out = np.asarray(lookup(ids).unwrap("batch", "seq", "embedding"))[0]
    np.testing.assert_array_equal(out[[0, 1, 4]], rows[[0, 4, 2]])
    assert np.isnan(out[[2, 3, 5, 6]]).all()
