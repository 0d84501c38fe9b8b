"""The matrix-state recurrence primitive against a float64 NumPy step loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from griffin_cases import on_device
from penzai import pz

from recurrent_lm.layers import matrix_recurrence
from recurrent_lm.layers.matrix_recurrence import matrix_scan

KEYED = ("batch", "seq", "heads", "state")
VALUED = ("batch", "seq", "heads", "projection")
STATE = ("batch", "heads", "projection", "state")


def numpy_loop(r, log_decay, k, v, a=None, b=None, h0=None, reset=None):
    """The literal equation, token by token, in float64.

    r, k, a, b: [B, T, H, N]; v: [B, T, H, M]; log_decay: [B, T, H, N] or
    [B, T, H] (scalar per head); h0: [B, H, M, N]; reset: [B, T].
    Returns (y [B, T, H, M], h_last [B, H, M, N]).
    """
    f64 = lambda x: None if x is None else np.asarray(x, np.float64)
    r, log_decay, k, v, a, b, h0 = map(f64, (r, log_decay, k, v, a, b, h0))
    batch, steps, heads, n = r.shape
    m = v.shape[-1]
    state = np.zeros((batch, heads, m, n)) if h0 is None else h0.copy()
    y = np.zeros((batch, steps, heads, m))
    for t in range(steps):
        if reset is not None:
            state = np.where(np.asarray(reset)[:, t, None, None, None], 0.0, state)
        w = np.exp(log_decay[:, t])
        if w.ndim == 2:  # scalar per head
            w = np.broadcast_to(w[..., None], (batch, heads, n))
        transition = w[..., :, None] * np.eye(n)  # [B, H, N, N]: diag(w)
        if a is not None:
            transition = transition + a[:, t, :, :, None] * b[:, t, :, None, :]
        state = state @ transition + v[:, t, :, :, None] * k[:, t, :, None, :]
        y[:, t] = np.einsum("bhij,bhj->bhi", state, r[:, t])
    return y, state


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def random_inputs(
    seed,
    batch=2,
    steps=37,
    heads=2,
    n=4,
    m=3,
    *,
    rank_one="rwkv7",
    decay="rwkv7",
    resets=True,
    h0=True,
    dtype=np.float32,
):
    """Inputs as numpy arrays (see `numpy_loop` for the shapes).

    rank_one: "rwkv7" (a = -kk, b = kk * sigmoid, kk unit per head), "generic"
    (moderate random a, b) or None. decay: "rwkv7" (-exp(-0.5) sigmoid),
    "fast" (down to -5), "scalar" (one per head and step).
    """
    rng = np.random.default_rng(seed)
    shape = (batch, steps, heads, n)
    normal = lambda *s: rng.normal(size=s)
    out = {
        "r": normal(*shape),
        "k": normal(*shape) / np.sqrt(n),
        "v": normal(batch, steps, heads, m),
    }
    if decay == "rwkv7":
        out["log_decay"] = -np.exp(-0.5) * sigmoid(normal(*shape))
    elif decay == "fast":
        out["log_decay"] = -rng.uniform(0.0, 5.0, shape)
    elif decay == "scalar":
        out["log_decay"] = -rng.uniform(0.0, 1.0, shape[:3])
    else:
        raise ValueError(decay)
    if rank_one == "rwkv7":
        kk = normal(*shape)
        kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
        out["a"], out["b"] = -kk, kk * sigmoid(normal(*shape))
    elif rank_one == "generic":
        out["a"], out["b"] = (
            0.4 * normal(*shape) / np.sqrt(n),
            0.4 * normal(*shape) / np.sqrt(n),
        )
    out = {name: x.astype(dtype) for name, x in out.items()}
    out["h0"] = normal(batch, heads, m, n).astype(dtype) if h0 else None
    if resets:
        reset = rng.uniform(size=(batch, steps)) < 0.1
        reset[0, 0] = True
        reset[1 % batch, steps // 2] = True
        out["reset"] = reset
    else:
        out["reset"] = None
    return out


def wrap(x, names):
    return None if x is None else pz.nx.wrap(on_device(x)).tag(*names)


def named_inputs(inp):
    decay_names = KEYED if inp["log_decay"].ndim == 4 else KEYED[:3]
    return {
        "r": wrap(inp["r"], KEYED),
        "log_decay": wrap(inp["log_decay"], decay_names),
        "k": wrap(inp["k"], KEYED),
        "v": wrap(inp["v"], VALUED),
        "a": wrap(inp.get("a"), KEYED),
        "b": wrap(inp.get("b"), KEYED),
        "h0": wrap(inp["h0"], STATE),
        "reset": wrap(inp["reset"], ("batch", "seq")),
    }


def run(inp, method, chunk_size=16):
    y, last = matrix_scan(**named_inputs(inp), method=method, chunk_size=chunk_size)
    return y.unwrap(*VALUED), last.unwrap(*STATE)


def expected(inp):
    return numpy_loop(
        inp["r"],
        inp["log_decay"],
        inp["k"],
        inp["v"],
        inp.get("a"),
        inp.get("b"),
        inp["h0"],
        inp["reset"],
    )


def assert_close(actual, desired, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("rank_one", ["rwkv7", "generic", None])
@pytest.mark.parametrize("decay", ["rwkv7", "fast", "scalar"])
def test_sequential_matches_float64_loop(rank_one, decay):
    inp = random_inputs(0, rank_one=rank_one, decay=decay)
    y_ref, last_ref = expected(inp)
    y, last = run(inp, "sequential")
    assert y.dtype == jnp.float32 and last.dtype == jnp.float32
    assert_close(y, y_ref)
    assert_close(last, last_ref)


def test_without_h0_or_reset_and_one_step():
    inp = random_inputs(1, resets=False, h0=False, steps=5)
    y_ref, last_ref = expected(inp)
    y, last = run(inp, "sequential")
    assert_close(y, y_ref)
    assert_close(last, last_ref)
    one = {name: x if name in ("h0", "reset") else x[:, :1] for name, x in inp.items()}
    y, last = run(one, "sequential")
    assert_close(y, y_ref[:, :1])


@pytest.mark.parametrize(("rank_one", "decay"), [("rwkv7", "rwkv7"), (None, "scalar")])
def test_materialised_scan_gives_every_state_and_takes_overrides(rank_one, decay):
    """Every state of the float64 loop (its readout is `matrix_scan`'s y); an
    override with keep 0 at step t sets S_t, and the loop resumed from it agrees."""
    inp = random_inputs(3, steps=9, rank_one=rank_one, decay=decay)
    named = named_inputs(inp)
    steps, at = 9, 4
    keep = pz.nx.wrap(on_device(np.ones(steps, np.float32))).tag("seq")
    override = pz.nx.zeros({**named["v"].named_shape, "state": 4}, jnp.float32)
    scan = lambda keep, override: matrix_recurrence.materialised_scan(
        named["log_decay"], named["k"], named["v"], named["a"], named["b"], h0=named["h0"],
        reset=named["reset"], keep=keep, override=override,
    )
    states, last = scan(keep, override)
    states = np.asarray(states.unwrap("batch", "seq", "heads", "projection", "state"))
    timed = ("r", "log_decay", "k", "v", "a", "b", "reset")
    steps_of = lambda lo, hi: {n: None if inp.get(n) is None else inp[n][:, lo:hi] for n in timed}
    for t in (0, at, steps - 1):
        _, state_t = numpy_loop(**steps_of(0, t + 1), h0=inp["h0"])
        assert_close(states[:, t], state_t)
    assert_close(last.unwrap(*STATE), states[:, -1])
    y, _ = run(inp, "sequential")
    assert_close(y, np.einsum("bthij,bthj->bthi", states, inp["r"]))
    # S_4 := 0.5 everywhere (keep 0, override 0.5 at t = 4), then the recurrence goes on.
    hit = np.arange(steps) == at
    keep = pz.nx.wrap(on_device((~hit).astype(np.float32))).tag("seq")
    override = override + pz.nx.wrap(on_device(0.5 * hit.astype(np.float32))).tag("seq")
    patched, _ = scan(keep, override)
    patched = np.asarray(patched.unwrap("batch", "seq", "heads", "projection", "state"))
    np.testing.assert_array_equal(patched[:, :at], states[:, :at])
    np.testing.assert_array_equal(patched[:, at], 0.5)
    _, resumed = numpy_loop(**steps_of(at + 1, steps), h0=np.full_like(inp["h0"], 0.5))
    assert_close(patched[:, -1], resumed)


def test_resuming_from_h_last_continues_the_sequence():
    inp = random_inputs(2, steps=20)
    y_ref, last_ref = expected(inp)
    first = {n: x if n == "h0" else x[:, :12] for n, x in inp.items()}
    _, mid = run(first, "sequential")
    second = {n: x[:, 12:] for n, x in inp.items() if n != "h0"} | {
        "h0": np.asarray(mid)
    }
    y, last = run(second, "sequential")
    assert_close(y, y_ref[:, 12:])
    assert_close(last, last_ref)


def test_bad_arguments_raise_clear_errors():
    nm = named_inputs(random_inputs(3, steps=6))
    base = {n: nm[n] for n in ("r", "log_decay", "k", "v")}
    with pytest.raises(ValueError, match="unknown matrix_scan method 'fast'"):
        matrix_scan(**base, method="fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        matrix_scan(**base, chunk_size=0)
    with pytest.raises(ValueError, match="both a and b"):
        matrix_scan(**base, a=nm["a"])
    with pytest.raises(
        ValueError, match="'k' must have named axes .*missing axes \\['state'\\]"
    ):
        matrix_scan(**base | {"k": nm["v"]})
    with pytest.raises(
        ValueError, match="'v' must have named axes .*missing axes \\['projection'\\]"
    ):
        matrix_scan(**base | {"v": nm["k"]})
    with pytest.raises(ValueError, match="missing axes \\['time'\\]"):
        matrix_scan(**base, axis="time")
    with pytest.raises(ValueError, match="must not have the scanned axis"):
        matrix_scan(**base, h0=nm["v"] * nm["k"])
    with pytest.raises(
        ValueError, match="axis 'state' has size 2 in one input and 4 in another"
    ):
        matrix_scan(**base | {"r": nm["r"][{"state": pz.slice[:2]}]})
    with pytest.raises(ValueError, match="reset must be boolean"):
        matrix_scan(**base, reset=nm["reset"].astype(jnp.float32))
    with pytest.raises(TypeError, match="penzai NamedArray"):
        matrix_scan(**base | {"r": np.zeros(3)})
    with pytest.raises(ValueError, match="three different names"):
        matrix_scan(**base, key_axis="projection")


CHUNK_CASES = [
    (rank_one, decay, chunk)
    for rank_one in ("rwkv7", "generic", None)
    for decay in ("rwkv7", "fast", "scalar")
    for chunk in ((8, 16, 32, 64) if rank_one == "rwkv7" else (16, 64))
]


@pytest.mark.parametrize("rank_one, decay, chunk_size", CHUNK_CASES)
def test_chunked_matches_float64_loop(rank_one, decay, chunk_size):
    # T = 37: chunks of 8, 16, 32 do not divide it; 64 is one padded chunk.
    inp = random_inputs(4, rank_one=rank_one, decay=decay)
    y_ref, last_ref = expected(inp)
    y, last = run(inp, "chunked", chunk_size)
    assert y.dtype == jnp.float32 and last.dtype == jnp.float32
    assert_close(y, y_ref)
    assert_close(last, last_ref)


def test_methods_agree_on_a_longer_sequence():
    """Several chunks of several blocks, resets, h0: state and outputs agree."""
    inp = random_inputs(5, batch=1, steps=150, heads=2, n=8, m=5)
    y_seq, last_seq = run(inp, "sequential")
    y_chunk, last_chunk = run(inp, "chunked", 32)
    scale = np.max(np.abs(np.asarray(y_seq)))
    np.testing.assert_allclose(y_chunk, y_seq, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(last_chunk, last_seq, rtol=1e-5, atol=1e-5)


def test_long_chunk_with_strong_decays_stays_finite():
    """C = 128 with decays down to -50 (and a -inf): no 0/0, inf or NaN."""
    inp = random_inputs(6, batch=2, steps=200, heads=1, rank_one="rwkv7", decay="fast")
    rng = np.random.default_rng(6)
    strong = rng.uniform(size=inp["log_decay"].shape) < 0.05
    log_decay = np.where(strong, -50.0, inp["log_decay"] * 3).astype(np.float32)
    log_decay[0, 100, 0, 1] = -np.inf
    inp["log_decay"] = log_decay
    y_ref, last_ref = expected(inp)
    for method in ("chunked", "sequential"):
        y, last = run(inp, method, 128)
        assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(last)).all()
        assert_close(y, y_ref)
        assert_close(last, last_ref)


@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_bfloat16_inputs_keep_a_float32_state(method):
    inp = random_inputs(7, steps=64, resets=False, dtype=np.float32)
    bf16 = {
        n: (jnp.asarray(x, jnp.bfloat16) if n not in ("reset", "h0") else x)
        for n, x in inp.items()
    }
    y_ref, last_ref = expected(
        {
            n: np.asarray(x, np.float64) if x is not None else None
            for n, x in bf16.items()
        }
    )
    y, last = run(bf16, method, 16)
    assert y.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    assert_close(last, last_ref, rtol=1e-5, atol=1e-5)
    # Outputs are rounded to bfloat16 once, after float32 accumulation.
    assert_close(y, y_ref, rtol=2**-8, atol=2**-8 * np.max(np.abs(y_ref)))


def test_float64_inputs_run_in_float64():
    inp = random_inputs(8, dtype=np.float64)
    y_ref, last_ref = expected(inp)
    with jax.enable_x64(True):
        for method in ("sequential", "chunked"):
            y, last = run(inp, method, 16)
            assert y.dtype == jnp.float64 and last.dtype == jnp.float64
            assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
            assert_close(last, last_ref, rtol=1e-11, atol=1e-11)


GRAD_NAMES = ("r", "log_decay", "k", "v", "a", "b", "h0")


def loss_fn(method, chunk_size, inp):
    """A scalar loss of y and h_last, differentiable in every input."""
    reset = wrap(inp["reset"], ("batch", "seq"))
    decay_names = KEYED if inp["log_decay"].ndim == 4 else KEYED[:3]

    def loss(r, log_decay, k, v, a, b, h0):
        y, last = matrix_scan(
            wrap(r, KEYED),
            wrap(log_decay, decay_names),
            wrap(k, KEYED),
            wrap(v, VALUED),
            wrap(a, KEYED),
            wrap(b, KEYED),
            h0=wrap(h0, STATE),
            reset=reset,
            method=method,
            chunk_size=chunk_size,
        )
        y = y.unwrap(*VALUED)
        weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        return jnp.sum(y * weights) + jnp.sum(jnp.sin(last.unwrap(*STATE)))

    return loss


@pytest.mark.parametrize("decay", ["rwkv7", "scalar"])
def test_gradients_agree_across_methods(decay):
    inp = random_inputs(9, steps=21, decay=decay)
    args = [jnp.asarray(inp[n]) for n in GRAD_NAMES]
    grads = {
        method: jax.jit(jax.grad(loss_fn(method, 8, inp), argnums=range(7)))(*args)
        for method in ("sequential", "chunked")
    }
    for name, g_seq, g_chunk in zip(GRAD_NAMES, grads["sequential"], grads["chunked"]):
        scale = np.max(np.abs(np.asarray(g_seq)))
        np.testing.assert_allclose(
            g_chunk, g_seq, rtol=1e-4, atol=1e-5 * scale, err_msg=f"gradient of {name}"
        )


def test_sequential_gradients_match_finite_differences():
    from jax.test_util import check_grads

    inp = random_inputs(10, batch=1, steps=6, heads=1, n=3, m=2, dtype=np.float64)
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(inp[n]) for n in GRAD_NAMES)
        check_grads(
            loss_fn("sequential", 4, inp), args, order=1, modes=["rev"], eps=1e-6
        )


def test_default_method_per_backend():
    assert matrix_recurrence.default_matrix_scan_method("cpu") == "sequential"
    assert matrix_recurrence.default_matrix_scan_method("gpu") == "chunked"
    assert matrix_recurrence.default_matrix_scan_method("tpu") == "chunked"


@pytest.mark.parametrize("rank_one", ["generic", None])
@pytest.mark.parametrize("decay", ["fast", "scalar"])
@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_heads_in_blocks_and_inputs_shared_by_heads(monkeypatch, rank_one, decay, method):
    """The sequential form's blocks of heads (here 2 of 6 heads: states of at
    most 2 x batch x M x N elements) give the float64 loop's results, with
    keyed inputs (r, k, a, b) that lack the heads axis (broadcast by the step,
    as Mamba-2's B and C); the chunked form broadcasts them too."""
    batch, heads, n, m = 2, 6, 4, 3
    monkeypatch.setattr(matrix_recurrence, "SEQUENTIAL_BLOCK_ELEMENTS", 2 * batch * m * n)
    inp = random_inputs(7, batch=batch, heads=heads, n=n, m=m, steps=23, rank_one=rank_one, decay=decay)
    shared = ("r", "k", "a", "b") if rank_one else ("r", "k")
    for name in shared:
        inp[name] = np.repeat(inp[name][:, :, :1], heads, axis=2)  # the same for every head
    y_ref, last_ref = expected(inp)
    named = named_inputs(inp)
    for name in shared:
        named[name] = named[name][{"heads": 0}]
    y, last = matrix_scan(**named, method=method, chunk_size=8)
    assert_close(y.unwrap(*VALUED), y_ref)
    assert_close(last.unwrap(*STATE), last_ref)
    assert matrix_recurrence._head_block(jnp.zeros((batch, heads, m, n))) == 2
