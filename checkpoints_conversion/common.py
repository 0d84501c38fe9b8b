"""What every official-format converter shares.

A converter is a config and a list of `LeafLayout`s. Each layout describes one
official leaf once: its path, the named axes its positional dimensions carry
(merged axes as tuples, singleton dimensions as the int 1), and which of our
parameter labels it holds (several when the leaf stacks them along its first
dimension). From that description come the expected official shapes, the
conversion in both directions (reshape + tag, or unwrap + reshape; bit-exact)
and one error listing every missing, unexpected or mis-shaped leaf:

    model = load_model(leaves, leaf_layouts(config), config, family.build_model, source=...)
    leaves = export_leaves(model, leaf_layouts(config_of(model, ...)))   # the exact inverse

Also here: the readers (`read_weights`: safetensors, sharded safetensors, torch
pickles; `restore_orbax_tree`), the writer (`write_weights`), the checks config
inference makes (`require_leaves`, `count_numbered`) and the ``convert``
command line (`convert_parser`, `add_config_flags`, `run_convert`).
Converters depend on `recurrent_lm`, never the reverse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm.params import (
    CheckpointMismatchError,
    abstract_parameters,
    bind_parameters,
    parameter_values,
)
from recurrent_lm.user_errors import reports_user_errors

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
            # Reshaped before it becomes a jax array: a numpy view, not a copy.
            label: pz.nx.wrap(jnp.asarray(part.reshape(unmerged))).tag(*self.axis_names)
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
    misshaped: Mapping[str, tuple[Any, Any]] | None = None,
) -> None:
    """Raises one `CheckpointMismatchError` for every leaf problem in `found`,
    with the converter's own findings `misshaped` (``{path: (expected, found)}``)."""
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
            **{
                p: (expected[p], s)
                for p, s in found_shapes.items()
                if p in expected and expected[p] != s
            },
            **(misshaped or {}),
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
        leaf = found[layout.path]
        # A lazy leaf is read once into numpy (which jax on CPU then aliases):
        # `jnp.asarray` of it would hold the read and a copy at once.
        array = leaf if isinstance(leaf, (np.ndarray, jax.Array)) else np.asarray(leaf)
        if array.dtype != dtype:
            array = array.astype(dtype)
        # Each leaf in its final axis order now, while its source is the only other
        # copy: binding would otherwise transpose every value with all of them alive
        # (two full copies of the model at the peak).
        for label, value in layout.to_named(array, named_shape).items():
            values[label] = value.order_as(*expected_named[label].named_shape)
        del array
    return values


# ---------------------------------------------------------------------------
# The pipeline: official leaves <-> our model.
# ---------------------------------------------------------------------------


def load_model(
    leaves: Mapping[str, Any],
    layouts: Sequence[LeafLayout],
    config,
    build_model: Callable[..., Any],
    *,
    source: str,
    misshaped: Mapping[str, tuple[Any, Any]] | None = None,
):
    """Official leaves -> ``build_model(config, key)`` holding them.

    The one path every converter loads through: the parameters' labels and
    named shapes come from building the model without running an initialiser
    (`abstract_parameters`); `layouts` map the leaves to those labels; every
    problem is reported in one error; leaves are cast to ``config.param_dtype``
    and bound to a skeleton (``build_model(config, None)``).

    Args:
      leaves: ``{official path: array-like}`` (torch tensors too).
      layouts: every leaf the format has for `config`.
      config: the model's config.
      build_model: ``(config, key) -> model``; with ``key=None``, a skeleton.
      source: how to name the checkpoint in errors.
      misshaped: problems the converter found itself, reported with the rest.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        leaf, with expected and found shapes.
    """
    leaves = {path: to_numpy(leaf) for path, leaf in leaves.items()}
    build = lambda key: build_model(config, key)
    expected = abstract_parameters(build)
    check_leaves(
        leaves, layouts, expected, source=source, hint=f"(config: {config})", misshaped=misshaped
    )
    values = convert_leaves(leaves, layouts, expected, jnp.dtype(config.param_dtype))
    return bind_parameters(build(None), values, expected, source=source)


def export_leaves(model, layouts: Sequence[LeafLayout]) -> dict[str, jax.Array]:
    """Our model -> ``{official path: array}``, the exact inverse of `load_model`."""
    values = parameter_values(model)
    return {layout.path: layout.from_named(values) for layout in layouts}


def config_of(model, config_type: type, family: str):
    """``model.config``, after checking that `model` is of the `family` (e.g.
    "a Gemma model") a converter exports."""
    config = getattr(model, "config", None)
    if not isinstance(config, config_type):
        raise TypeError(f"expected {family}, got one with {type(config).__name__}.")
    return config


# ---------------------------------------------------------------------------
# What config inference checks.
# ---------------------------------------------------------------------------


def require_leaves(
    leaves: Mapping[str, Any], paths: Iterable[str], *, source: str, prefix: str = ""
) -> None:
    """Raises one `CheckpointMismatchError` naming every path of `paths` that
    `leaves` lacks (shown with `prefix`): the config is inferred from them."""
    absent = [path for path in paths if path not in leaves]
    if absent:
        raise CheckpointMismatchError(
            source,
            missing={prefix + path: "?" for path in absent},
            hint="(cannot infer the config without these leaves)",
        )


def count_numbered(names: Iterable[str], pattern: re.Pattern, what: str) -> int:
    """How many `what` ("blocks", "layers") the names hold, numbered by the
    first group of `pattern`; raises ValueError unless they are 0..n-1."""
    indices = sorted({int(m.group(1)) for name in names if (m := pattern.match(name))})
    if indices != list(range(len(indices))):
        raise ValueError(f"checkpoint {what} are not numbered 0..n-1: found {what} {indices}.")
    return len(indices)


# ---------------------------------------------------------------------------
# Readers and the writer.
# ---------------------------------------------------------------------------

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")
_TORCH_HINT = (
    "install the CPU build with `pip install torch==2.13.0 --index-url"
    " https://download.pytorch.org/whl/cpu`, or convert the file to .safetensors elsewhere."
)


def to_numpy(value):
    """A torch tensor -> a numpy array (bfloat16 kept, as ml_dtypes'); anything
    else as it is."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy itself has no bfloat16
            return np.asarray(value.float().numpy(), jnp.bfloat16)
        return value.numpy()
    return value


def _import_torch(path: str):
    try:
        import torch  # only for pickled files: torch is an optional dependency
    except ImportError:
        raise ImportError(f"{path}: pickled PyTorch files need torch; {_TORCH_HINT}") from None
    return torch


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file, or of every shard a sharded
    checkpoint's ``model.safetensors.index.json`` names, as numpy arrays."""
    from safetensors.numpy import load_file  # bfloat16 as ml_dtypes'

    if not path.endswith(".json"):
        return dict(load_file(path))
    with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        state.update(load_file(os.path.join(os.path.dirname(path), shard)))
    return state


def read_torch(path: str, *, weights_only: bool = True) -> dict[str, Any]:
    """The dict a ``torch.save`` file holds, its tensors as numpy arrays.

    torch is imported here, only when such a file is read. `weights_only` is
    torch's safe unpickling; False (files you trust only) also reads files
    holding other Python objects (Lightning checkpoints' hyper-parameters).
    """
    torch = _import_torch(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises UnpicklingError for non-weights objects
        if weights_only and "weights_only" in str(e):
            raise ValueError(
                f"{path} holds Python objects besides tensors (e.g. a Lightning checkpoint's"
                " hyper-parameters): if you trust the file, pass weights_only=False"
                " (unpickling can run arbitrary code)."
            ) from e
        raise
    if not isinstance(state, Mapping):
        # The file is a bad value (a user error), not the caller's bad argument.
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")  # noqa: TRY004
    return {name: to_numpy(value) for name, value in state.items()}


def read_weights(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, Any]:
    """A weights file by its name: safetensors (`read_safetensors`, a sharded
    index too) or a torch pickle (`read_torch`, one of `TORCH_SUFFIXES`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    if path.endswith(SAFETENSORS_SUFFIXES):
        return read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return read_torch(path, weights_only=weights_only)
    raise ValueError(
        f"{path}: unknown weights format; expected one of {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}."
    )


def weight_names(path: str | os.PathLike) -> set[str] | None:
    """The tensor names of a weights file (a Lightning ``state_dict`` unwrapped),
    read without loading the tensors (safetensors header; torch's mmap), or None
    when `path` is no readable safetensors / torch weights file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        if path.endswith(".safetensors"):
            return set(open_safetensors(path))
        if not path.endswith(TORCH_SUFFIXES):
            return None
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- unreadable: not this kind of file
        return None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return set(state) if isinstance(state, Mapping) else None


def write_weights(
    state: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``{name: array}`` as ``.safetensors`` (with `metadata`) or as a
    torch pickle (a `TORCH_SUFFIXES` name; needs torch), dtypes kept."""
    path = os.fspath(path)
    arrays = {name: np.ascontiguousarray(value) for name, value in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, path, metadata=dict(metadata) if metadata else None)
    elif path.endswith(TORCH_SUFFIXES):
        torch = _import_torch(path)

        def tensor(array):
            if array.dtype == jnp.bfloat16:  # torch cannot take ml_dtypes' bfloat16
                return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
            return torch.from_numpy(array.copy())

        torch.save({name: tensor(array) for name, array in arrays.items()}, path)
    else:
        raise ValueError(f"{path}: use a .safetensors name or one of {TORCH_SUFFIXES}.")


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


# ---------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------


def convert_parser(
    module: str, description: str, *, source: str
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``python -m checkpoints_conversion.<module> convert SRC DST`` command
    line every converter has: returns (parser, the ``convert`` sub-parser, to
    which the converter adds its format's flags; see `run_convert`).

    Args:
      module: the converter's module name.
      description: what ``--help`` shows first: the converter module's
        docstring (what it reads, how, the command line).
      source: what SRC is ("official orbax checkpoint directory").
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m checkpoints_conversion.{module}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help=f"{source} -> recurrent_lm.save directory")
    convert.add_argument("src", help=source)
    convert.add_argument("dst", help="output directory (must not exist)")
    return parser, convert


def boolean(text: str) -> bool:
    """The argparse type of a ``true`` / ``false`` flag."""
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text == "true"


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_type: type,
    fields: Iterable[str],
    **choices: Sequence[str],
) -> None:
    """One ``--field-name`` flag per config field of `fields`, typed as the
    field (``true`` / ``false`` for a bool), limited to ``choices[field]`` if
    given; unset, a flag is None, so the config keeps what the checkpoint says."""
    hints = typing.get_type_hints(config_type)
    for field in fields:
        # `float | None` -> float: None cannot be given on the command line.
        kind = next(k for k in typing.get_args(hints[field]) or [hints[field]] if k is not type(None))
        if kind is bool:
            kind, metavar = boolean, "{true,false}"
        else:
            metavar = None if field in choices else kind.__name__.upper()
        parser.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            choices=choices.get(field),
            metavar=metavar,
            help=f"{config_type.__name__}.{field} (default: from the checkpoint)",
        )


@reports_user_errors
def run_convert(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, load: Callable[..., Any]
) -> int:
    """Runs ``convert SRC DST``: the model ``load(SRC, **flags)`` gets, saved
    with `recurrent_lm.save` to DST.

    `flags` are the convert flags given on the command line, by their argparse
    ``dest``: flags default to None, and a flag left at None is not passed. A
    user error (missing SRC, existing DST, a checkpoint that does not match) is
    one ``error:`` line and exit status 2 (`recurrent_lm.user_errors`).
    """
    args = vars(parser.parse_args(argv))
    src, dst = args.pop("src"), args.pop("dst")
    flags = {name: value for name, value in args.items() if name != "command" and value is not None}
    if os.path.exists(dst):  # before the (long) load, not after it
        raise FileExistsError(f"{dst} already exists; choose a new directory.")
    model = load(src, **flags)

    import recurrent_lm.checkpoint  # converters depend on the package, not the reverse

    recurrent_lm.checkpoint.save(model, dst)
    print(f"converted {src} -> {dst}")
    print(f"config: {dataclasses.asdict(model.config)}")
    return 0


# ---------------------------------------------------------------------------
# HF model directories: config.json + (sharded) safetensors, read lazily.
# ---------------------------------------------------------------------------

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# safetensors dtype codes -> numpy dtypes (bfloat16 as ml_dtypes', via jnp).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_SAFETENSORS_CODES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


_ALIGN = 64  # bytes: the alignment XLA:CPU needs to use a host buffer in place


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """One tensor of a safetensors file, read only when converted to an array
    (``np.asarray`` / ``jnp.asarray``): ``shape`` and ``dtype`` cost nothing,
    so a whole checkpoint can be checked before any tensor is read, and a
    conversion holds one source tensor at a time."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __array__(self, dtype=None, copy=None):
        # Read into a 64-byte-aligned buffer: jax on CPU then adopts it without a
        # copy (an unaligned one, e.g. np.fromfile's, is copied: a transient second
        # copy of the largest tensor, half of a model with a large vocabulary).
        nbytes = self.size * self.dtype.itemsize
        raw = np.empty(nbytes + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        buffer = raw[start:start + nbytes]
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if f.readinto(memoryview(buffer)) != nbytes:
                raise ValueError(f"{self.path} is truncated; download it again.")
        array = buffer.view(self.dtype).reshape(self.shape)
        return array if dtype is None else array.astype(dtype)


def open_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """``{name: LazyTensor}`` of one ``.safetensors`` file, from its header.

    Raises ValueError naming the file when it is not safetensors, uses a dtype
    we do not read, or is shorter than its header says (a truncated download).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 0 or 8 + header_len > size:
            raise ValueError(
                f"{path} is truncated or not a safetensors file ({size} bytes, shorter than"
                " its header); download it again."
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise ValueError(f"{path}: unreadable safetensors header; download it again.") from None
    header.pop("__metadata__", None)
    start = 8 + header_len
    tensors, end = {}, start
    for name, info in header.items():
        code = info.get("dtype")
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {code}, which we do not read.")
        begin, stop = info["data_offsets"]
        tensors[name] = LazyTensor(
            path, start + begin, tuple(info["shape"]), np.dtype(_SAFETENSORS_DTYPES[code])
        )
        end = max(end, start + stop)
    if end > size:
        raise ValueError(
            f"{path} is truncated: its header needs {end} bytes, the file has {size};"
            " download it again."
        )
    return tensors


# transformers 5 writes the floats JSON lacks as {"__float__": "Infinity"}
# (4.x writes the bare ``Infinity`` Python's json reads).
_HF_FLOAT_TAG = "__float__"
_HF_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def decode_hf_floats(value):
    """`value` (config.json contents) with HF's tagged special floats as floats."""
    if isinstance(value, dict):
        if set(value) == {_HF_FLOAT_TAG} and value[_HF_FLOAT_TAG] in _HF_FLOATS:
            return _HF_FLOATS[value[_HF_FLOAT_TAG]]
        return {k: decode_hf_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_hf_floats(v) for v in value]
    return value


def read_hf_config(directory: str | os.PathLike, model_type: str | tuple[str, ...]) -> dict[str, Any]:
    """The ``config.json`` of an HF model directory, checked to be `model_type`
    (or one of several)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, HF_CONFIG)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory: not an HF checkpoint.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {HF_CONFIG}: not an HF checkpoint directory.")
    with open(path) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    config = decode_hf_floats(config)
    found = config.get("model_type") if isinstance(config, dict) else None
    accepted = (model_type,) if isinstance(model_type, str) else tuple(model_type)
    if found not in accepted:
        wanted = " or ".join(repr(t) for t in accepted)
        raise ValueError(
            f"{path} has model_type {found!r}, not {wanted}: use the converter of that"
            " model type."
        )
    return config


def is_hf_directory(path: str | os.PathLike, model_type: str | tuple[str, ...]) -> bool:
    """Whether `path` is a directory whose config.json says `model_type`."""
    try:
        read_hf_config(path, model_type)
    except (OSError, ValueError):
        return False
    return True


def read_hf_weights(directory: str | os.PathLike) -> dict[str, Any]:
    """``{name: LazyTensor}`` of an HF directory's ``model.safetensors`` or of
    every shard its ``model.safetensors.index.json`` names (a missing shard, or
    a tensor the index places in a shard that lacks it, is an error);
    ``pytorch_model.bin`` (read whole; needs torch) as a last resort."""
    directory = os.fspath(directory)
    single, index = os.path.join(directory, HF_WEIGHTS), os.path.join(directory, HF_INDEX)
    if os.path.isfile(single):
        return open_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors: dict[str, Any] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{shard_path}, named by {index}, does not exist.")
            tensors.update(open_safetensors(shard_path))
        absent = sorted(n for n, shard in weight_map.items() if n not in tensors)
        if absent:
            raise ValueError(f"{index} lists tensors no shard holds: {absent[:5]}.")
        return tensors
    legacy = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(legacy):
        return read_torch(legacy)
    raise FileNotFoundError(f"{directory} has no {HF_WEIGHTS}, {HF_INDEX} or pytorch_model.bin.")


def stored_dtype(value) -> str:
    """The dtype name of a stored tensor (LazyTensor, numpy array, torch tensor)."""
    return jnp.dtype(to_numpy(value).dtype).name


def _shards(sizes: Mapping[str, int], max_shard_bytes: int | None) -> list[list[str]]:
    """Names in order, cut greedily into shards of at most `max_shard_bytes`
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, size in sizes.items():
        if max_shard_bytes is not None and shards[-1] and total + size > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    return shards


def write_hf_directory(
    directory: str | os.PathLike,
    tensors: Mapping[str, Callable[[], Any]],
    config: Mapping[str, Any],
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes an HF model directory atomically (`integrity.atomic_directory`).

    Args:
      directory: the new directory (must not exist).
      tensors: ``{name: () -> jax array}``, called one shard at a time, so a
        shard's arrays are the only copies made.
      config: the ``config.json`` contents.
      max_shard_bytes: None writes one ``model.safetensors``; otherwise shards
        ``model-0000i-of-0000n.safetensors`` of at most that many bytes each
        (one larger tensor gets its own) and ``model.safetensors.index.json``.
    """
    from safetensors.numpy import save_file

    from recurrent_lm.integrity import atomic_directory

    sizes = {}
    for name, make in tensors.items():
        abstract = jax.eval_shape(make)  # traces, computes nothing
        sizes[name] = math.prod(abstract.shape) * np.dtype(abstract.dtype).itemsize
    shards = _shards(sizes, max_shard_bytes)
    with atomic_directory(os.fspath(directory)) as partial:
        weight_map = {}
        for i, names in enumerate(shards):
            file = HF_WEIGHTS if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            arrays = {name: np.ascontiguousarray(np.asarray(tensors[name]())) for name in names}
            for name, array in arrays.items():
                if array.dtype not in _SAFETENSORS_CODES:
                    raise ValueError(f"{name}: cannot store dtype {array.dtype} in safetensors.")
            save_file(arrays, os.path.join(partial, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            del arrays
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            with open(os.path.join(partial, HF_INDEX), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(partial, HF_CONFIG), "w") as f:
            json.dump(dict(config), f, indent=2)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str | None) -> int | None:
    """A shard size in bytes: an int, or HF's strings ("5GB", "200MB", "1GiB")."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"max shard size must be positive, got {size}.")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"cannot read the size {size!r}: use bytes or e.g. '5GB', '200MB'.")
    return parse_size(int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]))


def read_hf_checkpoint(directory: str, model_type: str | tuple[str, ...],
                       config_overrides: Mapping[str, Any], *,
                       embedding: str = "model.embed_tokens.weight"):
    """``(config.json values, lazy weights, overrides)`` of an HF directory, with
    ``param_dtype`` settled: HF's name ``dtype`` is accepted for it, and by
    default it is the stored dtype of `embedding` (bfloat16 stays bfloat16)."""
    overrides = dict(config_overrides)
    if "dtype" in overrides:  # HF's name for it
        dtype = overrides.pop("dtype")
        if overrides.setdefault("param_dtype", dtype) != dtype:
            raise ValueError(f"dtype {dtype!r} and param_dtype {overrides['param_dtype']!r} differ.")
    values = read_hf_config(directory, model_type)
    state = read_hf_weights(directory)
    if "param_dtype" not in overrides and embedding in state:
        overrides["param_dtype"] = stored_dtype(state[embedding])
    return values, state, overrides
