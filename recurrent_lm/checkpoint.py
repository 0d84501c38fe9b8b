"""Our own on-disk format: `save(model, path)` / `load(path)`.

A directory holding ``recurrent_lm.json`` (format version, architecture, config,
and each parameter's named axes), ``params/``, an orbax checkpoint of
``{label: array}``, and ``recurrent_lm_checksums.json``, the size and CRC32C
of every file (`recurrent_lm.integrity`). `save` writes a temporary sibling
and renames it when complete; `load` checks every checksum first, so a
damaged or half-written directory is an error, never wrong weights. Loading
builds the architecture's skeleton from the config and binds the arrays by
label, so any mismatch is reported by label.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
from penzai import pz

from recurrent_lm import integrity
from recurrent_lm.core import registry, stack
from recurrent_lm.params import abstract_parameters, bind_parameters, parameter_values

FORMAT_VERSION = 1
METADATA_FILE = "recurrent_lm.json"
PARAMS_DIR = "params"
_WRITE_AGAIN = (
    "It cannot be loaded safely: save or convert the model again, or copy it again"
    " from an intact source."
)


def save(
    model, path: str | os.PathLike, *, extra_files: Mapping[str, str] | None = None
) -> None:
    """Writes `model` (any registered architecture) to the new directory `path`.

    Args:
      model: the model; a scanned one (`recurrent_lm.scan_layers`) is saved
        with per-layer labels, as its unrolled form (`load` gives that).
      path: a directory that does not exist yet; it appears complete or not at all.
      extra_files: ``{name: source file}`` copied into the directory (e.g. the
        tokenizer) and covered by its checksums.
    """
    import orbax.checkpoint as ocp

    architecture = registry.of_config(model.config)
    values = parameter_values(stack.unscan_layers(model))
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_type": architecture.name,
        "config": model.config.to_dict(),
        "parameters": {
            label: {"axes": list(v.named_shape), "shape": list(v.named_shape.values()),
                    "dtype": str(v.dtype)}
            for label, v in values.items()
        },
    }
    arrays = {label: v.unwrap(*v.named_shape) for label, v in values.items()}
    with integrity.atomic_directory(os.fspath(path)) as partial:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(partial, PARAMS_DIR), arrays)
        if jax.process_index() == 0:
            with open(os.path.join(partial, METADATA_FILE), "w") as f:
                json.dump(metadata, f, indent=1)
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, os.path.join(partial, name))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    file = os.path.join(os.fspath(path), METADATA_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"{file} not found: {path} is not a recurrent_lm checkpoint (for an official"
            " checkpoint use checkpoints_conversion)."
        )
    try:
        with open(file) as f:
            metadata = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise integrity.CorruptCheckpointError(
            f"{file} is corrupt ({e}). {_WRITE_AGAIN}"
        ) from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file} has format_version {metadata.get('format_version')!r}; this"
            f" recurrent_lm reads version {FORMAT_VERSION}; load it with the recurrent_lm"
            " that wrote it, or convert the source checkpoint again with this one."
        )
    return metadata


def load(
    path: str | os.PathLike,
    *,
    sharding: jax.sharding.Sharding | Callable[[tuple, tuple], jax.sharding.Sharding] | None = None,
    **config_overrides,
):
    """Reads a directory written by `save`.

    Args:
      path: the directory.
      sharding: where to place the arrays (default: first local device); a
        function ``(axis_names, shape) -> Sharding`` places each parameter by
        its named axes (see `recurrent_lm.train.sharding.load_sharded`).
      **config_overrides: fields of the saved config to replace (e.g. the
        build option ``scan_method``).

    Raises:
      CorruptCheckpointError: a file is damaged or missing, or the directory was
        not completely written (the message names it).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    metadata = read_metadata(path)
    # Every file against its checksum before reading any array: a damaged or
    # half-written directory is an error here, never wrong weights.
    integrity.verify(path, fix=_WRITE_AGAIN)
    architecture = registry.get(metadata["model_type"])
    config = architecture.config_class.from_dict({**metadata["config"], **config_overrides})
    build = lambda key: architecture.build_model(config, key)
    expected = abstract_parameters(build)
    stored = metadata["parameters"]
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    place = sharding if callable(sharding) else (lambda names, shape: sharding)
    target = {
        label: jax.ShapeDtypeStruct(
            tuple(info["shape"]), info["dtype"],
            sharding=place(tuple(info["axes"]), tuple(info["shape"])),
        )
        for label, info in stored.items()
    }
    with ocp.StandardCheckpointer() as checkpointer:
        arrays = checkpointer.restore(os.path.join(path, PARAMS_DIR), target)
    values = {
        label: pz.nx.wrap(arrays[label]).tag(*info["axes"]) for label, info in stored.items()
    }
    return bind_parameters(build(None), values, expected, source=f"checkpoint {path}")
