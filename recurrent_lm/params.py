"""Parameters by label: read them out of a model, bind them into a skeleton.

Build-then-bind: a model built with ``key=None`` has an empty
`pz.ParameterSlot` for every parameter; loaders fill the slots by label and
then check that nothing is missing, left over, or of the wrong shape, reporting
every problem at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
from penzai import pz

from recurrent_lm.core.model import DecoderLM


class CheckpointMismatchError(ValueError):
    """Parameters missing, unexpected or mis-shaped; the message lists each."""

    def __init__(
        self,
        source: str,
        *,
        missing: Mapping[str, Any] | None = None,
        unexpected: Mapping[str, Any] | None = None,
        misshaped: Mapping[str, tuple[Any, Any]] | None = None,
        hint: str = "",
    ):
        self.missing = dict(missing or {})
        self.unexpected = dict(unexpected or {})
        self.misshaped = dict(misshaped or {})
        lines = [f"{source} does not match the model:"]
        for path, shape in sorted(self.missing.items()):
            lines.append(f"  missing     {path}: expected shape {shape}")
        for path, shape in sorted(self.unexpected.items()):
            lines.append(f"  unexpected  {path}: found shape {shape}")
        for path, (expected, found) in sorted(self.misshaped.items()):
            lines.append(f"  mis-shaped  {path}: expected {expected}, found {found}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))

    @property
    def has_problems(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)


def parameter_values(model) -> dict[str, pz.nx.NamedArray]:
    """``{label: value}`` of every parameter (bound or frozen) in `model`."""
    found = (
        pz.select(model)
        .at_instances_of(pz.Parameter | pz.ParameterValue)
        .get_sequence()
    )
    return {p.label: p.value for p in found}


def abstract_parameters(build: Callable[[jax.Array], Any]) -> dict[str, pz.nx.NamedArray]:
    """``{label: NamedArray of jax.ShapeDtypeStruct}`` that `build(key)` creates.

    Runs no initialiser (`jax.eval_shape`), so it is cheap for any model size.
    """

    def init(key):
        return parameter_values(build(key))

    return jax.eval_shape(init, jax.random.key(0))


def named_shape_str(x) -> str:
    return "{" + ", ".join(f"{n}: {s}" for n, s in x.named_shape.items()) + "}"


def bind_parameters(
    skeleton,
    values: Mapping[str, pz.nx.NamedArray],
    expected: Mapping[str, pz.nx.NamedArray],
    *,
    source: str,
):
    """Fills `skeleton`'s parameter slots with `values`, checking everything.

    Args:
      skeleton: a model with `pz.ParameterSlot`s (built with ``key=None``).
      values: ``{label: NamedArray}``.
      expected: ``{label: abstract NamedArray}`` from `abstract_parameters`.
      source: how to name the checkpoint in errors.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        parameter (by label and named shape).
    """
    missing = {k: named_shape_str(v) for k, v in expected.items() if k not in values}
    unexpected = {k: named_shape_str(v) for k, v in values.items() if k not in expected}
    misshaped = {
        k: (named_shape_str(expected[k]), named_shape_str(v))
        for k, v in values.items()
        if k in expected and dict(v.named_shape) != dict(expected[k].named_shape)
    }
    error = CheckpointMismatchError(
        source, missing=missing, unexpected=unexpected, misshaped=misshaped
    )
    if error.has_problems:
        raise error
    variables = [
        pz.Parameter(label=label, value=values[label].order_as(*expected[label].named_shape))
        for label in expected
    ]
    model = pz.bind_variables(skeleton, variables)
    pz.nn.assert_no_parameter_slots(model)
    return model


def build_initialised(build: Callable[[Any, jax.Array | None], Any], config,
                      key: jax.Array | None, *, source: str):
    """``build(config, key)``, its parameters created by one compiled call.

    For initialisers that are slow op by op (an orthogonal matrix takes a QR
    each): the parameter values come from ``jax.jit`` of the whole
    initialisation, compiled once per ``(build, config)`` (both hashable;
    ``build`` a module-level function), then bound into ``build(config, None)``.
    A None key gives that skeleton (empty parameter slots) itself.
    """
    if key is None:
        return build(config, None)
    values = _initial_values(build, config, key)
    return bind_parameters(build(config, None), values, values, source=source)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _initial_values(build, config, key):
    return parameter_values(build(config, key))


def cast_parameters(model, dtype):
    """`model` with every floating-point parameter cast to `dtype`.

    Running the result computes in `dtype` (bfloat16 inference from float32
    weights, as the official ``Griffin(dtype=bf16, param_dtype=f32)`` does);
    recurrences and softmax still accumulate in float32. Parameters stay
    parameters (with the same labels), so the result can be saved or trained.
    """
    import jax.numpy as jnp

    def cast(param):
        value = param.value
        if jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(dtype)
        if isinstance(param, pz.ParameterValue):
            return pz.ParameterValue(label=param.label, value=value)
        return pz.Parameter(label=param.label, value=value, metadata=dict(param.metadata))

    found = (
        pz.select(model).at_instances_of(pz.Parameter | pz.ParameterValue).get_sequence()
    )
    # One replacement per Parameter object, so tied parameters stay shared.
    replacements = {id(p): cast(p) for p in found}
    model = (
        pz.select(model)
        .at_instances_of(pz.Parameter | pz.ParameterValue)
        .apply(lambda p: replacements[id(p)])
    )
    if isinstance(model, DecoderLM):
        config = dataclasses.replace(model.config, param_dtype=jnp.dtype(dtype).name)
        model = dataclasses.replace(model, config=config)
    return model
