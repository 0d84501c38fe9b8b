"""The base of architecture configs: field rules, presets, dict I/O.

An architecture's config is a frozen dataclass deriving from `Config`. Each
field states its rule (``field(default, POSITIVE_INT)``); construction fills
derived defaults (`Config.derived`), checks every field's rule, then the rules
that tie fields together (`Config.check`), and fails with ONE error naming every
bad field. Presets are plain dicts of field values, so an override re-derives
whatever the preset leaves to its default. Every option that changes the
numbers (dtypes, scan implementations, activation upcasts) is a field, so
`recurrent_lm.save` / `load` round-trip it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value must be.

    Attributes:
      test: True for a valid value (after `convert`).
      expects: how the error message says what is expected ("a positive integer").
      convert: optional normalisation before the test (e.g. a dtype to its
        name); raising TypeError / ValueError means invalid.
    """

    test: Callable[[Any], bool]
    expects: str
    convert: Callable[[Any], Any] | None = None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "a positive integer")
NON_NEGATIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "a non-negative integer")
INT = Rule(_is_int, "an integer")
POSITIVE = Rule(lambda v: _is_number(v) and v > 0, "> 0")
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, ">= 0")
FRACTION = Rule(lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1]")
BOOL = Rule(lambda v: isinstance(v, bool), "a bool")
PARAM_DTYPES = ("float32", "bfloat16", "float16", "float64")
PARAM_DTYPE = Rule(
    lambda v: v in PARAM_DTYPES,
    f"one of {PARAM_DTYPES}",
    convert=lambda v: jnp.dtype(v).name,
)


def tuple_of(rule: Rule) -> Rule:
    """A sequence (stored as a tuple) whose every item follows `rule`."""
    return Rule(
        lambda v: all(rule.test(item) for item in v),
        f"a sequence of items each {rule.expects}",
        convert=lambda v: tuple(v),
    )


def one_of(*choices) -> Rule:
    return Rule(lambda v: v in choices, f"one of {choices}")


def optional(rule: Rule) -> Rule:
    """`rule`, or None."""
    return Rule(
        lambda v: v is None or rule.test(v),
        f"{rule.expects} (or None)",
        convert=None if rule.convert is None else (lambda v: None if v is None else rule.convert(v)),
    )


def field(default, rule: Rule | None = None) -> Any:
    """A dataclass field with its rule."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def _check_field(f: dataclasses.Field, value) -> tuple[Any, str | None]:
    rule = f.metadata.get("rule")
    if rule is None:
        return value, None
    if rule.convert is not None:
        try:
            value = rule.convert(value)
        except (TypeError, ValueError):
            return value, f"{f.name} must be {rule.expects}, got {value!r}"
    if not rule.test(value):
        return value, f"{f.name} must be {rule.expects}, got {value!r}"
    return value, None


class Config:
    """Base of an architecture's frozen config dataclass.

    Class attributes:
      model_type: the architecture's name in `recurrent_lm.core.registry`.
      presets: ``{name: {field: value}}``.
      aliases: other names `from_preset` accepts for fields (e.g. the
        ``vocab_size`` every other architecture uses).
    """

    model_type: ClassVar[str]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    aliases: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self):
        errors = []
        for f in dataclasses.fields(self):
            value, error = _check_field(f, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            if error:
                errors.append(error)
        if not errors:  # derived values and joint rules assume valid fields
            for name, value in self.derived().items():
                object.__setattr__(self, name, value)
            errors.extend(self.check())
        if errors:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(errors) + ".")

    def derived(self) -> dict[str, Any]:
        """Values of fields left to a default that depends on other fields (None)."""
        return {}

    def check(self) -> Iterable[str]:
        """Rules that tie several fields together: one message per broken rule."""
        return ()

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """The preset `name` with fields replaced (aliases accepted)."""
        if name not in cls.presets:
            raise ValueError(
                f"unknown {cls.__name__} preset {name!r}; presets: {sorted(cls.presets)}."
            )
        for alias, target in cls.aliases.items():
            if alias in overrides:
                if target in overrides:
                    raise ValueError(f"give {alias} or {target}, not both.")
                overrides[target] = overrides.pop(alias)
        return cls(**{**cls.presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}.")
        return cls(**values)
