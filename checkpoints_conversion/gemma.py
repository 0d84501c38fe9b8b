"""Official Gemma 1 / Gemma 2 (Flax / orbax) checkpoints <-> our Gemma.

The release is an orbax PyTree checkpoint whose keys are flat module paths
under a "transformer" root (``"transformer/layer_3/attn/q_einsum": {"w":
...}``); the official package nests them (``{"transformer": {"layer_3":
...}}``). Both forms load, with or without a ``{"params": ...}`` wrapper.

Leaves (D width, F one MLP branch, H query heads, KV key/value heads, hd head
width): ``embedder/input_embedding`` [V, D]; ``final_norm/scale`` [D]; per
layer ``pre_attention_norm``, ``pre_ffw_norm`` (and in Gemma 2
``post_attention_norm``, ``post_ffw_norm``) ``/scale`` [D] (zero-centred, as we
store them); ``mlp/gating_einsum/w`` [2, D, F] (gate, up; the 9B/27B Gemma 2
releases store [2, F, D]); ``mlp/linear/w`` [F, D]; ``attn/qkv_einsum/w``
[3, H, D, hd] when KV == H, else ``attn/q_einsum/w`` [H, D, hd] and
``attn/kv_einsum/w`` [2, KV, D, hd]; ``attn/attn_vec_einsum/w`` [H, hd, D].

The config is inferred from the shapes (vocabulary, widths, heads, layers,
post norms); what shapes cannot give (soft caps, sliding window, query
scaling) comes from the released preset with the same shapes, else from the
Gemma 1 / Gemma 2 defaults (post norms present = Gemma 2), and can be
overridden with keyword arguments.

KerasHub presets (`load_keras_preset` / `save_keras_preset`): a directory
with ``config.json`` (``GemmaBackbone`` and its arguments, which are our config
fields) and ``model.weights.h5`` (Keras 3 layout, read with h5py only: no
Keras or TensorFlow at load time). Arrays sit under ``layers/<layer>/.../vars/0``
with layers named by class, not index: ``reversible_embedding`` [V, D],
``rms_normalization`` (final norm) [D], ``gemma_decoder_block``,
``gemma_decoder_block_1``, ... each with ``attention/{query,key,value}_dense``
[H|KV, D, hd], ``attention/output_dense`` [H, hd, D], ``gating_ffw`` (gate)
and ``gating_ffw_2`` (up) [D, F], ``ffw_linear`` [F, D] and the norms [D]
(zero-centred, as ours). Query scaling follows the config's
``query_head_dim_normalize`` (the official model and HF); KerasHub 0.32's
decoder block ignores it (always ``head_dim ** -0.5``): pass
``query_head_dim_normalize=True`` to reproduce KerasHub's own numbers.

CLI::

    python -m checkpoints_conversion.gemma convert SRC DST [--sliding-window-size N ...]
    # SRC: an official orbax checkpoint directory or a KerasHub preset directory
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_conversion import common
from checkpoints_conversion.common import LeafLayout, flatten, unflatten
from recurrent_lm import axes
from recurrent_lm.core.config import PARAM_DTYPES
from recurrent_lm.models import gemma
from recurrent_lm.params import CheckpointMismatchError

E, V, M = axes.EMBEDDING, axes.VOCABULARY, axes.MLP
H, KV, P = axes.HEADS, axes.KV_HEADS, axes.PROJECTION
ROOT = "transformer"
SOURCE = "Gemma checkpoint"
_LAYER = re.compile(r"^layer_(\d+)/")
# Config fields the shapes determine; the rest come from presets/defaults.
_SHAPE_FIELDS = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
                 "hidden_dim", "intermediate_dim", "head_dim", "use_post_ffw_norm",
                 "use_post_attention_norm")


@dataclasses.dataclass(frozen=True)
class _QKVLayout(LeafLayout):
    """``qkv_einsum`` [3, H, D, hd]: one dims tuple for the three slices, with
    "kv_heads" (== "heads" in size here) on the key and value slices."""

    def to_named(self, array, named_shape):
        values = super().to_named(array, named_shape)
        return {
            label: value if label == self.labels[0] else value.untag(H).tag(KV)
            for label, value in values.items()
        }

    def from_named(self, values):
        renamed = {
            label: values[label] if label == self.labels[0] else values[label].untag(KV).tag(H)
            for label in self.labels
        }
        return super().from_named(renamed)


def leaf_layouts(
    config: gemma.GemmaConfig, *, qkv_einsum: bool | None = None, gating_transposed: bool = False
) -> list[LeafLayout]:
    """Every leaf of the official tree (without the "transformer" root).

    Args:
      config: the model's config.
      qkv_einsum: one fused ``qkv_einsum`` leaf per layer (None: the official
        convention, fused iff num_key_value_heads == num_query_heads).
      gating_transposed: ``gating_einsum`` stored [2, F, D] (Gemma 2 9B/27B).
    """
    if qkv_einsum is None:
        qkv_einsum = config.num_key_value_heads == config.num_query_heads
    if qkv_einsum and config.num_key_value_heads != config.num_query_heads:
        raise ValueError(
            f"a fused qkv_einsum needs num_key_value_heads == num_query_heads, got"
            f" {config.num_key_value_heads} and {config.num_query_heads}."
        )
    layouts = [
        LeafLayout("embedder/input_embedding", ("embedder.embeddings",), (V, E)),
        LeafLayout("final_norm/scale", ("final_norm.scale",), (E,)),
    ]
    for i in range(config.num_layers):
        name = f"layer_{i}"
        labels = lambda *parts, name=name: tuple(f"{name}.{p}" for p in parts)
        norms = ["pre_attention_norm", "pre_ffw_norm"]
        if config.use_post_attention_norm:
            norms.append("post_attention_norm")
        if config.use_post_ffw_norm:
            norms.append("post_ffw_norm")
        layouts += [LeafLayout(f"{name}/{n}/scale", labels(f"{n}.scale"), (E,)) for n in norms]
        layouts += [
            LeafLayout(f"{name}/mlp/gating_einsum/w", labels("mlp.gate.weights", "mlp.up.weights"),
                       (M, E) if gating_transposed else (E, M)),
            LeafLayout(f"{name}/mlp/linear/w", labels("mlp.down.weights"), (M, E)),
            LeafLayout(f"{name}/attn/attn_vec_einsum/w", labels("attn.output.weights"), (H, P, E)),
        ]
        if qkv_einsum:
            layouts.append(_QKVLayout(
                f"{name}/attn/qkv_einsum/w",
                labels("attn.query.weights", "attn.key.weights", "attn.value.weights"), (H, E, P),
            ))
        else:
            layouts += [
                LeafLayout(f"{name}/attn/q_einsum/w", labels("attn.query.weights"), (H, E, P)),
                LeafLayout(f"{name}/attn/kv_einsum/w", labels("attn.key.weights", "attn.value.weights"),
                           (KV, E, P)),
            ]
    return layouts


def flat_leaves(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"layer_0/attn/q_einsum/w": leaf, ...}`` from any accepted form of the
    official tree (flat-key or nested, under "transformer", optionally under
    "params")."""
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        params = params["params"]
    flat = flatten(params)
    prefix = ROOT + "/"
    if not flat or not all(path.startswith(prefix) for path in flat):
        roots = sorted({path.split("/", 1)[0] for path in flat})
        raise CheckpointMismatchError(
            SOURCE,
            missing={f"{ROOT}/embedder/input_embedding": "(V, D)"},
            hint=f"(the official tree has every leaf under {ROOT!r}; found roots {roots})",
        )
    return {path[len(prefix):]: leaf for path, leaf in flat.items()}


def _shape(leaf) -> tuple[int, ...]:
    # Arrays, or shape-only leaves (jax.ShapeDtypeStruct, orbax metadata).
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def infer_config(params: Mapping[str, Any], **overrides) -> gemma.GemmaConfig:
    """A `GemmaConfig` from the shapes of an official tree, plus `overrides`."""
    flat = flat_leaves(params)
    shape = lambda path: _shape(flat[path])
    need = ["embedder/input_embedding", "layer_0/attn/attn_vec_einsum/w", "layer_0/mlp/linear/w"]
    common.require_leaves(flat, need, source=SOURCE, prefix=f"{ROOT}/")
    ranks = {"embedder/input_embedding": ("(V, D)", 2), "layer_0/attn/attn_vec_einsum/w": ("(H, hd, D)", 3),
             "layer_0/mlp/linear/w": ("(F, D)", 2), "layer_0/attn/kv_einsum/w": ("(2, KV, D, hd)", 4)}
    wrong_rank = {f"{ROOT}/{p}": (form, shape(p)) for p, (form, rank) in ranks.items()
                  if p in flat and len(shape(p)) != rank}
    if wrong_rank:
        raise CheckpointMismatchError(
            SOURCE, misshaped=wrong_rank, hint="(cannot infer the config from these leaves)"
        )
    inferred: dict[str, Any] = {}
    inferred["vocabulary_size"], inferred["hidden_dim"] = shape("embedder/input_embedding")
    inferred["num_query_heads"], inferred["head_dim"], _ = shape("layer_0/attn/attn_vec_einsum/w")
    inferred["intermediate_dim"] = 2 * shape("layer_0/mlp/linear/w")[0]
    inferred["num_layers"] = common.count_numbered(flat, _LAYER, "layers")
    if "layer_0/attn/kv_einsum/w" in flat:
        inferred["num_key_value_heads"] = shape("layer_0/attn/kv_einsum/w")[1]
    else:  # fused qkv_einsum: multi-head
        inferred["num_key_value_heads"] = inferred["num_query_heads"]
    inferred["use_post_attention_norm"] = "layer_0/post_attention_norm/scale" in flat
    inferred["use_post_ffw_norm"] = "layer_0/post_ffw_norm/scale" in flat
    inferred["param_dtype"] = jnp.dtype(flat["embedder/input_embedding"].dtype).name
    # Fields shapes cannot give: from the release with these shapes, else the
    # defaults of the generation (post norms = Gemma 2).
    preset = next(
        (p for p in gemma.PRESETS.values()
         if all(getattr(p, f) == inferred[f] for f in _SHAPE_FIELDS)),
        None,
    )
    if preset is None:
        preset = gemma.PRESETS["gemma2-2b" if inferred["use_post_ffw_norm"] else "gemma-2b"]
    return dataclasses.replace(preset, **{**inferred, **overrides})


def _gating_transposed(flat, config: gemma.GemmaConfig, requested: bool | None) -> bool:
    if requested is not None:
        return requested
    gating = flat.get("layer_0/mlp/gating_einsum/w")
    transposed = (2, config.mlp_width, config.hidden_dim)
    # A square MLP cannot tell: the standard layout unless asked.
    return gating is not None and _shape(gating) == transposed and (
        config.mlp_width != config.hidden_dim
    )


def from_official_params(
    params: Mapping[str, Any],
    *,
    gating_transposed: bool | None = None,
    **config_overrides,
):
    """An official Gemma parameter tree -> our Gemma (`DecoderLM`).

    Args:
      params: the official tree (see the module docstring), leaves array-like.
      gating_transposed: ``gating_einsum`` is [2, F, D]; None infers it from
        the shapes (the standard [2, D, F] when D == F).
      **config_overrides: `GemmaConfig` fields, e.g. ``sliding_window_size``,
        ``param_dtype`` (leaves are cast to it) or
        ``upcast_activations_to_float32`` (keep the checkpoint's parameter
        dtype, run activations in float32, as penzai's option of that name).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        leaf, with expected and found shapes.
    """
    config = infer_config(params, **config_overrides)
    flat = flat_leaves(params)
    layouts = leaf_layouts(
        config,
        qkv_einsum="layer_0/attn/qkv_einsum/w" in flat,
        gating_transposed=_gating_transposed(flat, config, gating_transposed),
    )
    rooted = {f"{ROOT}/{path}": leaf for path, leaf in flat.items()}
    return common.load_model(rooted, _under_root(layouts), config, gemma.build_model, source=SOURCE)


def _under_root(layouts: Sequence[LeafLayout]) -> list[LeafLayout]:
    return [dataclasses.replace(layout, path=f"{ROOT}/{layout.path}") for layout in layouts]


def to_official_params(
    model, *, flat_keys: bool = False, gating_transposed: bool = False
) -> dict[str, Any]:
    """Our Gemma -> the official tree (the exact inverse of loading).

    Args:
      model: a Gemma `DecoderLM`.
      flat_keys: the release's flat-key form (``{"transformer/layer_0/attn/
        q_einsum": {"w": ...}}``) instead of the nested one.
      gating_transposed: write ``gating_einsum`` as [2, F, D] (as the Gemma 2
        9B/27B releases do).
    """
    config = common.config_of(model, gemma.GemmaConfig, "a Gemma model")
    layouts = leaf_layouts(config, gating_transposed=gating_transposed)
    flat = common.export_leaves(model, _under_root(layouts))
    if not flat_keys:
        return unflatten(flat)
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in flat.items():
        module, name = path.rsplit("/", 1)
        modules.setdefault(module, {})[name] = leaf
    return modules


def load_official_checkpoint(
    path: str,
    *,
    gating_transposed: bool | None = None,
    sharding: jax.sharding.Sharding | None = None,
    **config_overrides,
):
    """Loads an official Gemma orbax checkpoint directory.

    Args:
      path: the checkpoint directory (e.g. ``.../gemma2-2b/gemma2-2b``).
      gating_transposed, **config_overrides: see `from_official_params`.
      sharding: where to place the restored leaves (default: first local device).
    """
    return from_official_params(
        common.restore_orbax_tree(str(path), sharding),
        gating_transposed=gating_transposed,
        **config_overrides,
    )


# ---------------------------------------------------------------------------
# KerasHub presets.
# ---------------------------------------------------------------------------

KERAS_SOURCE = "KerasHub Gemma preset"
KERAS_CONFIG, KERAS_WEIGHTS = "config.json", "model.weights.h5"
_KERAS_CLASS = "GemmaBackbone"
# GemmaConfig fields that are GemmaBackbone arguments (all but our own options).
_KERAS_FIELDS = _SHAPE_FIELDS + (
    "query_head_dim_normalize", "attention_logit_soft_cap", "final_logit_soft_cap",
    "use_sliding_window_attention", "sliding_window_size", "layer_norm_epsilon", "dropout",
)
# Keras' layer names inside a decoder block (the "name" attribute of each vars group).
_KERAS_LAYER_NAMES = {
    "attention/query_dense": "query", "attention/key_dense": "key",
    "attention/value_dense": "value", "attention/output_dense": "attention_output",
    "gating_ffw": "ffw_gating", "gating_ffw_2": "ffw_gating_2", "ffw_linear": "ffw_linear",
}


def _keras_block(i: int) -> str:
    return "layers/gemma_decoder_block" + (f"_{i}" if i else "")


def keras_leaf_layouts(config: gemma.GemmaConfig) -> list[LeafLayout]:
    """Every array of a KerasHub ``model.weights.h5`` for `config`, by h5 path."""
    layouts = [
        LeafLayout("layers/reversible_embedding/vars/0", ("embedder.embeddings",), (V, E)),
        LeafLayout("layers/rms_normalization/vars/0", ("final_norm.scale",), (E,)),
    ]
    for i in range(config.num_layers):
        block, name = _keras_block(i), f"layer_{i}"
        leaf = lambda path, label, dims, block=block, name=name: layouts.append(
            LeafLayout(f"{block}/{path}/vars/0", (f"{name}.{label}",), dims))
        norms = ["pre_attention_norm", "pre_ffw_norm"]
        norms += ["post_attention_norm"] * config.use_post_attention_norm
        norms += ["post_ffw_norm"] * config.use_post_ffw_norm
        for norm in norms:
            leaf(norm, f"{norm}.scale", (E,))
        leaf("attention/query_dense", "attn.query.weights", (H, E, P))
        leaf("attention/key_dense", "attn.key.weights", (KV, E, P))
        leaf("attention/value_dense", "attn.value.weights", (KV, E, P))
        leaf("attention/output_dense", "attn.output.weights", (H, P, E))
        leaf("gating_ffw", "mlp.gate.weights", (E, M))
        leaf("gating_ffw_2", "mlp.up.weights", (E, M))
        leaf("ffw_linear", "mlp.down.weights", (M, E))
    return layouts


def read_keras_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{h5 path: array}`` of every dataset in a Keras 3 ``.weights.h5`` (h5py only)."""
    import h5py

    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            arrays[name] = item[()]

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 weights file: {e}") from e
    return arrays


def _read_keras_config(directory: str) -> dict[str, Any]:
    config_file = os.path.join(directory, KERAS_CONFIG)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: not a KerasHub preset directory.")
    with open(config_file) as f:
        values = json.load(f)
    class_name = values.get("class_name") if isinstance(values, dict) else None
    if class_name != _KERAS_CLASS or not isinstance(values.get("config"), dict):
        raise ValueError(
            f"{config_file} describes {class_name!r}, not a KerasHub {_KERAS_CLASS}."
        )
    return values["config"]


def is_keras_preset(path: str | os.PathLike) -> bool:
    """A directory holding KerasHub's ``config.json`` and ``model.weights.h5``."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, KERAS_CONFIG)) and os.path.isfile(
        os.path.join(path, KERAS_WEIGHTS))


def load_keras_preset(path: str | os.PathLike, **config_overrides):
    """Loads a KerasHub ``GemmaBackbone`` preset directory (Gemma 1 or 2) with h5py.

    The config is the backbone's arguments from ``config.json``;
    ``param_dtype`` defaults to the stored embeddings' dtype. Any `GemmaConfig`
    field can be overridden (e.g. ``query_head_dim_normalize=True`` to match
    KerasHub 0.32's own forward for a 27B-style config, or
    ``upcast_activations_to_float32``).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        array (h5 path, expected and found shapes).
    """
    directory = os.fspath(path)
    keras_config = _read_keras_config(directory)
    weights = os.path.join(directory, KERAS_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} not found: the preset has no weights.")
    arrays = read_keras_weights(weights)
    fields = {k: keras_config[k] for k in _KERAS_FIELDS if k in keras_config}
    embedding = arrays.get("layers/reversible_embedding/vars/0")
    if "param_dtype" not in config_overrides and embedding is not None:
        config_overrides["param_dtype"] = jnp.dtype(embedding.dtype).name
    config = dataclasses.replace(gemma.GemmaConfig(), **{**fields, **config_overrides})
    return common.load_model(arrays, keras_leaf_layouts(config), config, gemma.build_model,
                             source=f"{KERAS_SOURCE} {directory}")


def to_keras_weights(model) -> dict[str, np.ndarray]:
    """Our Gemma -> ``{h5 path: array}`` of a KerasHub ``model.weights.h5``."""
    config = common.config_of(model, gemma.GemmaConfig, "a Gemma model")
    leaves = common.export_leaves(model, keras_leaf_layouts(config))
    return {path: np.asarray(leaf) for path, leaf in leaves.items()}


def save_keras_preset(model, path: str | os.PathLike) -> None:
    """Writes `model` as a KerasHub preset directory (``config.json``,
    ``metadata.json``, ``model.weights.h5``) that
    ``keras_hub.models.GemmaBackbone.from_preset(path)`` loads. Needs h5py only."""
    import h5py

    directory = os.fspath(path)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists; choose a new directory.")
    config = common.config_of(model, gemma.GemmaConfig, "a Gemma model")
    arrays = to_keras_weights(model)
    os.makedirs(directory)
    with h5py.File(os.path.join(directory, KERAS_WEIGHTS), "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)
        for name in arrays:  # Keras names each vars group after its layer
            group = name.removesuffix("/vars/0")
            layer = group.rsplit("/", 1)[-1]
            for path, keras_name in _KERAS_LAYER_NAMES.items():
                if group.endswith("/" + path):
                    layer = keras_name
            f[group + "/vars"].attrs["name"] = layer
    backbone = {
        "name": "gemma_backbone",
        "trainable": True,
        "dtype": {"module": "keras", "class_name": "DTypePolicy",
                  "config": {"name": config.param_dtype}, "registered_name": None},
        **{k: getattr(config, k) for k in _KERAS_FIELDS if k not in (
            "use_post_ffw_norm", "use_post_attention_norm")},
        "use_post_ffw_norm": config.use_post_ffw_norm,
        "use_post_attention_norm": config.use_post_attention_norm,
    }
    with open(os.path.join(directory, KERAS_CONFIG), "w") as f:
        json.dump({"module": "keras_hub.src.models.gemma.gemma_backbone",
                   "class_name": _KERAS_CLASS, "config": backbone,
                   "registered_name": f"keras_hub>{_KERAS_CLASS}"}, f, indent=4)
    parameters = int(sum(a.size for a in arrays.values()))
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump({"keras_version": "3.15.1", "keras_hub_version": "0.32.0",
                   "parameter_count": parameters,
                   "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
                   "tasks": ["CausalLM"]}, f, indent=4)


def load_checkpoint(path: str | os.PathLike, **config_overrides):
    """A KerasHub preset directory or an official orbax checkpoint, told apart
    by the directory's contents."""
    if is_keras_preset(path):
        return load_keras_preset(path, **config_overrides)
    return load_official_checkpoint(os.fspath(path), **config_overrides)


def main(argv: list[str] | None = None) -> int:
    parser, convert = common.convert_parser(
        "gemma", __doc__, source="official orbax checkpoint directory or KerasHub preset directory"
    )
    common.add_config_flags(
        convert,
        gemma.GemmaConfig,
        ["sliding_window_size", "attention_logit_soft_cap", "final_logit_soft_cap"]
        + ["layer_norm_epsilon", "query_head_dim_normalize", "use_sliding_window_attention"]
        + ["param_dtype"],
        param_dtype=PARAM_DTYPES,
    )
    return common.run_convert(parser, argv, load_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
