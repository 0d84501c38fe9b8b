"""The base of architecture configs: dict I/O for `recurrent_lm.save` / `load`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class Config:
    """Base of an architecture's frozen config dataclass.

    ``model_type`` names the architecture in `recurrent_lm.core.registry`;
    ``to_dict`` / ``from_dict`` are what `recurrent_lm.save` writes as JSON
    (unknown fields are refused by name).
    """

    model_type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}.")
        return cls(**values)
