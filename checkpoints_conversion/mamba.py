"""HF transformers' Mamba checkpoints <-> our Mamba-1 and Mamba-2.

HF directories: ``config.json`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``; ``pytorch_model.bin`` too), read lazily, one
tensor at a time. ``model_type`` decides the family: ``mamba``
(``MambaForCausalLM``, e.g. state-spaces/mamba-130m-hf) loads as
`recurrent_lm.models.mamba`, ``mamba2`` (``Mamba2ForCausalLM``) as
`recurrent_lm.models.mamba2`. Names ``backbone.layers.N.mixer.*``
(``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``dt_bias``, ``norm``, ``out_proj``), ``backbone.layers.N.norm``,
``backbone.embeddings`` (HF's old ``backbone.embedding`` is read too),
``backbone.norm_f``; ``nn.Linear`` weights [out, in]; the conv as [channels,
1, taps]. Fused projections stay fused: ``in_proj`` is x then z (Mamba-1) or
z, xBC, dt (Mamba-2), ``x_proj`` is dt_low, B, C. A tied head is not stored
(``lm_head.weight``, when present, is the embeddings and is dropped); an
untied one is ``lm_head.weight``. Values are stored as they are used
(``A_log`` before ``-exp``, norm scales as is), so both directions are exact.

The original package's directories (``mamba_ssm``'s ``MambaLMHeadModel``, as
state-spaces/mamba-130m ... and state-spaces/mamba2-130m ... are published:
``config.json`` with ``d_model``, ``n_layer``, ``ssm_cfg`` and no
``model_type``, weights in ``pytorch_model.bin``) load with
`load_mamba_ssm_checkpoint`: the same tensor names (``backbone.embedding``),
the vocabulary padded to ``pad_vocab_size_multiple``, ``ssm_cfg["layer"]``
("Mamba1", the default, or "Mamba2") deciding the family. Variants our models
do not compute (attention layers, an MLP, LayerNorm, Mamba-2's per-channel
``D`` or norm before the gate, learnable initial states) are an error naming
the key.

The GPT-NeoX-20B tokenizer of the releases (``tokenizer.json``) loads with
`load_tokenizer` (`tokenizers`).

CLI (SRC: an HF directory, or a mamba_ssm one, told apart by its config.json)::

    python -m checkpoints_conversion.mamba convert SRC DST [--param-dtype bfloat16]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints_conversion import common
from checkpoints_conversion.common import LeafLayout
from checkpoints_conversion.rwkv import NeoXTokenizer, load_tokenizer
from recurrent_lm import axes
from recurrent_lm.core.config import PARAM_DTYPES
from recurrent_lm.models import mamba, mamba2
from recurrent_lm.params import parameter_values

__all__ = [
    "NeoXTokenizer",
    "config_from_hf",
    "config_from_mamba_ssm",
    "from_hf_state_dict",
    "hf_config_dict",
    "leaf_layouts",
    "load_checkpoint",
    "load_hf_checkpoint",
    "load_mamba_ssm_checkpoint",
    "load_tokenizer",
    "main",
    "save_hf_checkpoint",
    "to_hf_state_dict",
]

E, V, I, N = axes.EMBEDDING, axes.VOCABULARY, axes.INNER, axes.STATE
H, P, F, K = axes.HEADS, axes.PROJECTION, axes.FUSED, axes.CONV_TAPS
SOURCE = "HF Mamba checkpoint"
EMBEDDINGS = "backbone.embeddings.weight"
OLD_EMBEDDINGS = "backbone.embedding.weight"  # the name HF's load hook renames
FAMILIES = {"mamba": (mamba.MambaConfig, "MambaForCausalLM"),
            "mamba2": (mamba2.Mamba2Config, "Mamba2ForCausalLM")}
# Config fields that are ours, not HF's (not read from, nor written to, config.json).
_OWN_FIELDS = ("param_dtype", "scan_method", "scan_chunk_size")

Config = mamba.MambaConfig | mamba2.Mamba2Config


def leaf_layouts(config: Config) -> list[LeafLayout]:
    """Every tensor of HF's state dict for `config` (a tied head aside), with our labels."""
    layouts = [
        LeafLayout(EMBEDDINGS, ("embeddings.embeddings",), (V, E)),
        LeafLayout("backbone.norm_f.weight", ("norm_f.scale",), (E,)),
    ]
    if not config.tie_word_embeddings:
        layouts.append(LeafLayout("lm_head.weight", ("lm_head.weights",), (V, E)))
    mamba2_mixer = isinstance(config, mamba2.Mamba2Config)
    channels = F if mamba2_mixer else I  # what the conv runs over
    value_side = (H, P) if mamba2_mixer else I  # what out_proj reads
    for i in range(config.num_hidden_layers):
        def leaf(path, label, dims, i=i):
            layouts.append(LeafLayout(f"backbone.layers.{i}.{path}", (f"layers.{i}.{label}",), dims))

        leaf("norm.weight", "norm.scale", (E,))
        leaf("mixer.in_proj.weight", "mixer.in_proj.weights", (F, E))
        leaf("mixer.conv1d.weight", "mixer.conv1d.weights", (channels, 1, K))
        leaf("mixer.out_proj.weight", "mixer.out_proj.weights", (E, value_side))
        if config.use_bias:
            leaf("mixer.in_proj.bias", "mixer.in_proj.bias", (F,))
            leaf("mixer.out_proj.bias", "mixer.out_proj.bias", (E,))
        if config.use_conv_bias:
            leaf("mixer.conv1d.bias", "mixer.conv1d.bias", (channels,))
        if mamba2_mixer:
            for name in ("dt_bias", "A_log", "D"):
                leaf(f"mixer.{name}", f"mixer.{name}", (H,))
            leaf("mixer.norm.weight", "mixer.norm.scale", ((H, P),))
        else:
            leaf("mixer.x_proj.weight", "mixer.x_proj.weights", (F, I))
            leaf("mixer.dt_proj.weight", "mixer.dt_proj.weights", (I, axes.LOW_RANK))
            leaf("mixer.dt_proj.bias", "mixer.dt_proj.bias", (I,))
            leaf("mixer.A_log", "mixer.A_log", (I, N))
            leaf("mixer.D", "mixer.D", (I,))
    return layouts


def _hf_fields(config_class) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class) if f.name not in _OWN_FIELDS]


def config_from_hf(values: Mapping[str, Any], **overrides) -> Config:
    """Our config from HF's config.json contents (``model_type`` picks the
    family; other HF keys are ignored, absent ones take HF's defaults), plus
    `overrides`."""
    model_type = values.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"HF config.json: model_type {model_type!r} is not one of {sorted(FAMILIES)}.")
    config_class, _ = FAMILIES[model_type]
    fields = {k: values[k] for k in _hf_fields(config_class) if values.get(k) is not None}
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(fields.get(k), list):  # HF allows a list of ids
            fields[k] = fields[k][0]
    return config_class(**{**fields, **overrides})


def hf_config_dict(config: Config) -> dict[str, Any]:
    """HF's config.json contents for `config`."""
    model_type = config.model_type
    values = {k: getattr(config, k) for k in _hf_fields(type(config))}
    if isinstance(config, mamba2.Mamba2Config):
        values["time_step_limit"] = list(config.time_step_limit)
    return {
        "architectures": [FAMILIES[model_type][1]],
        "model_type": model_type,
        **values,
        "intermediate_size": config.intermediate_size,
        "dtype": config.param_dtype,
    }


def _build_model(config: Config):
    return (mamba2.build_model if isinstance(config, mamba2.Mamba2Config) else mamba.build_model)


def from_hf_state_dict(state_dict: Mapping[str, Any], config: Config, *, source: str = SOURCE):
    """An HF state dict (tensors, arrays or `common.LazyTensor`s) -> our model.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        tensor, with expected and found shapes.
    """
    leaves = dict(state_dict)
    if OLD_EMBEDDINGS in leaves and EMBEDDINGS not in leaves:
        leaves[EMBEDDINGS] = leaves.pop(OLD_EMBEDDINGS)
    if config.tie_word_embeddings:
        leaves.pop("lm_head.weight", None)  # the same tensor as the embeddings
    return common.load_model(leaves, leaf_layouts(config), config, _build_model(config), source=source)


def _config_of(model) -> Config:
    return common.config_of(model, (mamba.MambaConfig, mamba2.Mamba2Config), "a Mamba or Mamba-2 model")


def to_hf_state_dict(model) -> dict[str, np.ndarray]:
    """Our Mamba / Mamba-2 -> HF's state dict as numpy arrays (the exact inverse of loading)."""
    layouts = leaf_layouts(_config_of(model))
    return {k: np.asarray(v) for k, v in common.export_leaves(model, layouts).items()}


def load_hf_checkpoint(directory: str | os.PathLike, **config_overrides):
    """Loads an HF ``MambaForCausalLM`` or ``Mamba2ForCausalLM`` directory.

    Args:
      directory: holds ``config.json`` (its ``model_type`` picks the family)
        and the weights.
      **config_overrides: fields of the family's config; ``param_dtype``
        defaults to the stored dtype (bfloat16 stays bfloat16;
        ``param_dtype="float32"``, or HF's name ``dtype="float32"``, casts);
        ``scan_method`` picks the scan.

    Raises:
      FileNotFoundError / ValueError: not an HF directory, another
        model_type, a truncated file, a config we cannot compute.
      CheckpointMismatchError: every missing, unexpected or mis-shaped tensor.
    """
    directory = os.fspath(directory)
    values, state, overrides = common.read_hf_checkpoint(
        directory, tuple(FAMILIES), config_overrides, embedding=EMBEDDINGS
    )
    if "param_dtype" not in overrides and OLD_EMBEDDINGS in state:
        overrides["param_dtype"] = common.stored_dtype(state[OLD_EMBEDDINGS])
    config = config_from_hf(values, **overrides)
    return from_hf_state_dict(state, config, source=f"{SOURCE} {directory}")


def save_hf_checkpoint(model, directory: str | os.PathLike, *,
                       max_shard_size: int | str | None = None) -> None:
    """Writes `model` as an HF directory that ``MambaForCausalLM`` /
    ``Mamba2ForCausalLM.from_pretrained`` loads.

    Args:
      model: our Mamba or Mamba-2; tensors keep its ``param_dtype``.
      directory: the new directory (must not exist; written atomically).
      max_shard_size: None for one ``model.safetensors``; else bytes or HF's
        strings ("5GB") per shard, with ``model.safetensors.index.json``.
    """
    config = _config_of(model)
    values = parameter_values(model)
    tensors = {layout.path: functools.partial(layout.from_named, values)
               for layout in leaf_layouts(config)}
    common.write_hf_directory(directory, tensors, hf_config_dict(config),
                              max_shard_bytes=common.parse_size(max_shard_size))


# ---------------------------------------------------------------------------
# The original package's directories (mamba_ssm's MambaLMHeadModel).
# ---------------------------------------------------------------------------

MAMBA_SSM_SOURCE = "mamba_ssm checkpoint"
# ssm_cfg keys -> our field names, per family (others are runtime or init-only options).
_MAMBA1_KEYS = {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand",
                "dt_rank": "time_step_rank", "dt_min": "time_step_min", "dt_max": "time_step_max",
                "dt_init": "time_step_init_scheme", "dt_scale": "time_step_scale",
                "dt_init_floor": "time_step_floor", "conv_bias": "use_conv_bias", "bias": "use_bias"}
_MAMBA2_KEYS = {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand",
                "headdim": "head_dim", "ngroups": "n_groups", "dt_min": "time_step_min",
                "dt_max": "time_step_max", "dt_init_floor": "time_step_floor",
                "dt_limit": "time_step_limit", "conv_bias": "use_conv_bias", "bias": "use_bias",
                "chunk_size": "chunk_size"}
# Keys whose value other than this one changes the model into one we do not compute.
_MAMBA_SSM_REQUIRED = {"d_intermediate": 0, "attn_layer_idx": [], "rms_norm": True}
_MAMBA2_REQUIRED = {"D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
                    "learnable_init_states": False}


def is_mamba_ssm_directory(path: str | os.PathLike) -> bool:
    """A directory whose config.json is mamba_ssm's (``d_model``, ``n_layer``, no ``model_type``)."""
    try:
        with open(os.path.join(path, common.HF_CONFIG)) as f:
            values = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and "model_type" not in values and {"d_model", "n_layer"} <= set(values)


def config_from_mamba_ssm(values: Mapping[str, Any], **overrides) -> Config:
    """Our config from mamba_ssm's config.json contents, plus `overrides`."""
    ssm = dict(values.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"mamba_ssm config.json: ssm_cfg layer {layer!r} is not 'Mamba1' or 'Mamba2'.")
    required = dict(_MAMBA_SSM_REQUIRED)
    found = {key: values.get(key, value) for key, value in required.items()}
    if layer == "Mamba2":
        required.update(_MAMBA2_REQUIRED)
        found.update({key: ssm.get(key, value) for key, value in _MAMBA2_REQUIRED.items()})
        expand = ssm.get("expand", 2)
        if ssm.get("d_ssm") not in (None, expand * values["d_model"]):
            found["d_ssm"], required["d_ssm"] = ssm["d_ssm"], expand * values["d_model"]
    if ssm.get("activation", "silu") not in ("silu", "swish"):
        found["activation"], required["activation"] = ssm["activation"], "silu"
    wrong = [f"{key} {found[key]!r} (we compute {value!r})" for key, value in required.items()
             if found[key] is not None and found[key] != value]  # None: the default
    if wrong:
        raise ValueError("mamba_ssm config.json: a model we do not compute: " + "; ".join(wrong) + ".")
    keys = _MAMBA2_KEYS if layer == "Mamba2" else _MAMBA1_KEYS
    fields = {ours: ssm[theirs] for theirs, ours in keys.items() if ssm.get(theirs) is not None}
    vocab, multiple = values.get("vocab_size", 50277), values.get("pad_vocab_size_multiple", 8)
    fields.update(
        hidden_size=values["d_model"], num_hidden_layers=values["n_layer"],
        vocab_size=vocab + (-vocab) % multiple,
        residual_in_fp32=values.get("residual_in_fp32", True),
        tie_word_embeddings=values.get("tie_embeddings", True),
        pad_token_id=0, bos_token_id=0, eos_token_id=0,  # the NeoX tokenizer's <|endoftext|>
    )
    config_class = mamba2.Mamba2Config if layer == "Mamba2" else mamba.MambaConfig
    return config_class(**{**fields, **overrides})


def load_mamba_ssm_checkpoint(directory: str | os.PathLike, **config_overrides):
    """Loads a mamba_ssm directory (config.json + ``pytorch_model.bin``, or
    safetensors) as our Mamba / Mamba-2; overrides as for `load_hf_checkpoint`.

    Raises:
      ValueError: a config.json we cannot compute (naming the keys).
      CheckpointMismatchError: every missing, unexpected or mis-shaped tensor.
    """
    directory = os.fspath(directory)
    if not is_mamba_ssm_directory(directory):
        raise ValueError(f"{directory} has no mamba_ssm config.json (d_model, n_layer, no model_type).")
    with open(os.path.join(directory, common.HF_CONFIG)) as f:
        values = common.decode_hf_floats(json.load(f))
    overrides = dict(config_overrides)
    if "dtype" in overrides:  # HF's name for it
        overrides["param_dtype"] = overrides.pop("dtype")
    state = common.read_hf_weights(directory)
    if "param_dtype" not in overrides and OLD_EMBEDDINGS in state:
        overrides["param_dtype"] = common.stored_dtype(state[OLD_EMBEDDINGS])
    config = config_from_mamba_ssm(values, **overrides)
    return from_hf_state_dict(state, config, source=f"{MAMBA_SSM_SOURCE} {directory}")


def load_checkpoint(path: str | os.PathLike, **config_overrides):
    """An HF directory or a mamba_ssm one, told apart by its config.json."""
    if is_mamba_ssm_directory(path):
        return load_mamba_ssm_checkpoint(path, **config_overrides)
    return load_hf_checkpoint(path, **config_overrides)


def main(argv: list[str] | None = None) -> int:
    parser, convert = common.convert_parser(
        "mamba", __doc__,
        source="HF MambaForCausalLM / Mamba2ForCausalLM directory, or a mamba_ssm directory",
    )
    common.add_config_flags(convert, mamba.MambaConfig, ["param_dtype"], param_dtype=PARAM_DTYPES)
    return common.run_convert(parser, argv, load_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
