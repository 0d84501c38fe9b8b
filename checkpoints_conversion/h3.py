"""Released H3 checkpoints (HazyResearch/H3, ``danfu09/H3-*``) <-> our H3.

The releases are pickled torch files (``model.pt``): a Lightning checkpoint
(weights under ``state_dict``, prefixed ``model.``) or a plain state dict,
possibly with older key names. `load_checkpoint` applies the original
loader's rules (Lightning unwrapping, an optional ``model.`` prefix, the
legacy renames and the move of the old post-norm LayerNorms) and reads
``.safetensors`` files with the same names. `to_original_state_dict` /
`save_checkpoint` export back to those names (with ``lm_head.weight`` as a
copy of the tied embedding).

The config cannot be read from the weights' names alone (e.g. which layers
are attention is visible, but not the heads): pass an `H3Config`, a preset
name, or the original's config dict (``d_model``, ``n_layer``,
``attn_layer_idx``, ``attn_cfg`` / ``num_heads``, ...), as in
``tests/data/h3_tiny/h3_tiny_config.json``.

CLI::

    python -m checkpoints_conversion.h3 convert model.pt DST --preset 125m
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from checkpoints_conversion import common
from checkpoints_conversion.common import Dim, LeafLayout
from recurrent_lm import axes
from recurrent_lm.models import h3

E, V, H, S, M = axes.EMBEDDING, axes.VOCABULARY, axes.HEADS, axes.STATE, axes.MLP
KV, P = axes.KV_HEADS, axes.PROJECTION
SOURCE = "H3 checkpoint"
LM_HEAD = "lm_head.weight"
EMBEDDING = "backbone.embeddings.word_embeddings.weight"
TORCH_SUFFIXES = common.TORCH_SUFFIXES


@dataclasses.dataclass(frozen=True)
class PartsLeaf(LeafLayout):
    """A leaf holding several of our parameters side by side along `axis`:
    stacked on a new axis (``stacked``: the (re, im) pairs of complex SSM
    parameters) or concatenated (the fused qkv projection). ``part_dims`` are
    the dims of each label's part, as in `LeafLayout.dims`."""

    part_dims: tuple[tuple[Dim, ...], ...] = ()
    axis: int = 0
    stacked: bool = False

    def _parts(self) -> list[LeafLayout]:
        return [
            LeafLayout(self.path, (label,), dims)
            for label, dims in zip(self.labels, self.part_dims)
        ]

    def shape(self, named_shape):
        shapes = [part.shape(named_shape) for part in self._parts()]
        if self.stacked:
            shape = list(shapes[0])
            shape.insert(self.axis % (len(shape) + 1), len(shapes))
            return tuple(shape)
        shape = list(shapes[0])
        shape[self.axis] = sum(s[self.axis] for s in shapes)
        return tuple(shape)

    def to_named(self, array, named_shape):
        parts = self._parts()
        if self.stacked:
            pieces = [jnp.take(array, i, axis=self.axis) for i in range(len(parts))]
        else:
            sizes = [part.shape(named_shape)[self.axis] for part in parts]
            pieces = jnp.split(array, np.cumsum(sizes)[:-1], axis=self.axis)
        values = {}
        for part, piece in zip(parts, pieces):
            values.update(part.to_named(piece, named_shape))
        return values

    def from_named(self, values):
        pieces = [part.from_named(values) for part in self._parts()]
        join = jnp.stack if self.stacked else jnp.concatenate
        return join(pieces, axis=self.axis)


def leaf_layouts(config: h3.H3Config) -> list[LeafLayout]:
    """Every tensor of the released state dict for `config` (without the tied
    ``lm_head.weight`` and rotary ``inv_freq`` buffers), with our labels."""
    layouts = [
        LeafLayout(EMBEDDING, ("embedder.embeddings",), (V, E)),
        LeafLayout("backbone.ln_f.weight", ("final_norm.scale",), (E,)),
        LeafLayout("backbone.ln_f.bias", ("final_norm.bias",), (E,)),
    ]
    for i in range(config.num_hidden_layers):
        src, dst = f"backbone.layers.{i}", f"blocks.{i}"

        def leaf(path, label, dims, src=src, dst=dst):
            layouts.append(LeafLayout(f"{src}.{path}", (f"{dst}.{label}",), dims))

        for norm in ("norm1", "norm2"):
            leaf(f"{norm}.weight", f"{norm}.scale", (E,))
            leaf(f"{norm}.bias", f"{norm}.bias", (E,))
        leaf("mlp.fc1.weight", "mlp.up.weights", (M, E))
        leaf("mlp.fc1.bias", "mlp.up.bias", (M,))
        leaf("mlp.fc2.weight", "mlp.down.weights", (E, M))
        leaf("mlp.fc2.bias", "mlp.down.bias", (E,))
        if i in config.attn_layer_idx:
            qkv = lambda part, dst=dst: tuple(
                f"{dst}.mixer.{n}.{part}" for n in ("query", "key", "value")
            )
            # (..., 3, heads, head_dim): the q, k, v blocks, head-major inside.
            layouts.append(
                PartsLeaf(
                    f"{src}.mixer.Wqkv.weight",
                    qkv("weights"),
                    ((H, P), E),
                    part_dims=(((H, P), E), ((KV, P), E), ((KV, P), E)),
                )
            )
            layouts.append(
                PartsLeaf(
                    f"{src}.mixer.Wqkv.bias",
                    qkv("bias"),
                    ((H, P),),
                    part_dims=(((H, P),), ((KV, P),), ((KV, P),)),
                )
            )
            leaf("mixer.out_proj.weight", "mixer.output.weights", (E, (H, P)))
            leaf("mixer.out_proj.bias", "mixer.output.bias", (E,))
            continue
        for proj in ("q_proj", "k_proj", "v_proj"):
            leaf(f"mixer.{proj}.weight", f"mixer.{proj}.weights", (H, E))
            leaf(f"mixer.{proj}.bias", f"mixer.{proj}.bias", (H,))
        leaf("mixer.output_linear.weight", "mixer.output_linear.weights", (E, H))
        leaf("mixer.output_linear.bias", "mixer.output_linear.bias", (E,))
        leaf("mixer.ssm_k_D", "mixer.ssm_k.D", (H,))
        leaf("mixer.ssm_k_kernel.kernel.B", "mixer.ssm_k.B", (H, S))
        leaf("mixer.ssm_k_kernel.kernel.C", "mixer.ssm_k.C", (1, H, S))
        leaf("mixer.D", "mixer.kernel.D", (H,))
        for name in ("log_dt", "inv_A_real", "A_imag"):
            dims = (H,) if name == "log_dt" else (H, S)
            leaf(f"mixer.kernel.kernel.{name}", f"mixer.kernel.{name}", dims)
        for name, dims in (("B", (H, S)), ("C", (1, H, S))):
            labels = (f"{dst}.mixer.kernel.{name}_re", f"{dst}.mixer.kernel.{name}_im")
            layouts.append(
                PartsLeaf(
                    f"{src}.mixer.kernel.kernel.{name}",
                    labels,
                    dims,
                    part_dims=(dims, dims),
                    axis=-1,
                    stacked=True,
                )
            )
    return layouts


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------

# Keys of the original's model config that change nothing here.
_IGNORED_ORIGINAL_KEYS = {
    "fused_mlp",
    "fused_dropout_add_ln",
    "initializer_cfg",
    "_name_",
    "ssm_cfg",
    "attn_cfg",
    "pad_vocab_size_multiple",
    "tie_embeddings",
    "position_embeddings",
    "vocab_size",
    "padded_vocab_size",
}
_ORIGINAL_NAMES = {
    "d_model": "hidden_size",
    "n_layer": "num_hidden_layers",
    "d_inner": "n_inner",
    "attn_layer_idx": "attn_layer_idx",
    "num_heads": "num_attention_heads",
    "d_state": "d_state",
    "layer_norm_epsilon": "layer_norm_epsilon",
    "ssm_mode": "ssm_mode",
    "ssm_measure": "ssm_measure",
    "disc": "discretisation",
    "head_dim": "head_dim",
    "resid_dropout": "residual_dropout",
    "embed_dropout": "embedding_dropout",
    "residual_in_fp32": "residual_in_fp32",
    "rotary_emb_dim": "rotary_emb_dim",
}


def config_from_original(values: Mapping[str, Any]) -> h3.H3Config:
    """An `H3Config` from the original's model config (``SSMLMHeadModel`` kwargs,
    flattened or with ``ssm_cfg`` / ``attn_cfg`` dicts)."""
    flat = dict(values)
    for nested, names in (
        (
            "ssm_cfg",
            {
                "mode": "ssm_mode",
                "measure": "ssm_measure",
                "d_state": "d_state",
                "head_dim": "head_dim",
                "disc": "disc",
            },
        ),
        ("attn_cfg", {"num_heads": "num_heads", "rotary_emb_dim": "rotary_emb_dim"}),
    ):
        for key, value in dict(flat.get(nested) or {}).items():
            if key not in names:
                raise ValueError(f"unsupported {nested} key {key!r} in the H3 config.")
            flat.setdefault(names[key], value)
    unknown = sorted(set(flat) - set(_ORIGINAL_NAMES) - _IGNORED_ORIGINAL_KEYS)
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} in the original H3 config; known:"
            f" {sorted(set(_ORIGINAL_NAMES) | _IGNORED_ORIGINAL_KEYS)}."
        )
    if not flat.get("tie_embeddings", True) or flat.get("position_embeddings", False):
        raise ValueError(
            "only tied embeddings without position embeddings are supported"
            " (every released H3 model)."
        )
    fields = {_ORIGINAL_NAMES[k]: v for k, v in flat.items() if k in _ORIGINAL_NAMES}
    if "padded_vocab_size" in flat:
        fields["vocab_size"] = flat["padded_vocab_size"]
    elif "vocab_size" in flat:  # the original pads to a multiple of 8
        multiple = flat.get("pad_vocab_size_multiple", 8)
        fields["vocab_size"] = -(-flat["vocab_size"] // multiple) * multiple
    return h3.H3Config(**fields)


def resolve_config(config) -> h3.H3Config:
    """`H3Config`, preset name, original config dict, or `H3Config.to_dict()` dict."""
    if isinstance(config, h3.H3Config):
        return config
    if isinstance(config, str):
        return h3.H3Config.from_preset(config)
    if isinstance(config, Mapping):
        if "d_model" in config:
            return config_from_original(config)
        return h3.H3Config.from_dict(dict(config))
    raise TypeError(
        f"config must be an H3Config, a preset name or a dict, got {type(config).__name__}."
    )


# ---------------------------------------------------------------------------
# State dicts.
# ---------------------------------------------------------------------------


def normalize_state_dict(state: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The original loader's rules: Lightning unwrapping, ``model.`` prefix,
    legacy renames, and the move of the old post-norm LayerNorms."""
    if "pytorch-lightning_version" in state or (
        "state_dict" in state and isinstance(state["state_dict"], Mapping)
    ):
        state = {
            k[len("model.") :]: v
            for k, v in state["state_dict"].items()
            if k.startswith("model.")
        }
    elif state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    renames = (
        ("s4seq.encoder.", "backbone."),
        ("embedding.", "backbone.embeddings.word_embeddings."),
        ("backbone.norm", "backbone.ln_0"),
    )
    renamed = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    state = renamed
    if "backbone.ln_0.weight" in state:
        # Old blocks were "mixer -> add -> LN": the norm after layer l-1 is
        # layer l's norm1, layer l's norm1 its norm2, the last norm2 ln_f.
        moved = {
            k: v
            for k, v in state.items()
            if not (k.startswith("backbone.ln_0.") or ".norm1." in k or ".norm2." in k)
        }
        for part in ("weight", "bias"):
            get = lambda key: state.get(key)
            pairs = [(f"backbone.ln_0.{part}", f"backbone.layers.0.norm1.{part}")]
            for layer in range(num_layers):
                pairs.append(
                    (
                        f"backbone.layers.{layer}.norm1.{part}",
                        f"backbone.layers.{layer}.norm2.{part}",
                    )
                )
                nxt = (
                    f"backbone.layers.{layer + 1}.norm1.{part}"
                    if layer + 1 < num_layers
                    else f"backbone.ln_f.{part}"
                )
                pairs.append((f"backbone.layers.{layer}.norm2.{part}", nxt))
            for old, new in pairs:
                if get(old) is not None:
                    moved[new] = state[old]
        state = moved
    return state


def from_state_dict(
    state: Mapping[str, Any],
    config,
    *,
    source: str = SOURCE,
    **config_overrides,
):
    """A (released-format) state dict -> our H3 (`DecoderLM`).

    `config` is resolved as in `load_checkpoint`; ``config_overrides`` replace
    its fields (e.g. the build options ``ssm_method``, ``scan_method``).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        tensor, with expected and found shapes.
    """
    config = dataclasses.replace(resolve_config(config), **config_overrides)
    state = normalize_state_dict(state, config.num_hidden_layers)
    state = {
        k: common.to_numpy(v)
        for k, v in state.items()
        if not isinstance(v, (int, float, str))
    }
    head = state.pop(LM_HEAD, None)
    if config.rotary_emb_dim:
        for i in config.attn_layer_idx:
            state.pop(f"backbone.layers.{i}.mixer.rotary_emb.inv_freq", None)
    untied = {}
    if head is not None and EMBEDDING in state and not np.array_equal(head, state[EMBEDDING]):
        untied[LM_HEAD] = (
            f"the tied embedding {EMBEDDING} (untied heads are not supported)",
            "a different matrix",
        )
    return common.load_model(
        state, leaf_layouts(config), config, h3.build_model, source=source, misshaped=untied
    )


def load_checkpoint(
    weights_path,
    config,
    *,
    weights_only: bool = True,
    **config_overrides,
):
    """Loads a released H3 checkpoint (``.pt``/``.pth``/``.ckpt``, or ``.safetensors``).

    Args:
      weights_path: the file.
      config: an `H3Config`, a preset name ("125m", ...), the original config
        dict, or an `H3Config.to_dict()` dict.
      weights_only: torch's safe unpickling; Lightning checkpoints that hold
        other Python objects need False (only for files you trust).
      **config_overrides: `H3Config` fields (e.g. ``ssm_method``, ``scan_method``).
    """
    path = os.fspath(weights_path)
    return from_state_dict(
        common.read_weights(path, weights_only=weights_only),
        config,
        source=f"{SOURCE} {path}",
        **config_overrides,
    )


def to_original_state_dict(
    model, *, include_lm_head: bool = True
) -> dict[str, np.ndarray]:
    """Our H3 -> the released names (numpy arrays; the exact inverse of loading)."""
    config = common.config_of(model, h3.H3Config, "an H3 model")
    leaves = common.export_leaves(model, leaf_layouts(config))
    state = {name: np.asarray(leaf) for name, leaf in leaves.items()}
    if include_lm_head:
        state[LM_HEAD] = state[EMBEDDING].copy()  # a copy: safetensors refuses shared storage
    return state


def save_checkpoint(model, path) -> None:
    """Writes `model` with the released names: ``.safetensors`` (or a torch ``.pt``)."""
    common.write_weights(to_original_state_dict(model), path)


def _load_for_cli(src: str, *, preset=None, config_file=None, weights_only=True):
    if config_file is not None:
        with open(config_file) as f:
            preset = json.load(f)
    return load_checkpoint(src, preset, weights_only=weights_only)


def main(argv: list[str] | None = None) -> int:
    parser, convert = common.convert_parser(
        "h3", __doc__, source="released weights file (model.pt / .safetensors)"
    )
    group = convert.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", choices=sorted(h3.PRESETS))
    group.add_argument("--config", dest="config_file",
                       help="JSON file: original config or H3Config fields")
    convert.add_argument(
        "--unsafe-pickle",
        dest="weights_only",
        action="store_const",
        const=False,
        help="allow non-tensor objects in a trusted .pt (Lightning checkpoints)",
    )
    return common.run_convert(parser, argv, _load_for_cli)


if __name__ == "__main__":
    sys.exit(main())
