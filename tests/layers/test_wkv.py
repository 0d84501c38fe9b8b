"""The WKV recurrence against HF transformers' CPU loop, on its own."""

import functools
import itertools
import os

import jax
import numpy as np
import pytest
from griffin_cases import on_device, segment_layout
from penzai import pz
from streams import context

from recurrent_lm.layers import recurrence
from recurrent_lm.layers.wkv import wkv

FIXTURE = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "fixtures", "rwkv_tiny"
)


def hf_wkv(time_decay, time_first, k, v, state=None):
    """HF's `rwkv_linear_attention_cpu` in float64: (out [B, T, C], (num, den, max))."""
    import torch
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    t = lambda x: torch.from_numpy(np.asarray(x, np.float64))
    out, new_state = rwkv_linear_attention_cpu(
        t(time_decay),
        t(time_first),
        t(k),
        t(v),
        state=None if state is None else [t(s) for s in state],
        return_state=True,
    )
    return out.numpy(), tuple(s.numpy() for s in new_state)


def hf_wkv_float32(time_decay, time_first, k, v, state):
    import torch
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    t = lambda x: torch.from_numpy(np.asarray(x, np.float32))
    out, new_state = rwkv_linear_attention_cpu(
        t(time_decay),
        t(time_first),
        t(k),
        t(v),
        state=[t(s) for s in state],
        return_state=True,
    )
    return out.numpy(), tuple(s.numpy() for s in new_state)


def named(x, *names):
    return pz.nx.wrap(on_device(x)).tag(*names)


@functools.partial(jax.jit, static_argnames="method")
def _wkv_raw(time_decay, time_first, k, v, pos, state, method):
    if state is not None:
        num, den, top = (named(x, "batch", "wkv") for x in state)
        state = recurrence.ScaledState((num, den), top)
    y, last = wkv(
        named(time_decay, "wkv"),
        named(time_first, "wkv"),
        named(k, "batch", "seq", "wkv"),
        named(v, "batch", "seq", "wkv"),
        context(pos),
        state,
        method=method,
    )
    raw = lambda x: x.unwrap("batch", "wkv")
    return y.unwrap("batch", "seq", "wkv"), (
        *map(raw, last.mantissas),
        raw(last.log_scale),
    )


def ours(time_decay, time_first, k, v, pos, state=None, method=None, dtype=np.float32):
    """Our `wkv` on raw arrays (one compiled call): (y, (num, den, max))."""
    cast = lambda x: np.asarray(x, dtype)
    state = None if state is None else tuple(map(cast, state))
    y, last = _wkv_raw(
        cast(time_decay), cast(time_first), cast(k), cast(v), pos, state, method
    )
    return np.asarray(y), tuple(np.asarray(x) for x in last)


def real_state(state) -> np.ndarray:
    """(num, den) as real values num * e^max (the split itself is arbitrary)."""
    num, den, top = (np.asarray(x, np.float64) for x in state)
    return np.stack([num * np.exp(top), den * np.exp(top)])


def random_inputs(batch, seq, width, seed, key_scale=3.0):
    """Keys are float32 values: HF's loop casts them to float32 (``.float()``)."""
    rng = np.random.default_rng(seed)
    keys = (key_scale * rng.normal(size=(batch, seq, width))).astype(np.float32)
    return (
        rng.uniform(-4, 3, width),
        rng.normal(0, 1, width),
        keys.astype(np.float64),
        rng.normal(size=(batch, seq, width)),
    )


@pytest.fixture(scope="module")
def fixture_case():
    from safetensors.numpy import load_file

    return load_file(os.path.join(FIXTURE, "rwkv_tiny_expected.safetensors"))


@pytest.mark.parametrize("method", recurrence.SCAN_METHODS)
def test_matches_hf_with_large_keys_and_a_state(fixture_case, method):
    """The fixture's stress case (|k| up to ~120, an incoming state) for every method."""
    f = fixture_case
    state = (f["wkv_num0"], f["wkv_den0"], f["wkv_max0"])
    assert np.abs(f["wkv_key"]).max() > 88  # exp(k) overflows float32
    pos = (
        np.arange(f["wkv_key"].shape[1], dtype=np.int32)[None] + 5
    )  # no document start
    y, last = ours(
        f["wkv_time_decay"],
        f["wkv_time_first"],
        f["wkv_key"],
        f["wkv_value"],
        pos,
        state,
        method,
    )
    assert np.isfinite(y).all()
    np.testing.assert_allclose(
        y, f["wkv_out_f64"], rtol=0, atol=1e-5 * np.abs(f["wkv_out_f64"]).max()
    )
    expected = (f["wkv_num1_f64"], f["wkv_den1_f64"], f["wkv_max1_f64"])
    got = last
    # A log-scale near 100 carries float32 rounding of ~1e-5 into e^max: the
    # bound is HF's own float32 loop's error on the same inputs.
    _, hf32 = hf_wkv_float32(
        f["wkv_time_decay"], f["wkv_time_first"], f["wkv_key"], f["wkv_value"], state
    )
    relative = lambda s: np.abs(real_state(s) / real_state(expected) - 1).max()
    assert relative(got) <= max(2 * relative(hf32), 1e-5)


@pytest.mark.parametrize("method", recurrence.SCAN_METHODS)
def test_packed_and_padded_rows_match_hf_per_document(method):
    """Every document of a packed / padded row equals HF on that document alone.

    float64 on both sides: the comparison is of the algorithm, not of rounding.
    """
    batch, seq, width = 4, 23, 5
    decay, first, k, v = random_inputs(batch, seq, width, seed=1, key_scale=40.0)
    pos = segment_layout(batch, seq)
    with jax.enable_x64():
        y, _ = ours(decay, first, k, v, pos, method=method, dtype=np.float64)
    compared = 0
    for row in range(batch):
        starts = [t for t in range(seq) if pos[row, t] == 0] + [seq]
        for lo, hi in itertools.pairwise(starts):
            expected, _ = hf_wkv(
                decay, first, k[row : row + 1, lo:hi], v[row : row + 1, lo:hi]
            )
            np.testing.assert_allclose(
                y[row : row + 1, lo:hi], expected, rtol=1e-12, atol=1e-12
            )
            compared += hi - lo
    # Every real (non-padding) position was compared.
    assert compared == (pos >= 0).sum() and (pos == 0).sum() > batch


@pytest.mark.parametrize("chunk_size", [3])
def test_chunked_scan_with_several_chunks(chunk_size):
    batch, seq, width = 2, 19, 3
    decay, _first, k, v = random_inputs(batch, seq, width, seed=2, key_scale=50.0)
    with jax.enable_x64():
        log_a = named(-np.exp(decay), "wkv")
        inputs = (named(v, "batch", "seq", "wkv"), named(np.ones(seq), "seq"))
        keys = named(k, "batch", "seq", "wkv")
        reset = named(segment_layout(batch, seq)[:batch] == 0, "batch", "seq")
        seq_h, seq_last = recurrence.scaled_linear_scan(
            log_a, inputs, keys, reset=reset, method="sequential"
        )
        chk_h, chk_last = recurrence.scaled_linear_scan(
            log_a, inputs, keys, reset=reset, method="chunked", chunk_size=chunk_size
        )
        sequential = (*seq_h.real_values(), *seq_last.real_values())
        chunked = (*chk_h.real_values(), *chk_last.real_values())
        assert len(sequential) == len(chunked) >= 2
        for a, b in zip(sequential, chunked, strict=True):
            np.testing.assert_allclose(
                b.unwrap(*a.named_shape), a.unwrap(*a.named_shape), rtol=1e-12
            )


def test_state_continuation_equals_one_call():
    batch, seq, width = 2, 12, 4
    decay, first, k, v = random_inputs(batch, seq, width, seed=3, key_scale=60.0)
    pos = segment_layout(batch, seq)
    whole, _ = ours(decay, first, k, v, pos)
    state, pieces = None, []
    for lo, hi in ((0, 1), (1, 5), (5, 6), (6, 12)):
        y, state = ours(decay, first, k[:, lo:hi], v[:, lo:hi], pos[:, lo:hi], state)
        pieces.append(y)
    np.testing.assert_allclose(
        np.concatenate(pieces, axis=1), whole, rtol=1e-6, atol=1e-6
    )


@pytest.mark.slow
def test_100k_steps_with_huge_keys_stay_finite():
    """Keys far above 88 (exp overflows float32) and very fast / slow decays."""
    seq, width = 100_000, 4
    rng = np.random.default_rng(4)
    k = 100.0 + 30.0 * rng.normal(size=(1, seq, width))
    k[0, ::1000] = -300.0  # isolated tiny keys next to huge ones
    v = rng.normal(size=(1, seq, width))
    decay = np.array([-8.0, 0.0, 4.0, 100.0])  # w = -exp(100) = -inf in float32
    y, last = ours(decay, np.zeros(width), k, v, np.arange(seq, dtype=np.int32)[None])
    assert np.isfinite(y).all()
    assert len(last) == 3 and all(np.isfinite(x).all() for x in last)
    # A weighted mean of values: within their range.
    assert np.abs(y).max() <= np.abs(v).max() + 1e-4
    # The tail agrees with HF on the last 50 steps from the state before them.
    tail = 50
    _, before = ours(
        decay,
        np.zeros(width),
        k[:, :-tail],
        v[:, :-tail],
        np.arange(seq - tail, dtype=np.int32)[None],
    )
    state = tuple(np.asarray(x, np.float64) for x in before)
    hf_decay = np.where(
        decay > 80, 80.0, decay
    )  # float64 would not overflow; match float32's -inf
    expected, _ = hf_wkv(hf_decay, np.zeros(width), k[:, -tail:], v[:, -tail:], state)
    np.testing.assert_allclose(y[:, -tail:], expected, atol=1e-5)


def test_bad_inputs():
    log_a = named(np.zeros(3), "wkv")
    keys = named(np.zeros((2, 3)), "seq", "wkv")
    with pytest.raises(ValueError, match="at least one input"):
        recurrence.scaled_linear_scan(log_a, (), keys)
    with pytest.raises(ValueError, match="missing axes"):
        recurrence.scaled_linear_scan(log_a, (named(np.zeros(3), "wkv"),), keys)
    with pytest.raises(ValueError, match="h0 has 1 mantissas"):
        state = recurrence.empty_scaled_state({"wkv": 3}, 1)
        recurrence.scaled_linear_scan(log_a, (keys, keys), keys, h0=state)
