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

HF transformers (`load_hf_checkpoint` / `save_hf_checkpoint`): ``config.json``
(model_type ``gemma`` -> ``GemmaForCausalLM``, ``gemma2`` ->
``Gemma2ForCausalLM``) + ``model.safetensors`` or a sharded index, read
lazily. Names ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,
down}_proj`` ([out, in]: q_proj [H*hd, D], o_proj [D, H*hd]; HF's
``intermediate_size`` is one branch), norms zero-centred (``1 + w``) as ours:
Gemma 1 ``input_layernorm`` / ``post_attention_layernorm`` (the pre-MLP norm!),
Gemma 2 ``input_layernorm``, ``post_attention_layernorm``,
``pre_feedforward_layernorm``, ``post_feedforward_layernorm``; the head tied
(no ``lm_head.weight``). HF's ``sliding_window`` W masks ``k > q - W`` (W keys
including the current one), which is our ``sliding_window_size`` unchanged;
its embedding scale is ``sqrt(hidden)`` cast to the weights' dtype, as ours.

CLI::

    python -m checkpoints_conversion.gemma convert SRC DST [--sliding-window-size N ...]
    # SRC: an official orbax checkpoint directory, a KerasHub preset directory
    # or an HF Gemma / Gemma 2 directory
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
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
from recurrent_lm.params import CheckpointMismatchError, parameter_values

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
    if config.query_pre_attn_scalar is not None:
        raise ValueError(
            f"cannot save in KerasHub format: query_pre_attn_scalar={config.query_pre_attn_scalar}"
            " (GemmaBackbone scales queries by head_dim or hidden_dim / num_query_heads only).")
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


# ---------------------------------------------------------------------------
# HF transformers (GemmaForCausalLM, Gemma2ForCausalLM).
# ---------------------------------------------------------------------------

HF_SOURCE = "HF Gemma checkpoint"
HF_MODEL_TYPES = ("gemma", "gemma2")
_HF_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
# HF's tanh-approximated GELUs ("gelu" is the Gemma 1 releases' legacy name for
# it, which transformers itself rewrites to gelu_pytorch_tanh).
_HF_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu")
_SLIDING, _FULL = "sliding_attention", "full_attention"
# The defaults of transformers 5.24's GemmaConfig / Gemma2Config for keys a config.json may omit.
_HF_DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-6),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
}


def hf_leaf_layouts(config: gemma.GemmaConfig) -> list[LeafLayout]:
    """Every tensor of HF's ``GemmaForCausalLM`` / ``Gemma2ForCausalLM``
    state dict for `config` (the tied ``lm_head.weight`` aside), with our
    labels. A config with post norms is Gemma 2, whose norm names differ:
    Gemma 1's ``post_attention_layernorm`` is the norm BEFORE the MLP."""
    gemma2 = config.use_post_attention_norm or config.use_post_ffw_norm
    layouts = [
        LeafLayout("model.embed_tokens.weight", ("embedder.embeddings",), (V, E)),
        LeafLayout("model.norm.weight", ("final_norm.scale",), (E,)),
    ]
    norms = {"input_layernorm": "pre_attention_norm"}
    if gemma2:
        norms["pre_feedforward_layernorm"] = "pre_ffw_norm"
        if config.use_post_attention_norm:
            norms["post_attention_layernorm"] = "post_attention_norm"
        if config.use_post_ffw_norm:
            norms["post_feedforward_layernorm"] = "post_ffw_norm"
    else:
        norms["post_attention_layernorm"] = "pre_ffw_norm"
    for i in range(config.num_layers):
        def leaf(path, label, dims, i=i):
            layouts.append(LeafLayout(f"model.layers.{i}.{path}", (f"layer_{i}.{label}",), dims))

        for hf_norm, ours in norms.items():
            leaf(f"{hf_norm}.weight", f"{ours}.scale", (E,))
        leaf("self_attn.q_proj.weight", "attn.query.weights", ((H, P), E))
        leaf("self_attn.k_proj.weight", "attn.key.weights", ((KV, P), E))
        leaf("self_attn.v_proj.weight", "attn.value.weights", ((KV, P), E))
        leaf("self_attn.o_proj.weight", "attn.output.weights", (E, (H, P)))
        leaf("mlp.gate_proj.weight", "mlp.gate.weights", (M, E))
        leaf("mlp.up_proj.weight", "mlp.up.weights", (M, E))
        leaf("mlp.down_proj.weight", "mlp.down.weights", (E, M))
    return layouts


def config_from_hf(values: Mapping[str, Any], **overrides) -> gemma.GemmaConfig:
    """A `GemmaConfig` from HF's config.json contents (model_type ``gemma`` or
    ``gemma2``), plus `overrides`; HF's defaults fill absent keys.

    HF's ``intermediate_size`` is one MLP branch (our ``intermediate_dim`` is
    both). HF's sliding window (``k > q - sliding_window``: W keys including
    the current one) is our ``sliding_window_size`` unchanged. Gemma 2's
    ``query_pre_attn_scalar`` becomes ``query_head_dim_normalize`` when it is
    head_dim (True) or hidden / heads (False), else our
    ``query_pre_attn_scalar``. What our Gemma cannot compute (biases, another
    activation or RoPE, an untied head, a layer_types pattern other than
    alternating sliding/full from layer 0) is an error naming the key.
    """
    model_type = values.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"HF config.json: model_type {model_type!r} is not one of {HF_MODEL_TYPES}.")
    get = lambda key: values[key] if values.get(key) is not None else _HF_DEFAULTS[model_type].get(key)
    problems = []
    if values.get("attention_bias"):
        problems.append("attention_bias is true (q/k/v/o biases), which Gemma does not have")
    if values.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention is true; our Gemma is causal")
    if values.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings is false; Gemma's head is the embedding matrix")
    activation_key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    activation = values.get(activation_key) or values.get("hidden_activation") or _HF_ACTIVATIONS[0]
    if activation not in _HF_ACTIVATIONS:
        problems.append(f"{activation_key} {activation!r} is not one of {_HF_ACTIVATIONS}")
    rope_parameters = values.get("rope_parameters") or {}
    if rope_parameters.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type {rope_parameters['rope_type']!r} is not 'default'")
    theta = rope_parameters.get("rope_theta", values.get("rope_theta", gemma.ROPE_MAX_WAVELENGTH))
    if theta != gemma.ROPE_MAX_WAVELENGTH:
        problems.append(f"rope_theta {theta} is not {gemma.ROPE_MAX_WAVELENGTH:g} (fixed in our Gemma)")
    fields: dict[str, Any] = dict(
        vocabulary_size=get("vocab_size"), hidden_dim=get("hidden_size"),
        intermediate_dim=2 * get("intermediate_size"), num_layers=get("num_hidden_layers"),
        num_query_heads=get("num_attention_heads"), head_dim=get("head_dim"),
        layer_norm_epsilon=get("rms_norm_eps"),
    )
    kv_heads = values.get("num_key_value_heads")  # absent: HF falls back to MHA
    fields["num_key_value_heads"] = kv_heads if kv_heads is not None else fields["num_query_heads"]
    if model_type == "gemma2":
        fields.update(use_post_attention_norm=True, use_post_ffw_norm=True)
        # An explicit null turns a cap off (HF's `if ... is not None`); absent keys take HF's default.
        for hf_key, ours in (("attn_logit_softcapping", "attention_logit_soft_cap"),
                             ("final_logit_softcapping", "final_logit_soft_cap")):
            fields[ours] = values[hf_key] if hf_key in values else _HF_DEFAULTS["gemma2"][hf_key]
        scalar = get("query_pre_attn_scalar")
        if scalar == fields["head_dim"]:
            fields["query_head_dim_normalize"] = True
        elif scalar == fields["hidden_dim"] // fields["num_query_heads"]:
            fields["query_head_dim_normalize"] = False
        else:
            fields["query_pre_attn_scalar"] = scalar
        layers = fields["num_layers"]
        types = values.get("layer_types") or [
            _SLIDING if (i + 1) % 2 else _FULL for i in range(layers)]  # HF's default
        window = values["sliding_window"] if "sliding_window" in values else get("sliding_window")
        alternating = [_SLIDING if i % 2 == 0 else _FULL for i in range(layers)]
        if window is None or list(types) == [_FULL] * layers:
            fields["use_sliding_window_attention"] = False
        elif list(types) == alternating:
            fields["use_sliding_window_attention"] = True
            fields["sliding_window_size"] = window
        else:
            problems.append(f"layer_types {list(types)} is not the alternating pattern (sliding on even"
                            " layers, as released) nor all full_attention")
    if problems:
        raise ValueError("HF config.json: " + "; ".join(problems) + ".")
    return dataclasses.replace(gemma.GemmaConfig(), **{**fields, **overrides})


def hf_config_dict(config: gemma.GemmaConfig) -> dict[str, Any]:
    """HF's config.json contents for `config`: Gemma 1 (``gemma``) when it has
    no post norms, soft caps, sliding window or special query scale, else
    Gemma 2 (``gemma2``); ValueError if neither can compute it."""
    gemma2 = (config.use_post_attention_norm or config.use_post_ffw_norm
              or config.attention_logit_soft_cap or config.final_logit_soft_cap
              or config.use_sliding_window_attention or config.query_scale != config.head_dim**-0.5)
    if gemma2 and not (config.use_post_attention_norm and config.use_post_ffw_norm):
        raise ValueError(
            "cannot save in HF format: HF Gemma 2 has both post norms and Gemma 1 neither;"
            f" this model has use_post_attention_norm={config.use_post_attention_norm},"
            f" use_post_ffw_norm={config.use_post_ffw_norm}."
        )
    model_type = "gemma2" if gemma2 else "gemma"
    values = {
        "architectures": [_HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocabulary_size,
        "hidden_size": config.hidden_dim,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_query_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": gemma.ROPE_MAX_WAVELENGTH},
        "rope_theta": gemma.ROPE_MAX_WAVELENGTH,  # transformers 4.x reads it here
        ("hidden_activation" if gemma2 else "hidden_act"): "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": config.param_dtype,
    }
    if gemma2:
        scalar = config.query_pre_attn_scalar
        values.update(
            # HF's config class wants an int: the released values are.
            query_pre_attn_scalar=int(scalar) if float(scalar or 0).is_integer() else scalar,
            attn_logit_softcapping=config.attention_logit_soft_cap,
            final_logit_softcapping=config.final_logit_soft_cap,
            sliding_window=config.sliding_window_size,
            layer_types=[_SLIDING if config.is_sliding(i) else _FULL for i in range(config.num_layers)],
        )
        if config.query_pre_attn_scalar is None:  # exact integers, as HF's own configs have them
            width = config.head_dim if config.query_head_dim_normalize else (
                config.hidden_dim // config.num_query_heads)
            values["query_pre_attn_scalar"] = width
    return values


def from_hf_state_dict(state_dict: Mapping[str, Any], config: gemma.GemmaConfig, *,
                       source: str = HF_SOURCE):
    """An HF state dict (tensors, arrays or `common.LazyTensor`s) -> our Gemma.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        tensor, with expected and found shapes.
    """
    leaves = dict(state_dict)
    leaves.pop("lm_head.weight", None)  # tied: the embeddings
    return common.load_model(leaves, hf_leaf_layouts(config), config, gemma.build_model,
                             source=source)


def to_hf_state_dict(model) -> dict[str, np.ndarray]:
    """Our Gemma -> HF's state dict as numpy arrays (the exact inverse of loading)."""
    config = common.config_of(model, gemma.GemmaConfig, "a Gemma model")
    return {k: np.asarray(v) for k, v in common.export_leaves(model, hf_leaf_layouts(config)).items()}


def _hf_model_type(directory: str) -> str:
    for model_type in HF_MODEL_TYPES:
        if common.is_hf_directory(directory, model_type):
            return model_type
    common.read_hf_config(directory, "gemma or gemma2")  # raises, naming what it found
    raise AssertionError("unreachable")


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A directory whose config.json says model_type gemma or gemma2."""
    return any(common.is_hf_directory(path, t) for t in HF_MODEL_TYPES)


def load_hf_checkpoint(directory: str | os.PathLike, **config_overrides):
    """Loads an HF ``GemmaForCausalLM`` or ``Gemma2ForCausalLM`` directory
    (config.json's ``model_type`` decides).

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``; ``pytorch_model.bin`` also works).
      **config_overrides: `GemmaConfig` fields; ``param_dtype`` defaults to
        the stored dtype (bfloat16 stays bfloat16; ``param_dtype="float32"``,
        or HF's name ``dtype="float32"``, casts).

    Raises:
      FileNotFoundError / ValueError: not an HF directory, another model_type,
        a truncated file, a config our Gemma cannot compute.
      CheckpointMismatchError: every missing, unexpected or mis-shaped tensor.
    """
    directory = os.fspath(directory)
    values, state, overrides = common.read_hf_checkpoint(directory, _hf_model_type(directory), config_overrides)
    return from_hf_state_dict(state, config_from_hf(values, **overrides), source=f"{HF_SOURCE} {directory}")


def save_hf_checkpoint(model, directory: str | os.PathLike, *,
                       max_shard_size: int | str | None = None) -> None:
    """Writes `model` as an HF directory that ``GemmaForCausalLM`` (no post
    norms, caps, window) or ``Gemma2ForCausalLM`` ``.from_pretrained`` loads.

    Args:
      model: our Gemma; tensors keep its ``param_dtype``.
      directory: the new directory (must not exist; written atomically).
      max_shard_size: None for one ``model.safetensors``; else bytes or HF's
        strings ("5GB") per shard, with ``model.safetensors.index.json``.
    """
    config = common.config_of(model, gemma.GemmaConfig, "a Gemma model")
    hf_config = hf_config_dict(config)
    values = parameter_values(model)
    tensors = {layout.path: functools.partial(layout.from_named, values)
               for layout in hf_leaf_layouts(config)}
    common.write_hf_directory(directory, tensors, hf_config,
                              max_shard_bytes=common.parse_size(max_shard_size))


def load_checkpoint(path: str | os.PathLike, **config_overrides):
    """An HF directory (config.json with model_type gemma / gemma2), a KerasHub
    preset directory or an official orbax checkpoint, told apart by the
    directory's contents."""
    if is_hf_directory(path):
        return load_hf_checkpoint(path, **config_overrides)
    if is_keras_preset(path):
        return load_keras_preset(path, **config_overrides)
    return load_official_checkpoint(os.fspath(path), **config_overrides)


def main(argv: list[str] | None = None) -> int:
    parser, convert = common.convert_parser(
        "gemma", __doc__, source="official orbax checkpoint directory, KerasHub preset or HF Gemma / Gemma 2 directory"
    )
    common.add_config_flags(
        convert,
        gemma.GemmaConfig,
        ["sliding_window_size", "attention_logit_soft_cap", "final_logit_soft_cap"]
        + ["layer_norm_epsilon", "query_head_dim_normalize", "query_pre_attn_scalar"]
        + ["use_sliding_window_attention"]
        + ["param_dtype"],
        param_dtype=PARAM_DTYPES,
    )
    return common.run_convert(parser, argv, load_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
