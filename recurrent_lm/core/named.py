"""Small helpers for moving between named and positional arrays, with checks.

Layers do their arithmetic on named arrays where broadcasting by name keeps the
code short, and drop to positional arrays (with an explicit, checked axis
order) where a JAX primitive needs one: scans, convolutions, attention.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax.numpy as jnp
from penzai import pz

NamedArray = pz.nx.NamedArray


def check_named(
    x,
    expected: Iterable[str],
    what: str,
    *,
    exact: bool = True,
) -> None:
    """Raises ValueError unless `x` is a NamedArray with the expected axes.

    Why not `pz.chk.check_structure`: it checks sizes against shape variables
    too, but reports a mismatch as a multi-line structure diff; user inputs
    (tokens, segment positions, scan inputs) need one line that names the
    value, the missing or unexpected axes, and the fix (``pz.nx.wrap(...)``).
    Layers check sizes where they combine arrays (`union_named_shape`).

    Args:
      x: the value to check.
      expected: axis names that must be present.
      what: how to call the value in the error message ("tokens", ...).
      exact: if True, no other named axes may be present.
    """
    expected = tuple(expected)
    if not isinstance(x, pz.nx.NamedArrayBase):
        raise TypeError(
            f"{what} must be a penzai NamedArray with named axes {set(expected)};"
            f" got {type(x).__name__}. Wrap raw arrays with"
            f" pz.nx.wrap(array, {', '.join(repr(n) for n in expected)})."
        )
    names = set(x.named_shape)
    problems = []
    if x.positional_shape:
        problems.append(f"unnamed positional axes of shape {x.positional_shape}")
    missing = [n for n in expected if n not in names]
    if missing:
        problems.append(f"missing axes {missing}")
    if exact:
        extra = sorted(str(n) for n in names - set(expected))
        if extra:
            problems.append(f"unexpected axes {extra}")
    if problems:
        raise ValueError(
            f"{what} must have named axes {sorted(expected)}"
            f"{'' if exact else ' (others allowed)'}; found named shape"
            f" {dict(x.named_shape)}: " + "; ".join(problems) + "."
        )


def union_named_shape(*arrays: NamedArray | None) -> dict[str, int]:
    """The named shape that broadcasting `arrays` by name produces.

    Raises:
      ValueError: if two arrays give the same axis different sizes.
    """
    shape: dict[str, int] = {}
    for x in arrays:
        if x is None:
            continue
        for name, size in x.named_shape.items():
            if shape.setdefault(name, size) != size:
                raise ValueError(
                    f"axis {name!r} has size {shape[name]} in one input and"
                    f" {size} in another."
                )
    return shape


def to_positional(x: NamedArray, axes: Mapping[str, int]):
    """Returns the data of `x` as a positional array laid out as `axes`.

    Axes of `axes` that `x` lacks are broadcast; `x` may not have axes that
    `axes` lacks.
    """
    extra = set(x.named_shape) - set(axes)
    if extra or x.positional_shape:
        raise ValueError(
            f"cannot lay out array with named shape {dict(x.named_shape)} and"
            f" positional shape {x.positional_shape} as {dict(axes)}."
        )
    present = [n for n in axes if n in x.named_shape]
    raw = x.unwrap(*present)
    missing = [i for i, n in enumerate(axes) if n not in x.named_shape]
    if missing:
        raw = jnp.expand_dims(raw, missing)
        raw = jnp.broadcast_to(raw, tuple(axes.values()))
    return raw


def from_positional(raw, names: Iterable[str]) -> NamedArray:
    """Wraps a positional array whose axes are, in order, `names`."""
    return pz.nx.wrap(raw).tag(*names)
