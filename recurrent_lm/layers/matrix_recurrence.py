"""The matrix-state recurrence primitive: diagonal-plus-rank-one transitions.

For every head (and batch row: every named axis other than the three below is
batched over by name) the state is a matrix ``S`` of named shape
{value_axis, key_axis} (``M x N``), and along `axis` (default "seq")

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,    y_t = S_t r_t,

with ``w_t = exp(log_decay_t)``; in index form

    S_t[i, j] = sum_m S_{t-1}[i, m] (w_t[m] delta_mj + a_t[m] b_t[j]) + v_t[i] k_t[j]
    y_t[i]    = sum_j S_t[i, j] r_t[j].

This one equation covers the linear-attention family: GLA and RetNet (no
rank-one term, per-channel or scalar decay), Mamba-2's SSD (scalar decay per
head: ``log_decay`` without `key_axis`), DeltaNet / gated DeltaNet
(``a = -beta k``, ``b = k``) and RWKV-7 (``a = -kk``, ``b = kk * iclr``).

Named axes:

* ``r``, ``k``, ``a``, ``b``: {axis, key_axis, ...} (receptance / query, key,
  and the two vectors of the rank-one term);
* ``v``: {axis, value_axis, ...};
* ``log_decay`` (<= 0): {axis, key_axis, ...} (a decay per key channel) or
  {axis, ...} without `key_axis` (one decay per head and step);
* ``h0`` and the returned ``h_last``: {..., value_axis, key_axis};
* ``reset``: bool {axis, ...} (typically {"batch", "seq"}): where True the
  state is zeroed before the step (``S_{t-1} := 0``), so documents packed in
  one row do not see each other;
* ``y``: {axis, value_axis, ...}.

Inputs broadcast by name (an input may lack a batched axis). Two forms, same
results up to float rounding:

* ``"sequential"``: `jax.lax.scan` over positions, one ``M x N`` state update
  per step: the reference, and the decoding path (one step).
* ``"chunked"``: within chunks of ``chunk_size`` positions the transitions are
  folded into matrix products (below); a short `lax.scan` over the chunks
  carries the state from one chunk to the next.

Without ``a`` and ``b`` (a diagonal transition) both forms skip the rank-one
work; with a scalar decay the chunked form computes its decay factors per
pair of positions instead of per pair and key channel.

Why float32, why the log domain. The state is accumulated and kept in float32
(float64 for float64 inputs, `accumulation_dtype`) whatever the input dtype:
a bfloat16 state would lose the slow decays (``w`` close to 1) over a few
hundred steps. ``y`` comes back in the inputs' result dtype, ``h_last`` in the
accumulation dtype, ready to be carried as recurrent state. The chunked form
needs products of decays between two positions, ``prod_{s<u<=t} w_u``; it
computes them as ``exp`` of sums of log-decays over exactly those positions
(all terms <= 0, so no subtraction, no cancellation and no overflow: every
factor is in [0, 1], small ones underflow to 0, never to 0/0 or inf * 0), never
as ``exp(L_t) * exp(-L_s)`` with prefix sums ``L`` (which overflows within a
chunk of strong decays). A reset is folded in as a zero transition at its
position: its log-decay becomes a large negative number (every factor across
it underflows to exactly 0) and its ``a`` becomes 0.

Never replace the sums along positions with `jnp.cumsum` along the sequence:
in JAX 0.10 it lowers to `reduce_window`, which XLA:CPU runs in O(T^2)
(``shared/reference/performance.md``); cumulative sums here run inside chunks
(`lax.associative_scan`), and the sequence is crossed by a scan.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm.core import named
from recurrent_lm.layers.recurrence import accumulation_dtype

MATRIX_SCAN_METHODS: tuple[str, ...] = ("sequential", "chunked")
DEFAULT_CHUNK_SIZE = 64

# Measured per backend (benchmarks/matrix_scan.py).
_DEFAULT_METHOD_BY_BACKEND: dict[str, str] = {}


def default_matrix_scan_method(backend: str | None = None) -> str:
    """The `matrix_scan` form used when none is chosen, for `backend`."""
    backend = backend or jax.default_backend()
    return _DEFAULT_METHOD_BY_BACKEND.get(backend, "sequential")


# ---------------------------------------------------------------------------
# Positional forms: time on axis 0, then the batch axes, then the feature axes.
# ---------------------------------------------------------------------------


def _sequential(r, log_decay, k, v, a, b, h0, reset, dtype):
    """`lax.scan` over positions. Returns (y [T, ..., M], h_last [..., M, N])."""
    scalar_decay = log_decay.ndim == r.ndim - 1

    def step(state, xs):
        r_t, lw_t, k_t, v_t, a_t, b_t, reset_t = xs
        if reset_t is not None:
            state = jnp.where(reset_t[..., None, None], 0.0, state)
        w_t = jnp.exp(lw_t.astype(dtype))
        new = state * (w_t[..., None, None] if scalar_decay else w_t[..., None, :])
        if a_t is not None:
            sa = jnp.einsum("...ij,...j->...i", state, a_t.astype(dtype))
            new = new + sa[..., :, None] * b_t.astype(dtype)[..., None, :]
        new = new + v_t.astype(dtype)[..., :, None] * k_t.astype(dtype)[..., None, :]
        y_t = jnp.einsum("...ij,...j->...i", new, r_t.astype(dtype))
        return new, y_t

    h_last, y = jax.lax.scan(step, h0, (r, log_decay, k, v, a, b, reset))
    return y, h_last


@functools.partial(jax.jit, static_argnames=("method", "chunk_size"))
def _positional_matrix_scan(r, log_decay, k, v, a, b, h0, reset, *, method, chunk_size):
    dtype = h0.dtype
    if method == "sequential" or r.shape[0] == 1:
        return _sequential(r, log_decay, k, v, a, b, h0, reset, dtype)
    return _chunked(r, log_decay, k, v, a, b, h0, reset, dtype, chunk_size)


def _chunked(r, log_decay, k, v, a, b, h0, reset, dtype, chunk_size):
    raise NotImplementedError(
        "the chunked form is not written yet; use method='sequential'."
    )


# ---------------------------------------------------------------------------
# Named entry point.
# ---------------------------------------------------------------------------


def _check_method(method, chunk_size) -> None:
    if method is not None and method not in MATRIX_SCAN_METHODS:
        raise ValueError(
            f"unknown matrix_scan method {method!r}; choose one of {MATRIX_SCAN_METHODS}"
            " (or None for the backend default)."
        )
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")


def matrix_scan(
    r: pz.nx.NamedArray,
    log_decay: pz.nx.NamedArray,
    k: pz.nx.NamedArray,
    v: pz.nx.NamedArray,
    a: pz.nx.NamedArray | None = None,
    b: pz.nx.NamedArray | None = None,
    *,
    axis: str = "seq",
    key_axis: str = "state",
    value_axis: str = "projection",
    h0: pz.nx.NamedArray | None = None,
    reset: pz.nx.NamedArray | None = None,
    method: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """Runs ``S_t = S_{t-1} (diag(exp(log_decay_t)) + a_t b_t^T) + v_t k_t^T``, ``y_t = S_t r_t``.

    See the module docstring for the equation in index form and the forms.

    Args:
      r: read-out vector, {axis, key_axis, ...}.
      log_decay: log of the diagonal decay (<= 0), {axis, key_axis, ...} for a
        decay per key channel, or {axis, ...} without `key_axis` for one decay
        per head and step (the cheaper path).
      k: key, {axis, key_axis, ...}.
      v: value, {axis, value_axis, ...}.
      a, b: the rank-one term ``a_t b_t^T`` of the transition, each {axis,
        key_axis, ...}; both or neither (None: a diagonal transition, the
        cheaper path).
      axis: the named axis to scan along.
      key_axis, value_axis: the named axes of the state's columns and rows.
      h0: optional initial state {..., value_axis, key_axis} (zeros if None).
      reset: optional boolean NamedArray with `axis`; where True the state is
        zeroed before the step.
      method: "sequential", "chunked", or None for the backend default
        (`default_matrix_scan_method`).
      chunk_size: chunk length of the "chunked" form.

    Returns:
      ``(y, h_last)``: ``y`` {axis, value_axis, ...} in the inputs' result
      dtype; ``h_last`` the state after the last step {..., value_axis,
      key_axis} (no `axis`) in the accumulation dtype (float32 or wider).
    """
    _check_method(method, chunk_size)
    if len({axis, key_axis, value_axis}) != 3:
        raise ValueError(
            f"axis, key_axis and value_axis must be three different names; got"
            f" {axis!r}, {key_axis!r}, {value_axis!r}."
        )
    if (a is None) != (b is None):
        raise ValueError(
            "matrix_scan takes both a and b (the rank-one term a b^T) or neither."
        )
    keyed = {"r": r, "k": k} | ({} if a is None else {"a": a, "b": b})
    for name, x in keyed.items():
        named.check_named(
            x, (axis, key_axis), f"matrix_scan input {name!r}", exact=False
        )
    named.check_named(v, (axis, value_axis), "matrix_scan input 'v'", exact=False)
    named.check_named(log_decay, (axis,), "matrix_scan input 'log_decay'", exact=False)
    for name, x in [*keyed.items(), ("log_decay", log_decay)]:
        if value_axis in x.named_shape:
            raise ValueError(
                f"matrix_scan input {name!r} must not have the value axis {value_axis!r}"
                f" (named shape {dict(x.named_shape)})."
            )
    if key_axis in v.named_shape:
        raise ValueError(
            f"matrix_scan input 'v' must not have the key axis {key_axis!r}"
            f" (named shape {dict(v.named_shape)})."
        )
    if reset is not None:
        named.check_named(reset, (axis,), "matrix_scan reset", exact=False)
        if reset.dtype != jnp.bool_:
            raise ValueError(
                f"matrix_scan reset must be boolean, got dtype {reset.dtype}."
            )
        if {key_axis, value_axis} & set(reset.named_shape):
            raise ValueError("matrix_scan reset must not have the key or value axis.")
    inputs = [*keyed.values(), v, log_decay, reset]
    shape = named.union_named_shape(*inputs)
    if h0 is not None:
        named.check_named(h0, (value_axis, key_axis), "matrix_scan h0", exact=False)
        if axis in h0.named_shape:
            raise ValueError(f"matrix_scan h0 must not have the scanned axis {axis!r}.")
        named.union_named_shape(h0, *inputs)
        extra = set(h0.named_shape) - set(shape)
        if extra:
            raise ValueError(
                f"matrix_scan h0 has axes {sorted(extra)} that the inputs lack."
            )
    if shape[axis] == 0:
        raise ValueError(f"cannot scan along an empty {axis!r} axis.")

    batch = {n: s for n, s in shape.items() if n not in (axis, key_axis, value_axis)}
    steps, n_key, n_value = shape[axis], shape[key_axis], shape[value_axis]
    keyed_layout = {axis: steps, **batch, key_axis: n_key}
    value_layout = {axis: steps, **batch, value_axis: n_value}
    scalar_layout = {axis: steps, **batch}
    state_layout = {**batch, value_axis: n_value, key_axis: n_key}

    dtypes = [x.dtype for x in (*keyed.values(), v, log_decay)]
    acc_dtype = accumulation_dtype(*dtypes)
    if h0 is None:
        h0_raw = jnp.zeros(tuple(state_layout.values()), acc_dtype)
    else:
        h0_raw = named.to_positional(h0, state_layout).astype(acc_dtype)
    decay_layout = keyed_layout if key_axis in log_decay.named_shape else scalar_layout
    raw = {name: named.to_positional(x, keyed_layout) for name, x in keyed.items()}
    y, h_last = _positional_matrix_scan(
        raw["r"],
        named.to_positional(log_decay, decay_layout),
        raw["k"],
        named.to_positional(v, value_layout),
        raw.get("a"),
        raw.get("b"),
        h0_raw,
        None if reset is None else named.to_positional(reset, scalar_layout),
        method=method or default_matrix_scan_method(),
        chunk_size=chunk_size,
    )
    y = named.from_positional(y.astype(jnp.result_type(*dtypes)), value_layout)
    return y, named.from_positional(h_last, state_layout)
