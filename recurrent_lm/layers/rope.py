"""Rotary position embeddings (rotate-half layout), optionally on part of a head."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core.context import require_context


def rotary_dims(head_dim: int, rotary_fraction: float) -> int:
    """Number of leading features of a head that rotate (even), or ValueError."""
    dims = head_dim * rotary_fraction
    if dims != int(dims) or int(dims) % 2:
        raise ValueError(
            f"RoPE on a fraction {rotary_fraction} of head_dim {head_dim} gives"
            f" {dims} features; it must be an even integer."
        )
    return int(dims)


def apply_rope(x, position, *, rotary_dims: int, max_wavelength: float,
               divide_by_timescale: bool = False):
    """Rotates one head vector ``x`` [head_dim] at scalar `position`.

    Features ``j`` and ``j + rotary_dims/2`` (j < rotary_dims/2) form a pair
    rotated by ``position * max_wavelength^(-2j/rotary_dims)``; features from
    `rotary_dims` on pass through unchanged. The angle is computed as
    ``position * (1 / timescale)`` (Griffin) or, with `divide_by_timescale`,
    ``position / timescale`` (Gemma): the two round differently in float32 at
    large positions, and each matches its official code bit for bit.
    """
    half = rotary_dims // 2
    if half == 0:
        return x
    timescale = max_wavelength ** (2 * jnp.arange(half) / rotary_dims)
    angle = position / timescale if divide_by_timescale else position * (1.0 / timescale)
    sin = jnp.sin(angle).astype(x.dtype)
    cos = jnp.cos(angle).astype(x.dtype)
    first, second, rest = x[:half], x[half:rotary_dims], x[rotary_dims:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin, rest])


@pz.pytree_dataclass
class RotaryEmbedding(pz.nn.Layer):
    """RoPE at each token's segment position (restarting in every document).

    Named axes: in {..., "seq", "projection"} -> same.
    Side input: ``context`` (its ``segment_pos`` {"batch", "seq"}).
    Static: ``divide_by_timescale`` picks the angle's rounding (see `apply_rope`).
    """

    rotary_fraction: float = dataclasses.field(metadata={"pytree_node": False})
    max_wavelength: float = dataclasses.field(metadata={"pytree_node": False})
    divide_by_timescale: bool = dataclasses.field(default=False, metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, *, context=None, **_unused_side_inputs) -> pz.nx.NamedArray:
        segment_pos = require_context(context, "RotaryEmbedding").segment_pos
        head_dim = x.named_shape[axes.PROJECTION]
        dims = rotary_dims(head_dim, self.rotary_fraction)
        return pz.nx.nmap(
            lambda v, p: apply_rope(
                v, p, rotary_dims=dims, max_wavelength=self.max_wavelength,
                divide_by_timescale=self.divide_by_timescale,
            )
        )(x.untag(axes.PROJECTION), segment_pos).tag(axes.PROJECTION)
