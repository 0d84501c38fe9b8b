"""Architectures by name, imported on first use.

``recurrent_lm.load(path)`` and ``--model NAME`` find an architecture by the
name saved with the model. The table maps names to module paths, so importing
recurrent_lm imports no architecture; each architecture module defines an
``ARCHITECTURE`` constant (its name, config class and ``build_model``), read
when the name is first asked for. Add your own with `register`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from recurrent_lm.core.config import Config

_MODULES: dict[str, str] = {
    "gemma": "recurrent_lm.models.gemma",
    "griffin": "recurrent_lm.models.griffin",
    "h3": "recurrent_lm.models.h3",
    "mamba": "recurrent_lm.models.mamba",
    "mamba2": "recurrent_lm.models.mamba2",
    "rwkv": "recurrent_lm.models.rwkv",
    "rwkv7": "recurrent_lm.models.rwkv7",
}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the house needs to know of an architecture.

    Attributes:
      name: the registry name (saved with models, the training CLI's --model).
      config_class: its config dataclass (a `recurrent_lm.core.config.Config`
        whose ``model_type`` is `name`).
      build_model: ``build_model(config, key) -> DecoderLM``.
      default_scan_method: ``default_scan_method(backend) -> str``, the scan
        form its recurrent layers use on a backend when the config's
        ``scan_method`` is None (resolved when traced, for the backend of the
        process); None where the config has no ``scan_method``. Compiling for
        a device this process lacks (`recurrent_lm.train.compile_only`) sets
        the target's form explicitly.
    """

    name: str
    config_class: type
    build_model: Callable[..., Any]
    default_scan_method: Callable[[str], str] | None = None


def register(name: str, module_path: str) -> None:
    """Makes the architecture defined in `module_path` (its ``ARCHITECTURE``)
    reachable as `name`; the module is imported on first use."""
    if name in _MODULES and _MODULES[name] != module_path:
        raise ValueError(f"architecture {name!r} is already registered as {_MODULES[name]!r}.")
    _MODULES[name] = module_path


def names() -> list[str]:
    return sorted(_MODULES)


def get(name: str) -> Architecture:
    """The architecture called `name` (imports its module)."""
    if name not in _MODULES:
        raise ValueError(f"unknown architecture {name!r}; known: {names()}.")
    module = importlib.import_module(_MODULES[name])
    architecture = getattr(module, "ARCHITECTURE", None)
    if not isinstance(architecture, Architecture) or architecture.name != name:
        raise TypeError(
            f"module {_MODULES[name]} must define ARCHITECTURE = Architecture({name!r}, ...)."
        )
    return architecture


def of_config(config) -> Architecture:
    """The architecture a config instance belongs to (by its ``model_type``)."""
    if not isinstance(config, Config):
        raise TypeError(f"{type(config).__name__} is not an architecture config (a core.config.Config).")
    return get(config.model_type)
