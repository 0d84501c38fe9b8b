"""Named activation sites: the points interpretability tools read and change.

A layer that exposes an internal activation holds a `Site` field and passes the
activation through it (an identity by default, free under jit). A linear
recurrence exposes its states through a `StateSite`, which also sees the
recurrence inputs ``(a, b)`` of ``h_t = a_t h_{t-1} + b_t`` before the scan:
that is where an intervention that *sets* ``h_t`` acts (``a_t := 0,
b_t := value``), so the change propagates to every later state exactly as the
recurrence would carry it.

A site's name is its path in the model, e.g.
``"blocks.2.temporal_block.rg_lru.hidden_state"``; `recurrent_lm.interp`
finds sites with ``pz.select(model).at_instances_of(Hook)`` and swaps them for
captures or interventions (subclasses of `Hook`).
"""

from __future__ import annotations

import dataclasses

import jax
from penzai import pz


@pz.pytree_dataclass
class Hook(pz.nn.Layer):
    """Base of sites and of what replaces them; the identity on both paths.

    ``__call__(x)`` sees the activation; ``update(a, b)`` (used by recurrent
    state sites only) sees the recurrence inputs before the scan.
    """

    def __call__(self, x, /, **_unused_side_inputs):
        return x

    def update(self, a, b, /, **_unused_side_inputs):
        return a, b


@pz.pytree_dataclass
class Site(Hook):
    """An activation site (identity)."""


@pz.pytree_dataclass
class StateSite(Hook):
    """The states of a linear recurrence (identity); see the module docstring.

    Attributes:
      scaled: the state is kept in a scaled form that the layer reads only
        through the recurrence (RWKV's WKV): interventions can restart it from
        a given state (``Replace``), not add to it or change only the output.
    """

    scaled: bool = dataclasses.field(default=False, metadata={"pytree_node": False})


# Fields that site names skip: containers whose nesting says nothing about the
# model ("blocks.sublayers.3" reads "blocks.3"). Our own wrappers (the sampling
# mode's `Stateful` and `SamplingLM`) declare theirs in a class attribute
# ``transparent_fields``.
_PENZAI_TRANSPARENT_FIELDS: dict[type, tuple[str, ...]] = {pz.nn.Sequential: ("sublayers",)}


def _transparent_fields(node) -> tuple[str, ...]:
    for cls, names in _PENZAI_TRANSPARENT_FIELDS.items():
        if isinstance(node, cls):
            return names
    return getattr(type(node), "transparent_fields", ())


def path_name(root, keypath) -> str:
    """The dotted name of the subtree of `root` at `keypath`.

    The one naming scheme of the library: sites, sampling-state labels and
    parameter labels all read ``blocks.2.temporal_block.rg_lru...``. (Penzai's
    `pz.pretty_keystr` spells the same path ``.blocks.sublayers[2]...``, with
    the container fields that say nothing about the model.)"""
    parts, node = [], root
    for key in keypath:
        if isinstance(key, jax.tree_util.GetAttrKey):
            skip = key.name in _transparent_fields(node)
            node = getattr(node, key.name)
            if not skip:
                parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            node = node[key.idx]
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.DictKey):
            node = node[key.key]
            parts.append(str(key.key))
        else:
            raise TypeError(f"unexpected key {key!r} in a model path.")
    return ".".join(parts)


def site_field() -> dataclasses.Field:
    """A dataclass field holding a fresh `Site`."""
    return dataclasses.field(default_factory=Site)


def state_site_field() -> dataclasses.Field:
    """A dataclass field holding a fresh `StateSite`."""
    return dataclasses.field(default_factory=StateSite)
