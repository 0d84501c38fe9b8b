"""RMS normalisation with a zero-centred scale (Gemma / Griffin convention), with
a scale stored as is (LLaMA / Mamba convention, optionally per group), and LayerNorm."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import init


@pz.pytree_dataclass
class RMSNorm(pz.nn.Layer):
    """``x * rsqrt(mean(x^2) + eps) * (1 + scale)`` over one named axis.

    The parameter is stored zero-centred, exactly as the official checkpoints
    store it, and the 1 is added at run time: conversion is then bit-exact in
    both directions (storing ``1 + scale`` would round).

    Named axes: in {..., axis} -> out {..., axis}. Parameter ``scale``: {axis}.
    Computation follows the promoted dtype of the input and the scale.
    """

    scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    axis: str = dataclasses.field(default=axes.EMBEDDING, metadata={"pytree_node": False})
    eps: float = dataclasses.field(default=1e-6, metadata={"pytree_node": False})

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, width: int, *,
                    axis: str = axes.EMBEDDING, eps: float = 1e-6, dtype=jnp.float32) -> RMSNorm:
        return cls(
            scale=pz.nn.make_parameter(
                f"{name}.scale", init_base_rng, init.zeros, {axis: width}, dtype
            ),
            axis=axis,
            eps=eps,
        )

    def __call__(self, x: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
        eps = self.eps

        def normalize(v, scale):
            v, scale = jnp.asarray(v), jnp.asarray(scale)
            dtype = jnp.result_type(v, scale)
            v, scale = v.astype(dtype), scale.astype(dtype)
            var = jnp.mean(jnp.square(v))
            return v * jax.lax.rsqrt(var + eps) * (scale + 1)

        return pz.nx.nmap(normalize)(
            x.untag(self.axis), self.scale.value.untag(self.axis)
        ).tag(self.axis)


@pz.pytree_dataclass
class ScaledRMSNorm(pz.nn.Layer):
    """``x * rsqrt(mean(x^2) + eps) * scale`` over the axes `over`, the scale
    stored as is (1 at init): the T5 / LLaMA / Mamba convention.

    With ``groups`` > 1 the features (the axes of `over` flattened in their
    order) are cut into that many equal groups, each normalised on its own:
    Mamba-2's gated norm over {"heads", "projection"}, whose groups are
    runs of heads.

    Named axes: in {..., *over} -> out {..., *over}. Parameter ``scale``:
    {*over}. Computes in float32 (or wider); the normalised value is rounded
    to the scale's dtype before the scale multiplies it (the parameter dtype
    is the compute dtype, as elsewhere).
    """

    scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    over: tuple[str, ...] = dataclasses.field(default=(axes.EMBEDDING,), metadata={"pytree_node": False})
    groups: int = dataclasses.field(default=1, metadata={"pytree_node": False})
    eps: float = dataclasses.field(default=1e-5, metadata={"pytree_node": False})

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, shape: dict[str, int], *,
                    groups: int = 1, eps: float = 1e-5, dtype=jnp.float32) -> ScaledRMSNorm:
        """A norm over the axes of `shape` ({name: size}, in order), scale 1."""
        size = math.prod(shape.values())
        if size % groups:
            raise ValueError(f"{groups} groups do not divide the {size} features of {dict(shape)}.")
        ones = lambda key, shape, dtype: pz.nx.ones(dict(shape), dtype)
        return cls(
            scale=pz.nn.make_parameter(f"{name}.scale", init_base_rng, ones, dict(shape), dtype),
            over=tuple(shape),
            groups=groups,
            eps=eps,
        )

    def __call__(self, x: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
        eps, groups = self.eps, self.groups

        def normalize(v, scale):
            dtype = jnp.promote_types(jnp.float32, v.dtype)
            w = v.astype(dtype).reshape(groups, -1)
            w = w * jax.lax.rsqrt(jnp.mean(jnp.square(w), axis=-1, keepdims=True) + eps)
            return w.reshape(v.shape).astype(scale.dtype) * scale

        return pz.nx.nmap(normalize)(
            x.untag(*self.over), self.scale.value.untag(*self.over)
        ).tag(*self.over)


@pz.pytree_dataclass
class LayerNorm(pz.nn.Layer):
    """``(x - mean) * rsqrt(var + eps) * scale + bias`` over one named axis.

    The affine LayerNorm of torch (biased variance); ``scale`` is stored as
    is (1 at init), as torch stores ``weight``.

    Named axes: in {..., axis} -> out {..., axis}. Parameters ``scale``,
    ``bias``: {axis}. Computes in float32 (or wider), returns the input dtype.
    """

    scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    bias: pz.nn.ParameterLike[pz.nx.NamedArray]
    axis: str = dataclasses.field(default=axes.EMBEDDING, metadata={"pytree_node": False})
    eps: float = dataclasses.field(default=1e-5, metadata={"pytree_node": False})

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, width: int, *,
                    axis: str = axes.EMBEDDING, eps: float = 1e-5, dtype=jnp.float32) -> LayerNorm:
        ones = lambda key, shape, dtype: pz.nx.ones(dict(shape), dtype)
        return cls(
            scale=pz.nn.make_parameter(f"{name}.scale", init_base_rng, ones, {axis: width}, dtype),
            bias=pz.nn.make_parameter(f"{name}.bias", init_base_rng, init.zeros, {axis: width}, dtype),
            axis=axis,
            eps=eps,
        )

    def __call__(self, x: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
        eps = self.eps

        def normalize(v, scale, bias):
            dtype = jnp.promote_types(jnp.float32, v.dtype)
            w = v.astype(dtype)
            centred = w - jnp.mean(w)
            var = jnp.mean(jnp.square(centred))
            out = centred * jax.lax.rsqrt(var + eps) * scale.astype(dtype) + bias.astype(dtype)
            return out.astype(v.dtype)

        return pz.nx.nmap(normalize)(
            x.untag(self.axis), self.scale.value.untag(self.axis), self.bias.value.untag(self.axis)
        ).tag(self.axis)
