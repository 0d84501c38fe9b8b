"""The linear-recurrence primitive against a float64 NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from griffin_cases import on_device
from jax.test_util import check_grads
from penzai import pz

from recurrent_lm.layers import recurrence
from recurrent_lm.layers.recurrence import linear_scan

METHODS = recurrence.SCAN_METHODS


def numpy_scan(a, b, h0, reset):
    """h_t = a_t h_{t-1} + b_t over axis 1 of [B, T, D], float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    h = np.asarray(h0, np.float64)
    out = np.zeros_like(b)
    for t in range(b.shape[1]):
        a_t = np.where(reset[:, t, None], 0.0, a[:, t])
        h = a_t * h + b[:, t]
        out[:, t] = h
    return out, h


def random_inputs(seed, batch, steps, width, dtype=np.float32):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.3, 1.0, (batch, steps, width)).astype(dtype)
    b = rng.normal(size=(batch, steps, width)).astype(dtype)
    h0 = rng.normal(size=(batch, width)).astype(dtype)
    reset = rng.uniform(size=(batch, steps)) < 0.1
    return a, b, h0, reset


def named(x, *names):
    return pz.nx.wrap(on_device(x)).tag(*names)


def run(method, a, b, h0, reset, chunk_size=128):
    h, last = linear_scan(
        named(a, "batch", "seq", "lru"),
        named(b, "batch", "seq", "lru"),
        h0=None if h0 is None else named(h0, "batch", "lru"),
        reset=None if reset is None else named(reset, "batch", "seq"),
        method=method,
        chunk_size=chunk_size,
    )
    return h.unwrap("batch", "seq", "lru"), last.unwrap("batch", "lru")


CASES = [(m, steps, 128) for m in ("sequential", "associative") for steps in (1, 2, 37, 300)] + [
    ("chunked", steps, chunk) for steps in (1, 2, 37, 300) for chunk in (1, 7, 128, 1000)
]


@pytest.mark.parametrize("method, steps, chunk_size", CASES)
def test_matches_float64_loop(method, steps, chunk_size):
    a, b, h0, reset = random_inputs(steps, 3, steps, 5)
    expected, expected_last = numpy_scan(a, b, h0, reset)
    h, last = run(method, a, b, h0, reset, chunk_size)
    np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, expected_last, rtol=1e-5, atol=1e-5)
    assert h.dtype == np.float32 and last.dtype == np.float32


@pytest.mark.parametrize("method", METHODS)
def test_without_h0_or_reset(method):
    a, b, _, _ = random_inputs(1, 2, 20, 4)
    expected, _ = numpy_scan(a, b, np.zeros((2, 4)), np.zeros((2, 20), bool))
    h, _ = run(method, a, b, None, None)
    np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-5)


def test_methods_agree_with_each_other():
    a, b, h0, reset = random_inputs(3, 2, 257, 8)
    results = [run(m, a, b, h0, reset, chunk_size=16) for m in METHODS]
    for h, last in results[1:]:
        np.testing.assert_allclose(h, results[0][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(last, results[0][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_inputs_accumulate_in_float32(method):
    # 2000 steps with decay ~1: a bfloat16 accumulator would drift by ~1e-1.
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.99, 1.0, (1, 2000, 4)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(1, 2000, 4)), jnp.bfloat16)
    expected, expected_last = numpy_scan(
        np.asarray(a, np.float64), np.asarray(b, np.float64), np.zeros((1, 4)), np.zeros((1, 2000), bool)
    )
    h, last = run(method, a, b, None, None, chunk_size=64)
    assert h.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(last, np.float64), expected_last, rtol=2e-5, atol=2e-5)
    # Outputs are rounded to bfloat16 once, after float32 accumulation.
    np.testing.assert_allclose(np.asarray(h, np.float64), expected, rtol=2**-8, atol=1e-2)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_finite_differences(method):
    a, b, h0, reset = random_inputs(4, 2, 19, 3, dtype=np.float64)
    reset_named = named(reset, "batch", "seq")

    def loss(a, b, h0):
        h, last = linear_scan(
            named(a, "batch", "seq", "lru"), named(b, "batch", "seq", "lru"),
            h0=named(h0, "batch", "lru"), reset=reset_named, method=method, chunk_size=4,
        )
        weights = jnp.linspace(-1.0, 1.0, 19)[None, :, None]
        return jnp.sum(h.unwrap("batch", "seq", "lru") * weights) + jnp.sum(last.unwrap("batch", "lru") ** 2)

    with jax.enable_x64(True):
        check_grads(loss, (jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0)), order=1, modes=["rev"], eps=1e-6)


def test_gradients_agree_across_methods():
    a, b, h0, reset = random_inputs(5, 2, 50, 3)

    def grads(method):
        def loss(a, b, h0):
            h, _ = run(method, a, b, h0, reset, chunk_size=8)
            return jnp.sum(jnp.sin(h))
        return jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0))

    reference = grads("sequential")
    for method in ("associative", "chunked"):
        for g, r in zip(grads(method), reference, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_decay_without_sequence_axis_broadcasts():
    rng = np.random.default_rng(0)
    decay = rng.uniform(0.5, 1.0, (4,)).astype(np.float32)
    b = rng.normal(size=(2, 10, 4)).astype(np.float32)
    h, _ = linear_scan(named(decay, "lru"), named(b, "batch", "seq", "lru"))
    expected, _ = numpy_scan(np.broadcast_to(decay, b.shape), b, np.zeros((2, 4)), np.zeros((2, 10), bool))
    np.testing.assert_allclose(h.unwrap("batch", "seq", "lru"), expected, rtol=1e-5, atol=1e-5)


def test_default_method_per_backend():
    assert recurrence.default_scan_method("cpu") == "sequential"
    assert recurrence.default_scan_method("gpu") == "associative"
    assert recurrence.default_scan_method("tpu") == "associative"


def test_bad_arguments_raise_clear_errors():
    a, b, _, _ = random_inputs(0, 2, 6, 3)
    a_n, b_n = named(a, "batch", "seq", "lru"), named(b, "batch", "seq", "lru")
    with pytest.raises(ValueError, match="unknown scan method 'fast'"):
        linear_scan(a_n, b_n, method="fast")
    with pytest.raises(ValueError, match="missing axes \\['time'\\]"):
        linear_scan(a_n, b_n, axis="time")
    with pytest.raises(ValueError, match="must not have the scanned axis"):
        linear_scan(a_n, b_n, h0=named(b[:, :, 0], "batch", "seq"))
    with pytest.raises(ValueError, match="axis .lru. has size 2 in one input and 3 in another"):
        linear_scan(a_n, named(b[..., :2], "batch", "seq", "lru"))
    with pytest.raises(TypeError, match="penzai NamedArray"):
        linear_scan(a, b_n)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        linear_scan(a_n, b_n, method="chunked", chunk_size=0)


@pytest.mark.parametrize("method", METHODS)
def test_scaled_form_matches_the_float64_loop(method):
    """`scaled_linear_scan` is the same recurrence: h_t = e^{log_a} h_{t-1} + e^{s_t} b_t."""
    a, b, h0, reset = random_inputs(6, 2, 41, 3)
    scale = np.random.default_rng(6).normal(size=b.shape).astype(np.float32)
    expected, expected_last = numpy_scan(a, np.exp(scale) * b, h0, reset)
    state = recurrence.ScaledState((named(h0, "batch", "lru"),), named(np.zeros_like(h0), "batch", "lru"))
    h, last = recurrence.scaled_linear_scan(
        named(np.log(a), "batch", "seq", "lru"),
        (named(b, "batch", "seq", "lru"),),
        named(scale, "batch", "seq", "lru"),
        h0=state,
        reset=named(reset, "batch", "seq"),
        method=method,
        chunk_size=8,
    )
    (h,), (last,) = h.real_values(), last.real_values()
    np.testing.assert_allclose(h.unwrap("batch", "seq", "lru"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last.unwrap("batch", "lru"), expected_last, rtol=1e-5, atol=1e-5)


class MatrixCombine(recurrence.Combine):
    """S -> S A + U with matrices (a state of shape [..., v, k]): not elementwise."""

    def combine(self, earlier, later):
        (a_e, u_e), (a_l, u_l) = earlier, later
        return a_e @ a_l, u_e @ a_l + u_l

    def identity(self, like):
        a, u = like
        eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
        return eye, jnp.zeros(u.shape, u.dtype)

    def constant(self, state):
        k = state.shape[-1]
        return jnp.zeros((*state.shape[:-2], k, k), state.dtype), state

    def reached(self, element):
        return element[1]


@pytest.mark.parametrize("method, steps, chunk_size", [(m, s, 4) for m in METHODS for s in (1, 11)])
def test_a_matrix_state_combine_plugs_in(method, steps, chunk_size):
    rng = np.random.default_rng(steps)
    a = rng.normal(size=(steps, 2, 3, 3)) / 2  # [T, batch, k, k]
    u = rng.normal(size=(steps, 2, 4, 3))  # [T, batch, v, k]
    h0 = rng.normal(size=(2, 4, 3))
    reset = rng.uniform(size=(steps, 2)) < 0.3
    with jax.enable_x64(True):
        h, last = recurrence.scan(
            MatrixCombine(jnp.float64), (jnp.asarray(a), jnp.asarray(u)), jnp.asarray(h0),
            reset=jnp.asarray(reset), method=method, chunk_size=chunk_size,
        )
    state, expected = h0, []
    for t in range(steps):
        state = np.where(reset[t, :, None, None], 0.0, state) @ a[t] + u[t]
        expected.append(state)
    np.testing.assert_allclose(h, np.stack(expected), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(last, expected[-1], rtol=1e-10, atol=1e-10)
