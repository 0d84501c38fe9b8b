"""Causal depthwise 1-D convolution that never mixes packed documents."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import StatefulLayer
from recurrent_lm.layers import init
from recurrent_lm.layers.causal_filter import causal_filter


@pz.pytree_dataclass
class CausalConv1D(StatefulLayer):
    """Causal depthwise convolution over "seq", cut at document starts.

    Named axes: in {..., "seq", axis} -> out {..., "seq", axis}.
    Side input: ``context`` (document cuts).
    State: ``history`` {"batch", "conv_taps": K-1, axis}, the last inputs, in
    the parameter dtype.
    Parameters: ``weights`` {"conv_taps", axis} (oldest tap first, the last tap
    multiplies the current token), ``bias`` {axis} (None: no bias).
    Site: ``output`` {..., "seq", axis}.
    """

    weights: pz.nn.ParameterLike[pz.nx.NamedArray]
    bias: pz.nn.ParameterLike[pz.nx.NamedArray] | None
    axis: str = dataclasses.field(default=axes.LRU, metadata={"pytree_node": False})
    output: sites.Hook = sites.site_field()

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, width: int, num_taps: int, *,
                    axis: str = axes.LRU, init_scale: float = 0.01, use_bias: bool = True,
                    initializer=None, dtype=jnp.float32) -> CausalConv1D:
        """Weights fan-in normal with variance ``init_scale / num_taps`` (or
        `initializer`, ``(key, named_shape, dtype) -> NamedArray``), bias zero."""
        shape = {axes.CONV_TAPS: num_taps, axis: width}
        if initializer is None:
            weights = pz.nn.make_parameter(
                f"{name}.weights", init_base_rng, init.fan_in_normal, shape, dtype,
                fan_in_axes=(axes.CONV_TAPS,), scale=init_scale,
            )
        else:
            weights = pz.nn.make_parameter(f"{name}.weights", init_base_rng, initializer, shape, dtype)
        bias = None
        if use_bias:
            bias = pz.nn.make_parameter(f"{name}.bias", init_base_rng, init.zeros, {axis: width}, dtype)
        return cls(weights=weights, bias=bias, axis=axis)

    @property
    def num_taps(self) -> int:
        return self.weights.value.named_shape[axes.CONV_TAPS]

    def initial_state(self, batch_size: int, max_length: int | None = None) -> pz.nx.NamedArray:
        del max_length  # the history has a fixed size
        width = self.weights.value.named_shape[self.axis]
        shape = {axes.BATCH: batch_size, axes.CONV_TAPS: self.num_taps - 1, self.axis: width}
        return pz.nx.zeros(shape, self.weights.value.dtype)

    def forward(
        self, x: pz.nx.NamedArray, context: DocumentContext, history: pz.nx.NamedArray
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        """Convolution continuing from `history`; returns ``(y, new_history)``."""
        # Weights are stored oldest tap first; the filter wants tap l = lag l.
        kernel = pz.nx.nmap(lambda w: w[::-1])(self.weights.value.untag(axes.CONV_TAPS))
        y, new_history = causal_filter(
            x, context, kernel.tag(axes.CONV_TAPS).astype(x.dtype), history
        )
        if self.bias is not None:
            y = y + self.bias.value.astype(y.dtype)
        return self.output(y), new_history
