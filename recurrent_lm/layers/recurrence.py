"""The linear-recurrence primitive shared by every recurrent layer.

    h_t = a_t * h_{t-1} + b_t        along a named axis (default "seq")

with an optional initial state ``h0`` and an optional reset mask (``h_t = b_t``
where a document starts). RG-LRU, RWKV's WKV and H3's diagonal SSM all run
through `linear_scan` (WKV through its log-scaled form `scaled_linear_scan`,
whose terms would overflow float32 otherwise), so an improvement here (a new
kernel, a sharded scan) reaches every architecture.

Three implementations, same results (up to float rounding order):

* ``"sequential"``: `jax.lax.scan` over time; one pass, O(T) steps. Fastest on
  XLA:CPU (see ``benchmarks/scan_methods.py``), where the extra passes of a tree
  scan cost more than the parallelism buys.
* ``"associative"``: `jax.lax.associative_scan` over ``(a, b)`` pairs;
  O(log T) depth, so it parallelises over the sequence on TPU/GPU.
* ``"chunked"``: sequential inside chunks of ``chunk_size`` steps (all chunks at
  once), an associative scan over the chunk summaries, then a fused fix-up.

Accumulation runs in float32 (or wider, for float64/complex inputs) whatever
the input dtype; outputs come back in the inputs' dtype and the final state in
the accumulation dtype, ready to be carried as recurrent state.

Never replace these with `jnp.cumsum`/`lax.cumlogsumexp` along the sequence: in
JAX 0.10 they lower to `reduce_window`, which XLA:CPU runs in O(T^2).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm.core import named

ScanMethod = Literal["associative", "sequential", "chunked"]
SCAN_METHODS: tuple[str, ...] = ("associative", "sequential", "chunked")
DEFAULT_CHUNK_SIZE = 128

# Measured per backend (benchmarks/scan_methods.py; README table). On TPU/GPU
# the tree scan is the portable parallel choice.
_DEFAULT_METHOD_BY_BACKEND = {
    "cpu": "sequential",
    "gpu": "associative",
    "cuda": "associative",
    "rocm": "associative",
    "tpu": "associative",
}


def default_scan_method(backend: str | None = None) -> str:
    """The scan implementation used when none is chosen, for `backend`."""
    backend = backend or jax.default_backend()
    return _DEFAULT_METHOD_BY_BACKEND.get(backend, "associative")


def check_scan_method(method: str | None) -> None:
    if method is not None and method not in SCAN_METHODS:
        raise ValueError(
            f"unknown scan method {method!r}; choose one of {SCAN_METHODS}"
            " (or None for the backend default)."
        )


def with_scan_method(model, method: str | None):
    """Returns `model` with every recurrent layer's ``scan_method`` set to `method`.

    Works on any model: it selects every layer struct that has a
    ``scan_method`` field (RG-LRU, and the recurrent layers of other
    architectures).
    """
    check_scan_method(method)

    def has_field(node) -> bool:
        return isinstance(node, pz.Struct) and any(
            f.name == "scan_method" for f in dataclasses.fields(node)
        )

    return (
        pz.select(model)
        .at_subtrees_where(has_field)
        .apply(lambda layer: dataclasses.replace(layer, scan_method=method))
    )


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """float32, or wider if an input is wider (float64, complex)."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes))


# ---------------------------------------------------------------------------
# Positional implementations: time on axis 0, any trailing axes.
# ---------------------------------------------------------------------------


def _combine(earlier, later):
    """Composes two affine maps h -> a*h + b (earlier first)."""
    a_e, b_e = earlier
    a_l, b_l = later
    return a_l * a_e, a_l * b_e + b_l


def sequential_scan(a, b, h0, acc_dtype):
    """`lax.scan` form. Returns (h [T, ...] in acc_dtype, h_last)."""

    def step(h, ab):
        a_t, b_t = ab
        h = a_t.astype(acc_dtype) * h + b_t.astype(acc_dtype)
        return h, h

    h_last, h = jax.lax.scan(step, h0.astype(acc_dtype), (a, b))
    return h, h_last


def associative_scan(a, b, h0, acc_dtype):
    """`lax.associative_scan` form. Returns (h [T, ...] in acc_dtype, h_last)."""
    a = a.astype(acc_dtype)
    b = b.astype(acc_dtype)
    # Fold the initial state into the first step: h_0 = a_0 * h0 + b_0.
    b = b.at[0].set(a[0] * h0.astype(acc_dtype) + b[0])
    _, h = jax.lax.associative_scan(_combine, (a, b), axis=0)
    return h, h[-1]


def chunked_scan(a, b, h0, acc_dtype, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Sequential within chunks, associative across chunk summaries."""
    steps, rest = a.shape[0], a.shape[1:]
    chunk = min(chunk_size, steps)
    num_chunks = -(-steps // chunk)
    pad = num_chunks * chunk - steps
    if pad:
        # Identity steps (a=1, b=0) at the end leave the final state unchanged.
        a = jnp.concatenate([a, jnp.ones((pad, *rest), a.dtype)])
        b = jnp.concatenate([b, jnp.zeros((pad, *rest), b.dtype)])
    # [chunk, num_chunks, ...]: scan over the position inside the chunk, with
    # every chunk advanced at once.
    a = jnp.swapaxes(a.reshape(num_chunks, chunk, *rest), 0, 1)
    b = jnp.swapaxes(b.reshape(num_chunks, chunk, *rest), 0, 1)

    def step(carry, ab):
        h, prod = carry
        a_t, b_t = ab
        a_t = a_t.astype(acc_dtype)
        h = a_t * h + b_t.astype(acc_dtype)
        prod = a_t * prod
        return (h, prod), (h, prod)

    init = (
        jnp.zeros((num_chunks, *rest), acc_dtype),
        jnp.ones((num_chunks, *rest), acc_dtype),
    )
    (chunk_b, chunk_a), (h_local, prod_local) = jax.lax.scan(step, init, (a, b))
    # State leaving each chunk, then the state entering each chunk.
    h_out, _ = associative_scan(chunk_a, chunk_b, h0, acc_dtype)
    h_in = jnp.concatenate([h0.astype(acc_dtype)[None], h_out[:-1]])
    h = h_local + prod_local * h_in[None]
    h = jnp.swapaxes(h, 0, 1).reshape(num_chunks * chunk, *rest)[:steps]
    return h, h_out[-1]


# One compiled function per shape and method: called eagerly, the scan compiles
# once instead of op by op; inside an outer jit it is inlined.
@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _positional_scan(a, b, h0, method, acc_dtype, chunk_size):
    if a.shape[0] == 1:  # one step (decoding): no loop at all
        h = a.astype(acc_dtype) * h0.astype(acc_dtype) + b.astype(acc_dtype)
        return h, h[0]
    if method == "sequential":
        return sequential_scan(a, b, h0, acc_dtype)
    if method == "associative":
        return associative_scan(a, b, h0, acc_dtype)
    return chunked_scan(a, b, h0, acc_dtype, chunk_size)


# ---------------------------------------------------------------------------
# Named-axis entry point.
# ---------------------------------------------------------------------------


def linear_scan(
    a: pz.nx.NamedArray,
    b: pz.nx.NamedArray,
    *,
    axis: str = "seq",
    h0: pz.nx.NamedArray | None = None,
    reset: pz.nx.NamedArray | None = None,
    method: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """Runs ``h_t = a_t * h_{t-1} + b_t`` along the named axis `axis`.

    Args:
      a: decay, NamedArray; broadcast by name against `b` (it may lack `axis`,
        e.g. a decay constant in time).
      b: input, NamedArray with `axis`.
      axis: the named axis to scan along.
      h0: optional initial state: the union of `a`'s and `b`'s axes minus
        `axis` (or a subset, broadcast). Zeros if None.
      reset: optional boolean NamedArray with `axis` (typically {"batch",
        "seq"}); where True the recurrence restarts, ``h_t = b_t``.
      method: "sequential", "associative", "chunked", or None for the
        backend default (`default_scan_method`).
      chunk_size: chunk length of the "chunked" method.

    Returns:
      ``(h, h_last)``: ``h`` has the union named shape (with `axis`) in the
      result dtype of `a` and `b`; ``h_last`` is the state after the last step
      (no `axis`) in the accumulation dtype (float32 or wider).
    """
    check_scan_method(method)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    for what, x in (("a", a), ("b", b)):
        named.check_named(x, (), f"linear_scan input {what!r}", exact=False)
    named.check_named(b, (axis,), "linear_scan input 'b'", exact=False)
    shape = named.union_named_shape(b, a, reset)
    if h0 is not None:
        named.check_named(h0, (), "linear_scan h0", exact=False)
        if axis in h0.named_shape:
            raise ValueError(f"h0 must not have the scanned axis {axis!r}.")
        named.union_named_shape(h0, b, a)
        extra = set(h0.named_shape) - set(shape)
        if extra:
            raise ValueError(f"h0 has axes {sorted(extra)} that a and b lack.")
    if reset is not None:
        named.check_named(reset, (axis,), "linear_scan reset", exact=False)
        a = pz.nx.nmap(jnp.where)(reset, jnp.zeros((), a.dtype), a)
    if shape[axis] == 0:
        raise ValueError(f"cannot scan along an empty {axis!r} axis.")

    out_dtype = jnp.result_type(a.dtype, b.dtype)
    acc_dtype = accumulation_dtype(a.dtype, b.dtype)
    layout = {axis: shape[axis], **{n: s for n, s in shape.items() if n != axis}}
    state_layout = {n: s for n, s in layout.items() if n != axis}
    a_raw = named.to_positional(a, layout)
    b_raw = named.to_positional(b, layout)
    if h0 is None:
        h0_raw = jnp.zeros(tuple(state_layout.values()), acc_dtype)
    else:
        h0_raw = named.to_positional(h0, state_layout)

    h, h_last = _positional_scan(
        a_raw, b_raw, h0_raw, method or default_scan_method(), acc_dtype, chunk_size
    )
    return (
        named.from_positional(h.astype(out_dtype), layout),
        named.from_positional(h_last, state_layout),
    )


# ---------------------------------------------------------------------------
# The same recurrence in log-scaled form, for inputs whose magnitudes overflow.
# ---------------------------------------------------------------------------

# A finite stand-in for log(0): an empty state has log-scale NEG_LOG_SCALE, a
# reset has log-decay NEG_LOG_SCALE. With -inf, two empty elements meeting
# would compute exp(-inf - (-inf)) = NaN.
NEG_LOG_SCALE = -1e30


class ScaledState(NamedTuple):
    """A state ``h = mantissa * exp(log_scale)`` of `scaled_linear_scan`.

    ``mantissas`` is a tuple (several recurrences sharing one scale, e.g. a
    numerator and a denominator); each has the named shape of ``log_scale``.
    The split is only defined up to the normalisation: compare real values.
    """

    mantissas: tuple
    log_scale: Any

    def real_values(self):
        """The mantissas times ``exp(log_scale)`` (may overflow: for tests)."""
        scale = pz.nx.nmap(jnp.exp)(self.log_scale)
        return tuple(m * scale for m in self.mantissas)


def empty_scaled_state(named_shape: Mapping[str, int], count: int, dtype=jnp.float32) -> ScaledState:
    """The zero state: mantissas 0, log-scale `NEG_LOG_SCALE`."""
    zeros = pz.nx.zeros(dict(named_shape), dtype)
    return ScaledState((zeros,) * count, pz.nx.full(dict(named_shape), NEG_LOG_SCALE, dtype))


def _scaled_combine(earlier, later):
    """Composes two scaled affine maps (earlier first).

    An element ``(W, p, o)`` is the map ``S -> exp(W) S + p exp(o)``; the
    composite keeps the larger of the two log-scales, so every exponent is
    <= 0 and nothing overflows.
    """
    w_e, p_e, o_e = earlier
    w_l, p_l, o_l = later
    carried = o_e + w_l  # log-scale of the earlier contribution after decay
    o = jnp.maximum(carried, o_l)
    f_e, f_l = jnp.exp(carried - o), jnp.exp(o_l - o)
    p = tuple(f_e * a + f_l * b for a, b in zip(p_e, p_l))
    return jnp.maximum(w_e + w_l, NEG_LOG_SCALE), p, o


def _scaled_sequential(elements, h0):
    p0, o0 = h0

    def step(carry, element):
        _, p, o = _scaled_combine((jnp.zeros_like(carry[1]), *carry), element)
        return (p, o), (p, o)

    last, h = jax.lax.scan(step, (p0, o0), elements)
    return h, last


def _scaled_associative(elements, h0):
    log_a, p, o = elements
    # Fold the initial state into the first element.
    _, p_first, o_first = _scaled_combine(
        (jnp.zeros_like(h0[1]), h0[0], h0[1]),
        (log_a[0], tuple(x[0] for x in p), o[0]),
    )
    p = tuple(x.at[0].set(y) for x, y in zip(p, p_first))
    o = o.at[0].set(o_first)
    _, p, o = jax.lax.associative_scan(_scaled_combine, (log_a, p, o), axis=0)
    return (p, o), (tuple(x[-1] for x in p), o[-1])


def _scaled_chunked(elements, h0, chunk_size):
    """Sequential within chunks (all chunks at once), associative across them."""
    log_a, p, o = elements
    steps, rest = o.shape[0], o.shape[1:]
    chunk = min(chunk_size, steps)
    num_chunks = -(-steps // chunk)
    pad = num_chunks * chunk - steps

    def split(x, fill):
        if pad:  # identity elements (W=0, p=0, o=NEG) leave the state unchanged
            x = jnp.concatenate([x, jnp.full((pad, *rest), fill, x.dtype)])
        return jnp.swapaxes(x.reshape(num_chunks, chunk, *rest), 0, 1)

    log_a, o = split(log_a, 0.0), split(o, NEG_LOG_SCALE)
    p = tuple(split(x, 0.0) for x in p)

    def step(carry, element):
        carry = _scaled_combine(carry, element)
        return carry, carry

    identity = (
        jnp.zeros((num_chunks, *rest), o.dtype),
        tuple(jnp.zeros((num_chunks, *rest), o.dtype) for _ in p),
        jnp.full((num_chunks, *rest), NEG_LOG_SCALE, o.dtype),
    )
    summary, local = jax.lax.scan(step, identity, (log_a, p, o))
    # State leaving each chunk, then the state entering each chunk.
    (p_out, o_out), _ = _scaled_associative(summary, h0)
    p_in = tuple(jnp.concatenate([a[None], b[:-1]]) for a, b in zip(h0[0], p_out))
    o_in = jnp.concatenate([h0[1][None], o_out[:-1]])
    _, p, o = _scaled_combine((jnp.zeros_like(o_in), p_in, o_in), local)
    unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(num_chunks * chunk, *rest)[:steps]
    return (tuple(unsplit(x) for x in p), unsplit(o)), (tuple(x[-1] for x in p_out), o_out[-1])


@functools.partial(jax.jit, static_argnums=(2, 3))
def _positional_scaled_scan(elements, h0, method, chunk_size):
    if elements[2].shape[0] == 1:  # one step (decoding): no loop at all
        _, p, o = _scaled_combine((jnp.zeros_like(h0[1]), *h0), elements)
        return (p, o), (tuple(x[0] for x in p), o[0])
    if method == "sequential":
        return _scaled_sequential(elements, h0)
    if method == "associative":
        return _scaled_associative(elements, h0)
    return _scaled_chunked(elements, h0, chunk_size)


def scaled_linear_scan(
    log_a: pz.nx.NamedArray,
    b: tuple[pz.nx.NamedArray, ...],
    log_scale: pz.nx.NamedArray,
    *,
    axis: str = "seq",
    h0: ScaledState | None = None,
    reset: pz.nx.NamedArray | None = None,
    method: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[ScaledState, ScaledState]:
    """`linear_scan` with log-domain decay and inputs: ``h_t = exp(log_a_t) h_{t-1} + exp(s_t) b_t``.

    For recurrences whose terms overflow float32 (RWKV's ``exp(k)`` with
    ``k > 88``): the state is kept as ``(mantissa, log_scale)``, normalised so
    that the largest contribution has scale 1, and every exponential computed
    has a non-positive argument. Several inputs `b` may share one scale (the
    state holds one mantissa per input). Same methods, resets and initial state
    as `linear_scan`; always float32 (or wider).

    Args:
      log_a: log-decay (<= 0), broadcast by name (it may lack `axis`); -inf is
        allowed (clamped to `NEG_LOG_SCALE`).
      b: tuple of input mantissas, each with `axis`.
      log_scale: the log-scale ``s_t`` of the inputs, with `axis`.
      axis, reset, method, chunk_size: as for `linear_scan`.
      h0: the initial state (None: the empty state).

    Returns:
      ``(h, h_last)``: `ScaledState` after every step (with `axis`) and after the
      last step (without).
    """
    check_scan_method(method)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    b = tuple(b)
    if not b:
        raise ValueError("scaled_linear_scan needs at least one input mantissa in b.")
    named.check_named(log_a, (), "scaled_linear_scan input 'log_a'", exact=False)
    named.check_named(log_scale, (axis,), "scaled_linear_scan input 'log_scale'", exact=False)
    for i, x in enumerate(b):
        named.check_named(x, (axis,), f"scaled_linear_scan input b[{i}]", exact=False)
    shape = named.union_named_shape(log_scale, log_a, reset, *b)
    if shape[axis] == 0:
        raise ValueError(f"cannot scan along an empty {axis!r} axis.")
    acc_dtype = accumulation_dtype(log_a.dtype, log_scale.dtype, *(x.dtype for x in b))
    log_a = pz.nx.nmap(jnp.maximum)(log_a.astype(acc_dtype), NEG_LOG_SCALE)
    if reset is not None:
        named.check_named(reset, (axis,), "scaled_linear_scan reset", exact=False)
        log_a = pz.nx.nmap(jnp.where)(reset, jnp.asarray(NEG_LOG_SCALE, acc_dtype), log_a)
    layout = {axis: shape[axis], **{n: s for n, s in shape.items() if n != axis}}
    state_layout = {n: s for n, s in layout.items() if n != axis}
    if h0 is None:
        h0 = empty_scaled_state(state_layout, len(b), acc_dtype)
    elif len(h0.mantissas) != len(b):
        raise ValueError(f"h0 has {len(h0.mantissas)} mantissas but b has {len(b)} inputs.")
    for x in (*h0.mantissas, h0.log_scale):
        named.check_named(x, (), "scaled_linear_scan h0", exact=False)
        if axis in x.named_shape:
            raise ValueError(f"h0 must not have the scanned axis {axis!r}.")
    raw = lambda x, lay: named.to_positional(x, lay).astype(acc_dtype)
    elements = (
        raw(log_a, layout),
        tuple(raw(x, layout) for x in b),
        raw(log_scale, layout),
    )
    h0_raw = (tuple(raw(x, state_layout) for x in h0.mantissas), raw(h0.log_scale, state_layout))
    (p, o), (p_last, o_last) = _positional_scaled_scan(
        elements, h0_raw, method or default_scan_method(), chunk_size
    )
    wrap = named.from_positional
    return (
        ScaledState(tuple(wrap(x, layout) for x in p), wrap(o, layout)),
        ScaledState(tuple(wrap(x, state_layout) for x in p_last), wrap(o_last, state_layout)),
    )
