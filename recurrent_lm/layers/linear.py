"""Dense and block-diagonal linear layers over named axes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import init


def dense(
    name: str,
    init_base_rng: jax.Array | None,
    in_axes: Mapping[str, int],
    out_axes: Mapping[str, int],
    *,
    use_bias: bool,
    init_scale: float = 1.0,
    dtype=jnp.float32,
    initializer=None,
) -> pz.nn.Linear | pz.nn.Affine:
    """A penzai `Linear` (plus `AddBias` if `use_bias`) contracting `in_axes`.

    Parameters: ``{name}.weights`` {*in_axes, *out_axes}, initialised
    fan-in normal with variance ``init_scale / fan_in``; ``{name}.bias``
    {*out_axes}, zeros. Named axes: in {..., *in_axes} -> out {..., *out_axes}.
    `initializer` (``(key, named_shape, dtype) -> NamedArray``) replaces the
    fan-in normal weights (e.g. RWKV's orthogonal and zero matrices).
    """
    in_axes, out_axes = dict(in_axes), dict(out_axes)
    # Storage order. A plain matrix is stored [out, in]: XLA:CPU's matrix-vector
    # product (decoding) reads it ~15% faster than [in, out]. With several
    # output axes (attention heads x head_dim) XLA would copy an [out..., in]
    # weight to a matrix on every call, so those stay [in, out...].
    layout = {**out_axes, **in_axes} if len(out_axes) == len(in_axes) == 1 else {**in_axes, **out_axes}
    if initializer is None:
        weights = pz.nn.make_parameter(
            f"{name}.weights",
            init_base_rng,
            init.fan_in_normal,
            layout,
            dtype,
            fan_in_axes=tuple(in_axes),
            scale=init_scale,
        )
    else:
        weights = pz.nn.make_parameter(f"{name}.weights", init_base_rng, initializer, layout, dtype)
    linear = pz.nn.Linear(
        weights=weights,
        in_axis_names=tuple(in_axes),
        out_axis_names=tuple(out_axes),
    )
    if not use_bias:
        return linear
    bias = pz.nn.AddBias(
        bias=pz.nn.make_parameter(
            f"{name}.bias", init_base_rng, init.zeros, out_axes, dtype
        ),
        new_axis_names=(),
    )
    return pz.nn.Affine(sublayers=[linear, bias])


def fused_parts(
    x: pz.nx.NamedArray, shapes: Sequence[Mapping[str, int]], *, axis: str = axes.FUSED
) -> list[pz.nx.NamedArray]:
    """The parts of a fused projection's output, each with its own axes.

    `x` {..., axis} holds the parts end to end along `axis` (a fused
    projection: one weight whose outputs are several quantities, as the
    checkpoints store Mamba's ``in_proj``); part i has the named shape
    ``shapes[i]``, laid out row-major along `axis`.

    Named axes: in {..., axis} -> [{..., *shapes[0]}, {..., *shapes[1]}, ...].
    """
    sizes = [math.prod(shape.values()) for shape in shapes]
    if sum(sizes) != x.named_shape[axis]:
        raise ValueError(
            f"parts {[dict(s) for s in shapes]} hold {sum(sizes)} features but {axis!r} has"
            f" {x.named_shape[axis]}."
        )
    parts, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        part = x[{axis: pz.slice[start:start + size]}].untag(axis)
        reshape = lambda v, shape=shape: v.reshape(tuple(shape.values()))
        parts.append(pz.nx.nmap(reshape)(part).tag(*shape))
        start += size
    return parts


@pz.pytree_dataclass
class BlockDiagonalLinear(pz.nn.Layer):
    """A linear map that is block-diagonal over `axis` (the RG-LRU gates).

    The feature axis `axis` (size ``heads * block_in``) is split head-major into
    {"heads", "block_in"}; head h maps its block with its own matrix, and the
    outputs are concatenated back in head order.

    Named axes: in {..., axis} -> out {..., axis}.
    Parameters: ``weights`` {"heads", "block_in", "block_out"}, ``bias``
    {"heads", "block_out"}.
    """

    weights: pz.nn.ParameterLike[pz.nx.NamedArray]
    bias: pz.nn.ParameterLike[pz.nx.NamedArray]
    axis: str = dataclasses.field(default=axes.LRU, metadata={"pytree_node": False})

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, width: int, num_blocks: int, *,
                    axis: str = axes.LRU, init_scale: float = 1.0, dtype=jnp.float32) -> BlockDiagonalLinear:
        if width % num_blocks:
            raise ValueError(f"width {width} is not divisible by {num_blocks} blocks.")
        block = width // num_blocks
        return cls(
            weights=pz.nn.make_parameter(
                f"{name}.weights",
                init_base_rng,
                init.fan_in_normal,
                {axes.HEADS: num_blocks, axes.BLOCK_IN: block, axes.BLOCK_OUT: block},
                dtype,
                fan_in_axes=(axes.BLOCK_IN,),
                scale=init_scale,
            ),
            bias=pz.nn.make_parameter(
                f"{name}.bias",
                init_base_rng,
                init.zeros,
                {axes.HEADS: num_blocks, axes.BLOCK_OUT: block},
                dtype,
            ),
            axis=axis,
        )

    def __call__(self, x: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
        w = self.weights.value.untag(axes.HEADS, axes.BLOCK_IN, axes.BLOCK_OUT)
        b = self.bias.value.untag(axes.HEADS, axes.BLOCK_OUT)

        def apply(v, w, b):
            heads, block_in, _ = w.shape
            y = jnp.einsum("hi,hij->hj", v.reshape(heads, block_in), w) + b
            return y.reshape(-1)

        return pz.nx.nmap(apply)(x.untag(self.axis), w, b).tag(self.axis)
