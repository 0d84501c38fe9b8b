"""The state protocol of temporal layers, and the one wrapper that carries it.

A temporal layer mixes information along "seq". Every such layer either

* subclasses `StatefulLayer`: ``initial_state(batch_size, max_length=None)``
  gives the state of fresh streams, and ``forward(x, context, state) -> (y,
  new_state)`` continues them; a call on a chunk of any length continues the
  stream, so the ordinary call (``forward`` from the initial state, the state
  dropped) and sampling share one body of math; or
* is a `TemporalLayer` without state (a layer that sampling mode must refuse:
  it cannot continue a stream).

`Stateful` wraps any `StatefulLayer` with its state in a `pz.StateVariable`;
`recurrent_lm.sampling.to_sampling_mode` swaps every `StatefulLayer` of a model
for one, found by type: no registry, and a `TemporalLayer` that is not stateful
is an error there rather than silently stateless.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import context as context_lib


class TemporalLayer(pz.nn.Layer):
    """Marker: a layer that mixes along "seq" (reads ``context``)."""


class StatefulLayer(TemporalLayer):
    """A temporal layer that can continue a stream from a state.

    Subclasses implement `initial_state` and `forward`; ``__call__`` (the
    ordinary, stateless call) runs `forward` from the initial state.

    Class attribute ``side_inputs``: names of side inputs besides ``context``
    that `forward` takes as keyword arguments (e.g. a
    `recurrent_lm.core.model.SideChannel`); both calls pass them on, and a
    missing one is an error naming it.
    """

    side_inputs: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def initial_state(self, batch_size: int, max_length: int | None = None) -> Any:
        """The state of `batch_size` fresh streams ({"batch": batch_size, ...}).

        ``max_length`` is the longest stream the state must hold, for layers
        whose state grows with the stream (a global attention cache); others
        ignore it.
        """

    @abc.abstractmethod
    def forward(self, x, context: context_lib.DocumentContext, state) -> tuple[Any, Any]:
        """``(y, new_state)``: `x` {..., "seq", ...} continuing from `state`.

        When ``context.new_streams`` is True, `state` is the initial state and
        the layer may skip reading it.
        """

    def __call__(self, x, *, context=None, **side_inputs):
        context = context_lib.require_context(context, type(self).__name__)
        batch_size = context.segment_pos.named_shape[axes.BATCH]
        state = self.initial_state(batch_size, max_length=context.steps)
        y, _ = self.forward(x, dataclasses.replace(context, new_streams=True), state,
                            **wanted_side_inputs(self, side_inputs))
        return y


def wanted_side_inputs(layer: StatefulLayer, side_inputs: dict[str, Any]) -> dict[str, Any]:
    """The side inputs `layer`'s ``forward`` takes (its ``side_inputs``), checked present."""
    missing = [name for name in layer.side_inputs if name not in side_inputs]
    if missing:
        raise ValueError(
            f"{type(layer).__name__} needs the side input(s) {missing}; call it through its"
            " model, which creates them."
        )
    return {name: side_inputs[name] for name in layer.side_inputs}


@pz.pytree_dataclass
class Stateful(pz.nn.Layer):
    """A `StatefulLayer` with its state: a call continues every stream.

    Attributes:
      layer: the wrapped layer (its parameters are the model's own).
      state: the layer's state in a `pz.StateVariable`.
      batch_size, max_length: how the state was sized (static), to rebuild the
        initial state when a call starts fresh streams.
    """

    layer: StatefulLayer
    state: pz.StateVariable
    batch_size: int = dataclasses.field(metadata={"pytree_node": False})
    max_length: int | None = dataclasses.field(metadata={"pytree_node": False})

    # Site names and state labels read through the wrapper: a sampling-mode
    # site keeps the name it has in the ordinary model.
    transparent_fields: ClassVar[tuple[str, ...]] = ("layer",)

    @classmethod
    def wrap(cls, layer: StatefulLayer, *, batch_size: int, max_length: int | None,
             label: str) -> Stateful:
        state = layer.initial_state(batch_size, max_length=max_length)
        return cls(layer=layer, state=pz.StateVariable(state, label=label),
                   batch_size=batch_size, max_length=max_length)

    def __call__(self, x, *, context=None, **side_inputs):
        context = context_lib.require_context(context, type(self.layer).__name__)
        if context.new_streams:
            state = self.layer.initial_state(self.batch_size, max_length=self.max_length)
        else:
            state = self.state.value
        y, new_state = self.layer.forward(x, context, state,
                                          **wanted_side_inputs(self.layer, side_inputs))
        # A fixed layout: the state is a while-loop carry when decoding.
        self.state.value = order_like(new_state, self.state.value)
        return y


def order_like(new, old):
    """`new` with the axis order of `old`, leaf by leaf (NamedArrays only)."""
    is_named = lambda x: isinstance(x, pz.nx.NamedArrayBase)
    return jax.tree_util.tree_map(
        lambda n, o: pz.nx.order_like(n, o) if is_named(n) else n, new, old, is_leaf=is_named
    )
