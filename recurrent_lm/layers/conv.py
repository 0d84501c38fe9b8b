"""Causal depthwise 1-D convolution that never mixes packed documents."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import init, positions, sites


def causal_conv_1d(x, starts, w, b, history):
    """One channel of the convolution, on positional arrays.

    ``y_n = b + sum_s w[K-1-s] * x_{n-s}``, dropping a term when it reaches
    before the sequence or across a document start in ``(n-s, n]``.

    Args:
      x: [T] inputs.
      starts: [T] bool, True where a document starts.
      w: [K] taps, oldest first (``w[K-1]`` multiplies the current input).
      b: [] bias.
      history: [K-1] the inputs before ``x`` (zeros at the start of a stream),
        already zeroed where a document started after them.

    Returns:
      ``(y [T], new_history [K-1])``; the new history is the last K-1 inputs,
      zeroed where a document starts after them, so that a later call that
      continues the stream applies the same cuts as one call over everything.
    """
    taps = w.shape[0]
    steps = x.shape[0]
    extended = jnp.concatenate([history.astype(x.dtype), x])
    y = x * w[taps - 1]
    blocked = jnp.zeros((steps,), bool)
    for shift in range(1, taps):
        # Tap `shift` is cut if a document starts at n-shift+1 .. n.
        blocked = blocked | _shift_right(starts, shift - 1)
        window = extended[taps - 1 - shift : taps - 1 - shift + steps]
        y = y + jnp.where(blocked, jnp.zeros((), x.dtype), window) * w[taps - 1 - shift]
    y = y + b
    # History for the next call, with entries that precede a later start zeroed.
    tail = extended[steps:]
    start_after = jnp.zeros((taps - 1,), bool)
    for j in range(taps - 1):
        first = steps - (taps - 1) + j + 1  # index into x of the next position
        start_after = start_after.at[j].set(jnp.any(starts[max(first, 0) :]))
    new_history = jnp.where(start_after, jnp.zeros((), tail.dtype), tail)
    return y, new_history


def _shift_right(v, shift: int):
    if shift == 0:
        return v
    return jnp.concatenate([jnp.zeros((shift,), v.dtype), v[:-shift]])[: v.shape[0]]


@pz.pytree_dataclass
class CausalConv1D(pz.nn.Layer):
    """Causal depthwise convolution over "seq", cut at document starts.

    Named axes: in {..., "seq", axis} -> out {..., "seq", axis}.
    Side input: ``segment_pos`` {"batch", "seq"}.
    Parameters: ``weights`` {"conv_taps", axis} (oldest tap first, the last tap
    multiplies the current token), ``bias`` {axis}.
    Site: ``output`` {..., "seq", axis}.
    """

    weights: pz.nn.ParameterLike[pz.nx.NamedArray]
    bias: pz.nn.ParameterLike[pz.nx.NamedArray]
    axis: str = dataclasses.field(default=axes.LRU, metadata={"pytree_node": False})
    output: sites.Hook = sites.site_field()

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        width: int,
        num_taps: int,
        *,
        axis: str = axes.LRU,
        init_scale: float = 0.01,
        dtype=jnp.float32,
    ) -> CausalConv1D:
        return cls(
            weights=pz.nn.make_parameter(
                f"{name}.weights",
                init_base_rng,
                init.fan_in_normal,
                {axes.CONV_TAPS: num_taps, axis: width},
                dtype,
                fan_in_axes=(axes.CONV_TAPS,),
                scale=init_scale,
            ),
            bias=pz.nn.make_parameter(
                f"{name}.bias", init_base_rng, init.zeros, {axis: width}, dtype
            ),
            axis=axis,
        )

    @property
    def num_taps(self) -> int:
        return self.weights.value.named_shape[axes.CONV_TAPS]

    def empty_history(self, named_shape) -> pz.nx.NamedArray:
        """Zero history for a stream whose other axes are `named_shape`."""
        shape = {**named_shape, axes.CONV_TAPS: self.num_taps - 1}
        shape[self.axis] = self.weights.value.named_shape[self.axis]
        return pz.nx.zeros(shape, self.weights.value.dtype)

    def forward(
        self,
        x: pz.nx.NamedArray,
        segment_pos: pz.nx.NamedArray,
        history: pz.nx.NamedArray | None,
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        """Convolution continuing from `history`; returns ``(y, new_history)``.

        `history` is {..., "conv_taps": K-1, axis} (None = zeros).
        """
        if history is None:
            batch_shape = {
                n: s for n, s in x.named_shape.items() if n not in (axes.SEQ, self.axis)
            }
            history = self.empty_history(batch_shape)
        starts = positions.document_starts(segment_pos)
        y, new_history = pz.nx.nmap(causal_conv_1d)(
            x.untag(axes.SEQ),
            starts.untag(axes.SEQ),
            self.weights.value.untag(axes.CONV_TAPS),
            self.bias.value,
            history.untag(axes.CONV_TAPS),
        )
        return self.output(y.tag(axes.SEQ)), new_history.tag(axes.CONV_TAPS)

    def __call__(
        self, x: pz.nx.NamedArray, *, segment_pos=None, **_unused_side_inputs
    ) -> pz.nx.NamedArray:
        segment_pos = positions.require_segment_pos(segment_pos, "CausalConv1D")
        y, _ = self.forward(x, segment_pos, None)
        return y

