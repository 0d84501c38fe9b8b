"""Shared machinery for official-format converters.

A converter describes each official leaf once, as a `LeafLayout`: its path,
the named axes its positional dimensions carry (merged axes as tuples,
singleton dimensions as the int 1), and which of our parameter labels it holds
(several when the leaf stacks them along its first dimension). From that one
description we derive the expected official shapes, the conversion in both
directions (reshape + tag, or unwrap + reshape; bit-exact), and one error that
lists every missing, unexpected or mis-shaped leaf.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm.params import CheckpointMismatchError

Dim = Union[str, tuple[str, ...], int]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a/b/c": leaf}`` (keys may contain dots: "blocks.0")."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """One official leaf and the parameter(s) of ours it holds.

    Attributes:
      path: "/"-joined path in the official tree.
      labels: our parameter labels. With more than one, the leaf stacks them
        along its first dimension, in this order.
      dims: the named axes of the remaining dimensions, in order: an axis name,
        a tuple of names merged row-major into one dimension (``("heads",
        "projection")`` for a [D, H*hd] kernel), or the int 1 for a singleton.
    """

    path: str
    labels: tuple[str, ...]
    dims: tuple[Dim, ...]

    @property
    def axis_names(self) -> tuple[str, ...]:
        names = []
        for dim in self.dims:
            if isinstance(dim, str):
                names.append(dim)
            elif isinstance(dim, tuple):
                names.extend(dim)
        return tuple(names)

    def shape(self, named_shape: Mapping[str, int]) -> tuple[int, ...]:
        sizes = []
        for dim in self.dims:
            if isinstance(dim, str):
                sizes.append(named_shape[dim])
            elif isinstance(dim, tuple):
                sizes.append(math.prod(named_shape[n] for n in dim))
            else:
                sizes.append(dim)
        if len(self.labels) > 1:
            sizes.insert(0, len(self.labels))
        return tuple(sizes)

    def to_named(self, array, named_shape: Mapping[str, int]) -> dict[str, pz.nx.NamedArray]:
        """Official leaf -> ``{label: NamedArray}``."""
        parts = [array[i] for i in range(len(self.labels))] if len(self.labels) > 1 else [array]
        unmerged = tuple(named_shape[n] for n in self.axis_names)
        return {
            label: pz.nx.wrap(jnp.asarray(part).reshape(unmerged)).tag(*self.axis_names)
            for label, part in zip(self.labels, parts)
        }

    def from_named(self, values: Mapping[str, pz.nx.NamedArray]):
        """``{label: NamedArray}`` -> official leaf."""
        first = values[self.labels[0]]
        merged = self.shape(first.named_shape)
        if len(self.labels) > 1:
            merged = merged[1:]
        parts = [values[label].unwrap(*self.axis_names).reshape(merged) for label in self.labels]
        return jnp.stack(parts) if len(self.labels) > 1 else parts[0]


def layout_named_shape(layout: LeafLayout, expected_named) -> dict[str, int]:
    """The axis sizes of all of a leaf's labels (they may differ in axes, e.g.
    a fused qkv leaf whose parts have "heads" and "kv_heads")."""
    shape: dict[str, int] = {}
    for label in layout.labels:
        shape.update(expected_named[label].named_shape)
    return shape


def check_leaves(
    found: Mapping[str, Any],
    layouts: Sequence[LeafLayout],
    expected_named: Mapping[str, pz.nx.NamedArray],
    *,
    source: str,
    hint: str = "",
) -> None:
    """Raises one `CheckpointMismatchError` for every leaf problem in `found`."""
    expected = {
        layout.path: layout.shape(layout_named_shape(layout, expected_named))
        for layout in layouts
    }
    found_shapes = {path: tuple(np.shape(v)) for path, v in found.items()}
    error = CheckpointMismatchError(
        source,
        missing={p: s for p, s in expected.items() if p not in found_shapes},
        unexpected={p: s for p, s in found_shapes.items() if p not in expected},
        misshaped={
            p: (expected[p], s)
            for p, s in found_shapes.items()
            if p in expected and expected[p] != s
        },
        hint=hint,
    )
    if error.has_problems:
        raise error


def convert_leaves(
    found: Mapping[str, Any],
    layouts: Sequence[LeafLayout],
    expected_named: Mapping[str, pz.nx.NamedArray],
    dtype,
) -> dict[str, pz.nx.NamedArray]:
    """Official leaves -> ``{label: NamedArray}`` in `dtype` (after `check_leaves`)."""
    values = {}
    for layout in layouts:
        named_shape = layout_named_shape(layout, expected_named)
        array = jnp.asarray(found[layout.path])
        if array.dtype != dtype:
            array = array.astype(dtype)
        values.update(layout.to_named(array, named_shape))
    return values


def restore_orbax_tree(path: str, sharding: jax.sharding.Sharding | None = None):
    """The parameter tree of an orbax PyTree checkpoint directory, its leaves
    placed with `sharding` (default: the first local device)."""
    import orbax.checkpoint as ocp  # heavy import, only when reading checkpoints

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path)
    # orbax >= 0.11.22 returns StepMetadata; older ones return the tree itself.
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(
        lambda _: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding), tree
    )
    return checkpointer.restore(path, restore_args=restore_args)


def convert_parser(
    module: str, description: str, *, source: str, source_help: str
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``python -m checkpoints_conversion.<module> convert SRC DST`` command
    line every converter has: returns (parser, the ``convert`` sub-parser, to
    which the converter adds its format's flags)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m checkpoints_conversion.{module}", description=description
    )
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help=f"{source} -> recurrent_lm.save directory")
    convert.add_argument("src", help=source_help)
    convert.add_argument("dst", help="output directory (must not exist)")
    return parser, convert
