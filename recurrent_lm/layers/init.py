"""Parameter initialisers over named shapes.

Each takes ``(key, named_shape, dtype, ...)`` and returns a NamedArray, which is
the calling convention of `pz.nn.make_parameter(label, rng, initializer,
named_shape, dtype, ...)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from penzai import pz


def zeros(key, named_shape: Mapping[str, int], dtype) -> pz.nx.NamedArray:
    del key
    return pz.nx.zeros(dict(named_shape), dtype)


def fan_in_normal(
    key,
    named_shape: Mapping[str, int],
    dtype,
    *,
    fan_in_axes: Sequence[str],
    scale: float = 1.0,
) -> pz.nx.NamedArray:
    """Normal with variance ``scale / fan_in``, fan_in = product of `fan_in_axes`.

    This is `variance_scaling(scale, "fan_in", "normal")`, the initialiser of
    every dense weight in the official Griffin code.
    """
    missing = [a for a in fan_in_axes if a not in named_shape]
    if missing:
        raise ValueError(f"fan-in axes {missing} not in shape {dict(named_shape)}")
    fan_in = math.prod(named_shape[a] for a in fan_in_axes)
    std = math.sqrt(scale / fan_in)
    data = std * jax.random.normal(key, tuple(named_shape.values()), jnp.float32)
    return pz.nx.wrap(data.astype(dtype)).tag(*named_shape)


def orthogonal(
    key,
    named_shape: Mapping[str, int],
    dtype,
    *,
    in_axes: Sequence[str],
    scale: float = 1.0,
) -> pz.nx.NamedArray:
    """A (scaled) orthogonal matrix from the `in_axes` to the other axes.

    torch's ``nn.init.orthogonal_(w, gain=scale)`` on the [out, in] matrix, as
    RWKV initialises its projections. Stored in `named_shape`'s order (the
    layout `layers.linear.dense` chose): an [out..., in] weight with several
    output axes made XLA:CPU's one-token product ~4x slower than [in, out...]
    (RWKV-7's receptance / key / value, ``benchmarks/rwkv7.py``).
    """
    missing = [a for a in in_axes if a not in named_shape]
    if missing:
        raise ValueError(f"input axes {missing} not in shape {dict(named_shape)}")
    out_axes = [a for a in named_shape if a not in in_axes]
    rows = math.prod(named_shape[a] for a in out_axes)
    cols = math.prod(named_shape[a] for a in in_axes)
    data = jax.nn.initializers.orthogonal(scale)(key, (rows, cols), jnp.float32)
    data = data.reshape([named_shape[a] for a in (*out_axes, *in_axes)])
    return pz.nx.wrap(data.astype(dtype)).tag(*out_axes, *in_axes).order_as(*named_shape)


def normal(key, named_shape: Mapping[str, int], dtype, *, std: float) -> pz.nx.NamedArray:
    """Normal with standard deviation `std` (torch's ``normal_(0, std)``)."""
    data = std * jax.random.normal(key, tuple(named_shape.values()), jnp.float32)
    return pz.nx.wrap(data.astype(dtype)).tag(*named_shape)


def uniform(key, named_shape: Mapping[str, int], dtype, *, bound: float) -> pz.nx.NamedArray:
    """Uniform in ``[-bound, bound]``; ``bound = 1 / sqrt(fan_in)`` is torch's
    ``kaiming_uniform_(a=sqrt(5))``, the default of its linear and conv layers."""
    data = jax.random.uniform(key, tuple(named_shape.values()), jnp.float32, -bound, bound)
    return pz.nx.wrap(data.astype(dtype)).tag(*named_shape)
