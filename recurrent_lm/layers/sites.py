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
    """The states of a linear recurrence (identity); see the module docstring."""


def site_field() -> dataclasses.Field:
    """A dataclass field holding a fresh `Site`."""
    return dataclasses.field(default_factory=Site)


def state_site_field() -> dataclasses.Field:
    """A dataclass field holding a fresh `StateSite`."""
    return dataclasses.field(default_factory=StateSite)
