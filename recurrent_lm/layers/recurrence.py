"""The linear-recurrence primitive shared by every recurrent layer.

    h_t = a_t * h_{t-1} + b_t        along a named axis (default "seq")

with an optional initial state ``h0`` and an optional reset mask (``h_t = b_t``
where a document starts). RG-LRU, RWKV's WKV and H3's diagonal SSM all run
through `linear_scan` (WKV through its log-scaled form `scaled_linear_scan`,
whose terms would overflow float32 otherwise), so an improvement here (a new
kernel, a sharded scan) reaches every architecture.

Both are one scan parameterised by its `Combine`: the monoid of the steps
(how two compose, the identity, the constant map that folds in an initial
state, the state an element reaches). `LinearCombine` and `ScaledCombine` are
the two forms; another recurrence (e.g. a matrix state ``S_t = S_{t-1} A_t +
B_t``) plugs in a combine of its own and gets the three implementations,
resets, initial states and the single-step path (`scan`).

Three implementations, same results (up to float rounding order):

* ``"sequential"``: `jax.lax.scan` over time; one pass, O(T) steps. Fastest on
  XLA:CPU (see ``benchmarks/scan_methods.py``), where the extra passes of a tree
  scan cost more than the parallelism buys.
* ``"associative"``: `jax.lax.associative_scan` over the elements; O(log T)
  depth, so it parallelises over the sequence on TPU/GPU.
* ``"chunked"``: sequential inside chunks of ``chunk_size`` steps (all chunks at
  once), an associative scan over the chunk summaries, then a fused fix-up.

Accumulation runs in float32 (or wider, for float64/complex inputs) whatever
the input dtype; outputs come back in the inputs' dtype and the final state in
the accumulation dtype, ready to be carried as recurrent state.

Never replace these with `jnp.cumsum`/`lax.cumlogsumexp` along the sequence: in
JAX 0.10 they lower to `reduce_window`, which XLA:CPU runs in O(T^2).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Collection, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm.core import named
from recurrent_lm.core.model import sync_config

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
    architectures), and sets the model config's ``scan_method`` too, so a
    saved model reloads with it.
    """
    check_scan_method(method)

    def has_field(node) -> bool:
        return isinstance(node, pz.Struct) and any(
            f.name == "scan_method" for f in dataclasses.fields(node)
        )

    model = (
        pz.select(model)
        .at_subtrees_where(has_field)
        .apply(lambda layer: dataclasses.replace(layer, scan_method=method))
    )
    return sync_config(model, scan_method=method)


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """float32, or wider if an input is wider (float64, complex)."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes))


# ---------------------------------------------------------------------------
# Combines: the monoid a scan runs over.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Combine(abc.ABC):
    """The steps of a recurrence as a monoid of maps ``state -> state``.

    An *element* is one step (or a run of steps composed), a pytree of arrays;
    a *state* is a pytree of arrays too. In a scan every leaf has the time
    axis first; the methods work on any leading batch shape, broadcasting
    (leaves may have trailing axes of their own, e.g. matrices). A combine is
    hashable: the scan compiles once per combine, method and shape.

    Subclasses define `combine`, `identity`, `constant` and `reached`;
    `apply`, `fold`, `restart` and `empty_state` follow from them (override
    them only to save work). A leaf that `fold` or `restart` returns as the
    very object it was given is left in place by the scan, not rewritten.

    Attributes:
      dtype: the accumulation dtype: composed elements and states are in it;
        input elements may be narrower (`combine` and `apply` cast them).
    """

    dtype: Any

    @abc.abstractmethod
    def combine(self, earlier, later):
        """The element doing `earlier`, then `later` (associative)."""

    @abc.abstractmethod
    def identity(self, like):
        """The element that changes nothing, leaves shaped and typed as the
        `jax.ShapeDtypeStruct`s in `like` (an element's structure)."""

    @abc.abstractmethod
    def constant(self, state):
        """The element mapping every state to `state` (an initial state is
        folded in as ``combine(constant(h0), first_element)``, see `fold`)."""

    @abc.abstractmethod
    def reached(self, element):
        """The state `element` maps the empty state to (for a composite that
        starts with ``constant(h0)``: the state after its last step)."""

    def apply(self, state, element):
        """The state after one step (`element`) from `state`."""
        return self.reached(self.combine(self.constant(state), element))

    def fold(self, state, element):
        """An element reaching ``apply(state, element)``: how a scan folds its
        initial state into the first step. Only the state it reaches matters
        (later steps read an earlier composite only through it), so a combine
        may return the element's other leaves as they are: the scan leaves
        those in place, without copying them."""
        return self.combine(self.constant(state), element)

    def restart(self, element, mask):
        """`element` where `mask` is False; where True, the same step from the
        empty state (a reset). `mask` has the leaves' leading shape."""
        fresh = self.constant(self.reached(element))

        def pick(new, old):
            if new is old:  # unchanged by a restart (e.g. the input term)
                return old
            where = mask.reshape(mask.shape + (1,) * (old.ndim - mask.ndim))
            return jnp.where(where, new, old)

        return jax.tree.map(pick, fresh, element)

    def empty_state(self, element):
        """The empty state of a scan over the elements `element` [T, ...]."""
        return self.reached(self.identity(_structs(element, (), self.dtype)))


@dataclasses.dataclass(frozen=True)
class LinearCombine(Combine):
    """``h -> a h + b``: elements ``(a, b)``, state ``h``, elementwise."""

    def combine(self, earlier, later):
        a_e, b_e = earlier
        a_l, b_l = (x.astype(self.dtype) for x in later)
        return a_l * a_e, a_l * b_e + b_l

    def identity(self, like):
        a, b = like
        return jnp.ones(a.shape, a.dtype), jnp.zeros(b.shape, b.dtype)

    def constant(self, state):
        return jnp.zeros_like(state), state

    def reached(self, element):
        return element[1]

    def apply(self, state, element):  # the default, without the dead a * 0
        a, b = (x.astype(self.dtype) for x in element)
        return a * state + b

    def fold(self, state, element):  # keeps a
        return element[0], self.apply(state, element)


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


@dataclasses.dataclass(frozen=True)
class ScaledCombine(Combine):
    """``S -> exp(W) S + p exp(o)``: elements ``(W, p, o)`` with ``p`` a tuple
    of mantissas sharing the log-scale ``o``; state `ScaledState` ``(p, o)``.

    Inputs must already be in `dtype` with ``W >= NEG_LOG_SCALE``. A composite
    keeps the larger of the two log-scales, so every exponent is <= 0 and
    nothing overflows.
    """

    def combine(self, earlier, later):
        w_e, p_e, o_e = earlier
        w_l, p_l, o_l = later
        carried = o_e + w_l  # log-scale of the earlier contribution after decay
        o = jnp.maximum(carried, o_l)
        f_e, f_l = jnp.exp(carried - o), jnp.exp(o_l - o)
        p = tuple(f_e * a + f_l * b for a, b in zip(p_e, p_l))
        return jnp.maximum(w_e + w_l, NEG_LOG_SCALE), p, o

    def identity(self, like):
        w, p, o = like
        return (
            jnp.zeros(w.shape, w.dtype),
            tuple(jnp.zeros(x.shape, x.dtype) for x in p),
            jnp.full(o.shape, NEG_LOG_SCALE, o.dtype),
        )

    def constant(self, state):
        return jnp.full_like(state.log_scale, NEG_LOG_SCALE), state.mantissas, state.log_scale

    def reached(self, element):
        return ScaledState(element[1], element[2])

    def fold(self, state, element):  # keeps W
        return element[0], *self.apply(state, element)


# ---------------------------------------------------------------------------
# Positional implementations: time on axis 0 of every leaf.
# ---------------------------------------------------------------------------


def _structs(tree, lead: tuple[int, ...], dtype=None):
    """Shape-dtype structs of `tree`'s leaves with axis 0 replaced by `lead`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((*lead, *x.shape[1:]), dtype or x.dtype), tree
    )


def _at(tree, index):
    return jax.tree.map(lambda x: x[index], tree)


def sequential_scan(combine: Combine, elements, h0):
    """`lax.scan` form. Returns (states [T, ...], last state)."""

    def step(h, element):
        h = combine.apply(h, element)
        return h, h

    h_last, h = jax.lax.scan(step, h0, elements)
    return h, h_last


def associative_scan(combine: Combine, elements, h0):
    """`lax.associative_scan` form. Returns (states [T, ...], last state)."""
    elements = jax.tree.map(lambda x: x.astype(combine.dtype), elements)
    first = _at(elements, 0)
    elements = jax.tree.map(
        lambda x, old, new: x if new is old else x.at[0].set(new),
        elements,
        first,
        combine.fold(h0, first),
    )
    h = combine.reached(jax.lax.associative_scan(combine.combine, elements, axis=0))
    return h, _at(h, -1)


def chunked_scan(combine: Combine, elements, h0, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Sequential within chunks (all chunks at once), associative across them."""
    steps = jax.tree.leaves(elements)[0].shape[0]
    chunk = min(chunk_size, steps)
    num_chunks = -(-steps // chunk)
    pad = num_chunks * chunk - steps
    if pad:  # identity steps at the end leave the final state unchanged
        padding = combine.identity(_structs(elements, (pad,)))
        elements = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), elements, padding)
    # [chunk, num_chunks, ...]: scan over the position inside the chunk, with
    # every chunk advanced at once.
    elements = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(num_chunks, chunk, *x.shape[1:]), 0, 1), elements
    )

    def step(carry, element):
        carry = combine.combine(carry, element)
        return carry, carry

    start = combine.identity(_structs(elements, (), combine.dtype))
    summary, local = jax.lax.scan(step, start, elements)
    # State leaving each chunk, then the state entering each chunk.
    h_out, _ = associative_scan(combine, summary, h0)
    h_in = jax.tree.map(lambda x, y: jnp.concatenate([x[None], y[:-1]]), h0, h_out)
    h = combine.apply(_at(h_in, None), local)
    h = jax.tree.map(
        lambda x: jnp.swapaxes(x, 0, 1).reshape(num_chunks * chunk, *x.shape[2:])[:steps], h
    )
    return h, _at(h_out, -1)


# One compiled function per combine, shape and method: called eagerly, the scan
# compiles once instead of op by op; inside an outer jit it is inlined.
@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _positional_scan(combine, elements, h0, reset, method, chunk_size):
    if reset is not None:
        elements = combine.restart(elements, reset)
    if h0 is None:
        h0 = combine.empty_state(elements)
    if jax.tree.leaves(elements)[0].shape[0] == 1:  # one step (decoding): no loop
        h = combine.apply(_at(h0, None), elements)
        return h, _at(h, 0)
    if method == "sequential":
        return sequential_scan(combine, elements, h0)
    if method == "associative":
        return associative_scan(combine, elements, h0)
    return chunked_scan(combine, elements, h0, chunk_size)


def scan(
    combine: Combine,
    elements,
    h0=None,
    *,
    reset=None,
    method: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """Runs the recurrence `combine` over positional `elements` (time on axis 0).

    Args:
      combine: the monoid of the steps.
      elements: pytree of arrays [T >= 1, ...], as `combine` expects.
      h0: the initial state (a state pytree in ``combine.dtype``), or None for
        the empty state.
      reset: optional boolean [T, ...] (the leaves' leading shape): where True
        the step restarts from the empty state (`Combine.restart`).
      method, chunk_size: as for `linear_scan`.

    Returns:
      ``(h, h_last)``: the states after every step [T, ...] and after the last.
    """
    check_scan_method(method)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    return _positional_scan(
        combine, elements, h0, reset, method or default_scan_method(), chunk_size
    )


# ---------------------------------------------------------------------------
# Named-axis entry points.
# ---------------------------------------------------------------------------


def _is_named(x) -> bool:
    return isinstance(x, pz.nx.NamedArrayBase)


def _checked_layout(
    what: str,
    inputs: Mapping[str, pz.nx.NamedArray],
    timed: Collection[str],
    h0,
    reset: pz.nx.NamedArray | None,
    axis: str,
) -> dict[str, int]:
    """The checks of every named scan; returns the layout (`axis` first).

    `inputs` are the named inputs (those in `timed` must have `axis`, the
    others may lack it and broadcast); `h0` is a state pytree of named arrays
    (or None), each without `axis` and within the inputs' axes.
    """
    for name, x in inputs.items():
        need = (axis,) if name in timed else ()
        named.check_named(x, need, f"{what} input {name!r}", exact=False)
    if reset is not None:
        named.check_named(reset, (axis,), f"{what} reset", exact=False)
    shape = named.union_named_shape(*inputs.values(), reset)
    for x in jax.tree.leaves(h0, is_leaf=_is_named):
        named.check_named(x, (), f"{what} h0", exact=False)
        if axis in x.named_shape:
            raise ValueError(f"h0 must not have the scanned axis {axis!r}.")
        named.union_named_shape(x, *inputs.values())
        extra = set(x.named_shape) - set(shape)
        if extra:
            raise ValueError(f"h0 has axes {sorted(extra)} that the inputs lack.")
    if shape[axis] == 0:
        raise ValueError(f"cannot scan along an empty {axis!r} axis.")
    return {axis: shape[axis], **{n: s for n, s in shape.items() if n != axis}}


def _named_scan(combine, elements, h0, reset, layout, method, chunk_size):
    """`scan` on named arrays, every leaf laid out as `layout` (an elementwise
    recurrence): elements, h0 and the results are pytrees of NamedArrays."""
    axis = next(iter(layout))
    state_layout = {n: s for n, s in layout.items() if n != axis}

    def raw(tree, lay):
        return jax.tree.map(lambda x: named.to_positional(x, lay), tree, is_leaf=_is_named)

    if h0 is not None:
        h0 = jax.tree.map(lambda x: x.astype(combine.dtype), raw(h0, state_layout))
    h, h_last = scan(
        combine,
        raw(elements, layout),
        h0,
        reset=None if reset is None else named.to_positional(reset, layout),
        method=method,
        chunk_size=chunk_size,
    )
    wrap = lambda tree, lay: jax.tree.map(lambda x: named.from_positional(x, lay), tree)
    return wrap(h, layout), wrap(h_last, state_layout)


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
    layout = _checked_layout("linear_scan", {"b": b, "a": a}, ("b",), h0, reset, axis)
    combine = LinearCombine(accumulation_dtype(a.dtype, b.dtype))
    h, h_last = _named_scan(combine, (a, b), h0, reset, layout, method, chunk_size)
    return h.astype(jnp.result_type(a.dtype, b.dtype)), h_last


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
    has a non-positive argument (`ScaledCombine`). Several inputs `b` may share
    one scale (the state holds one mantissa per input). Same methods, resets
    and initial state as `linear_scan`; always float32 (or wider).

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
    b = tuple(b)
    if not b:
        raise ValueError("scaled_linear_scan needs at least one input mantissa in b.")
    inputs = {"log_a": log_a, "log_scale": log_scale, **{f"b[{i}]": x for i, x in enumerate(b)}}
    layout = _checked_layout(
        "scaled_linear_scan", inputs, set(inputs) - {"log_a"}, h0, reset, axis
    )
    if h0 is not None:
        if len(h0.mantissas) != len(b):
            raise ValueError(f"h0 has {len(h0.mantissas)} mantissas but b has {len(b)} inputs.")
        h0 = ScaledState(tuple(h0.mantissas), h0.log_scale)
    acc_dtype = accumulation_dtype(*(x.dtype for x in inputs.values()))
    elements = (
        pz.nx.nmap(jnp.maximum)(log_a.astype(acc_dtype), NEG_LOG_SCALE),
        tuple(x.astype(acc_dtype) for x in b),
        log_scale.astype(acc_dtype),
    )
    combine = ScaledCombine(acc_dtype)
    return _named_scan(combine, elements, h0, reset, layout, method, chunk_size)
