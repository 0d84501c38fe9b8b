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
    Static: which leading features of a head rotate, as ``rotary_fraction``
    of the head (Griffin, Gemma) or, when ``rotary_dims`` is set, as a count
    (flash-attn's ``rotary_emb_dim``, GPT-NeoX's ``rotary_dim``; build it
    with `leading`); ``divide_by_timescale`` picks the angle's rounding (see
    `apply_rope`).
    """

    rotary_fraction: float | None = dataclasses.field(metadata={"pytree_node": False})
    max_wavelength: float = dataclasses.field(metadata={"pytree_node": False})
    divide_by_timescale: bool = dataclasses.field(default=False, metadata={"pytree_node": False})
    rotary_dims: int | None = dataclasses.field(default=None, metadata={"pytree_node": False})

    @classmethod
    def leading(cls, rotary_dims: int, max_wavelength: float) -> RotaryEmbedding:
        """RoPE on the first `rotary_dims` features of each head.

        A count, not a fraction: e.g. 30 of 44 features is no exact float
        fraction of the head, and partial RoPE must rotate exactly that many.
        """
        return cls(rotary_fraction=None, max_wavelength=max_wavelength, rotary_dims=rotary_dims)

    def features(self, head_dim: int) -> int:
        """How many leading features of a `head_dim` head rotate, or ValueError."""
        if self.rotary_dims is None:
            return rotary_dims(head_dim, self.rotary_fraction)
        if self.rotary_dims % 2 or not 0 <= self.rotary_dims <= head_dim:
            raise ValueError(
                f"RoPE on {self.rotary_dims} features of head_dim {head_dim}: it must be"
                " even and at most head_dim."
            )
        return self.rotary_dims

    def __call__(self, x: pz.nx.NamedArray, *, context=None, **_unused_side_inputs) -> pz.nx.NamedArray:
        segment_pos = require_context(context, "RotaryEmbedding").segment_pos
        dims = self.features(x.named_shape[axes.PROJECTION])
        return pz.nx.nmap(
            lambda v, p: apply_rope(
                v, p, rotary_dims=dims, max_wavelength=self.max_wavelength,
                divide_by_timescale=self.divide_by_timescale,
            )
        )(x.untag(axes.PROJECTION), segment_pos).tag(axes.PROJECTION)
