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
name, or the original's config dict: the keywords of
``SSMLMHeadModel(**kwargs)`` (``d_model``, ``n_layer``, ``d_inner``,
``vocab_size``, ``pad_vocab_size_multiple``, ``attn_layer_idx``,
``attn_cfg``, ``ssm_cfg``, ``max_position_embeddings``, ...), as in
``tests/data/h3_rotary/h3_rotary_config.json`` (see `config_from_original`).

CLI::

    python -m checkpoints_conversion.h3 convert model.pt DST --preset 125m
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from checkpoints_conversion import common
from checkpoints_conversion.common import Dim, LeafLayout
from recurrent_lm import axes
from recurrent_lm.models import h3

E, V, H, S, M = axes.EMBEDDING, axes.VOCABULARY, axes.HEADS, axes.STATE, axes.MLP
KV, P, POS = axes.KV_HEADS, axes.PROJECTION, axes.POSITIONS
SOURCE = "H3 checkpoint"
LM_HEAD = "lm_head.weight"
EMBEDDING = "backbone.embeddings.word_embeddings.weight"
POSITION_EMBEDDING = "backbone.embeddings.position_embeddings.weight"
INV_FREQ = "backbone.layers.{}.mixer.rotary_emb.inv_freq"
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
    if config.max_position_embeddings:
        layouts.append(LeafLayout(POSITION_EMBEDDING, ("embedder.position_embeddings",), (POS, E)))
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
# Config: the original's SSMLMHeadModel(**kwargs).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Keyword:
    """How one keyword of the original reaches an `H3Config`.

    Attributes:
      field: the `H3Config` field it sets, or None.
      supported: the values we reproduce (None: any value); `why` says what
        the others would need.
    """

    field: str | None = None
    supported: Callable[[Any], bool] | None = None
    why: str = ""


def _only(test: Callable[[Any], bool], why: str) -> _Keyword:
    return _Keyword(supported=test, why=why)


# Keywords that do not change a loaded model's numbers: kernels of the same
# math, placement, training-only knobs and initialisation (the checkpoint
# holds the values).
_NO_EFFECT = _Keyword()
_FALSE = lambda v: not v

# SSMLMHeadModel / SSMModel. vocab_size, pad_vocab_size_multiple and the
# nested dicts are read by `config_from_original` itself.
_TOP: dict[str, _Keyword] = {
    "d_model": _Keyword("hidden_size"),
    "n_layer": _Keyword("num_hidden_layers"),
    "d_inner": _Keyword("n_inner"),
    "attn_layer_idx": _Keyword("attn_layer_idx"),
    "max_position_embeddings": _Keyword("max_position_embeddings"),
    "resid_dropout": _Keyword("residual_dropout"),
    "embed_dropout": _Keyword("embedding_dropout"),
    "layer_norm_epsilon": _Keyword("layer_norm_epsilon"),
    "residual_in_fp32": _Keyword("residual_in_fp32"),
    "dropout_cls": _NO_EFFECT,  # accepted and never used by the original
    "fused_mlp": _NO_EFFECT,
    "fused_dropout_add_ln": _NO_EFFECT,
}
# ssm_cfg: H3's keywords, then SSKernel's and SSKernelDiag's (its **kernel_args).
_SSM: dict[str, _Keyword] = {
    "d_state": _Keyword("d_state"),
    "head_dim": _Keyword("head_dim"),
    "mode": _Keyword("ssm_mode"),
    "measure": _Keyword("ssm_measure"),
    "disc": _Keyword("discretisation"),
    "l_max": _only(lambda v: v is None, "truncated SSM kernels are not implemented; use None"
                   " (a global kernel, as every release)"),
    "n_ssm": _only(lambda v: v is None, "A and B shared across channels are not implemented;"
                   " use None (every release)"),
    "real_type": _only(lambda v: v == "exp", "only 'exp' (A = -exp(inv_A_real) + i A_imag, every"
                       " release) is implemented"),
    "bandlimit": _only(lambda v: v is None, "band-limited kernels are not implemented; use None"),
    "force_real": _only(_FALSE, "real-valued A is not implemented; use False"),
    **dict.fromkeys(("use_fast_fftconv", "dropout", "lr", "dt_min", "dt_max", "deterministic",
                     "rank", "measure_args", "verbose", "device", "dtype"), _NO_EFFECT),
}
# attn_cfg: flash-attn's MHA (v0.2.8, the version H3 pins).
_ATTN: dict[str, _Keyword] = {
    "num_heads": _Keyword("num_attention_heads"),
    "rotary_emb_dim": _Keyword("rotary_emb_dim"),
    "softmax_scale": _Keyword("attention_softmax_scale"),
    "causal": _only(lambda v: v is True, "a language model needs causal attention; use True"),
    "rotary_emb_scale_base": _only(_FALSE, "XPos (scaled rotary embeddings) is not implemented;"
                                   " use 0"),
    "dropout": _only(_FALSE, "attention-weight dropout is not implemented; it acts only in"
                     " training, so set 0.0 to load the model for inference"),
    "bias": _only(lambda v: v is True, "Wqkv without a bias is not implemented; use True"),
    "cross_attn": _only(_FALSE, "cross-attention has no place in a language model; use False"),
    "dwconv": _only(_FALSE, "the depthwise convolution after Wqkv is not implemented; use False"),
    "return_residual": _only(_FALSE, "use False (the original's Block needs it so)"),
    **dict.fromkeys(("fused_bias_fc", "use_flash_attn", "checkpointing", "device", "dtype"),
                    _NO_EFFECT),
}
_INITIALIZER: dict[str, _Keyword] = {
    name: _Keyword(name) for name in ("initializer_range", "rescale_prenorm_residual", "glu_act")
}
_NESTED = {"ssm_cfg": _SSM, "attn_cfg": _ATTN, "initializer_cfg": _INITIALIZER}

# Flat keys of our fixtures' configs (not keywords of the original, which
# ignores them): each is a nested keyword written at the top level.
_FLAT_ALIASES = {
    "num_heads": ("attn_cfg", "num_heads"),
    "rotary_emb_dim": ("attn_cfg", "rotary_emb_dim"),
    "rotary_emb_scale_base": ("attn_cfg", "rotary_emb_scale_base"),
    "d_state": ("ssm_cfg", "d_state"),
    "head_dim": ("ssm_cfg", "head_dim"),
    "ssm_mode": ("ssm_cfg", "mode"),
    "ssm_measure": ("ssm_cfg", "measure"),
    "disc": ("ssm_cfg", "disc"),
}
# Flat descriptions of what the original always does, checked against it.
_FLAT_FACTS: dict[str, _Keyword] = {
    "tie_embeddings": _only(lambda v: v is True, "the original always ties the head to the"
                            " embedding"),
    "rotary_emb_base": _only(lambda v: v == 10000, "flash-attn's MHA always uses base 10000"),
    "rotary_style": _NO_EFFECT,  # prose
}
# The original's defaults where they differ from H3Config's (which are the
# released 125M's and ours).
_ORIGINAL_DEFAULTS = {"attn_layer_idx": (), "residual_in_fp32": False}
_REQUIRED = ("d_model", "n_layer", "vocab_size")


def _apply(table: Mapping[str, _Keyword], values: Mapping[str, Any], where: str,
           fields: dict, errors: list) -> None:
    """Checks `values` against `table`, adding the fields they set."""
    for key, value in values.items():
        rule = table.get(key)
        if rule is None:
            errors.append(f"{where}[{key!r}] is not a keyword the original accepts"
                          f" (known: {sorted(table)})")
        elif rule.supported is not None and not rule.supported(value):
            errors.append(f"{where}[{key!r}]={value!r} is not supported: {rule.why}")
        elif rule.field is not None:
            fields[rule.field] = value


def _merge_flat_aliases(values: dict, errors: list) -> dict[str, dict]:
    """The nested dicts, with the flat aliases moved in (they must agree)."""
    nested = {name: dict(values.get(name) or {}) for name in _NESTED}
    for flat, (name, key) in _FLAT_ALIASES.items():
        if flat not in values:
            continue
        if key in nested[name] and nested[name][key] != values[flat]:
            errors.append(f"{flat}={values[flat]!r} contradicts {name}[{key!r}]={nested[name][key]!r}")
        nested[name].setdefault(key, values[flat])
    return nested


def _padded_vocab(values: Mapping[str, Any], errors: list) -> int | None:
    """The embedding's rows: vocab_size rounded up as SSMLMHeadModel does
    (``pad_vocab_size_multiple`` defaults to 1), or an explicit flat
    ``padded_vocab_size`` when no multiple is given."""
    padded = values.get("padded_vocab_size")
    if "vocab_size" not in values or (padded is not None and "pad_vocab_size_multiple" not in values):
        return padded
    multiple = values.get("pad_vocab_size_multiple", 1)
    rounded = -(-values["vocab_size"] // multiple) * multiple
    if padded is not None and padded != rounded:
        errors.append(f"padded_vocab_size={padded} but vocab_size {values['vocab_size']}"
                      f" padded to a multiple of {multiple} is {rounded}")
    return rounded


_ORIGINAL_KEYS = set(_TOP) | set(_NESTED) | set(_FLAT_ALIASES) | set(_FLAT_FACTS) | {
    "vocab_size", "pad_vocab_size_multiple", "padded_vocab_size", "position_embeddings"}


def _check_keys(values: Mapping[str, Any], errors: list) -> None:
    missing = [k for k in _REQUIRED if k not in values and not (
        k == "vocab_size" and "padded_vocab_size" in values)]
    if missing:
        errors.append(f"missing {missing} (SSMLMHeadModel's required keywords)")
    # "_name_" (Hydra) and other "_" keys are metadata.
    unknown = sorted(k for k in values if k not in _ORIGINAL_KEYS and not k.startswith("_"))
    if unknown:
        # The original takes them in **kwargs and ignores them; say so, as
        # they may be misspellings.
        warnings.warn(
            f"ignoring keys {unknown} of the original H3 config (SSMLMHeadModel ignores unknown"
            f" keywords too); check their spelling against {sorted(_TOP)}.",
            stacklevel=3,
        )


def config_from_original(values: Mapping[str, Any]) -> h3.H3Config:
    """An `H3Config` from the original model's keywords, as
    ``SSMLMHeadModel(**values)`` takes them (nested ``ssm_cfg``, ``attn_cfg``,
    ``initializer_cfg``), with the original's defaults for absent ones.

    Every keyword of the original is either mapped, or checked to have a
    value we reproduce (one error line lists those that do not), or has no
    effect on a loaded model (fused or flash kernels of the same math,
    placement, per-parameter learning rates, initialisation options whose
    values the checkpoint holds). Flat keys of older configs (``num_heads``,
    ``d_state``, ``disc``, ``padded_vocab_size``, ...) are read too and must
    agree with the nested ones. Other keys are ignored with a warning, as the
    original ignores them.

    Raises:
      ValueError: one line naming every unsupported value.
    """
    values = dict(values)
    errors: list[str] = []
    _check_keys(values, errors)
    fields = dict(_ORIGINAL_DEFAULTS)
    _apply(_TOP, {k: v for k, v in values.items() if k in _TOP}, "config", fields, errors)
    _apply(_FLAT_FACTS, {k: v for k, v in values.items() if k in _FLAT_FACTS}, "config", fields,
           errors)
    for name, nested in _merge_flat_aliases(values, errors).items():
        _apply(_NESTED[name], nested, name, fields, errors)
    fields["attn_layer_idx"] = tuple(fields.get("attn_layer_idx") or ())
    if not fields["attn_layer_idx"]:
        fields["num_attention_heads"] = 1  # no attention layer has heads
    elif "num_attention_heads" not in fields:
        errors.append("attn_cfg['num_heads'] is missing: the original's MHA has no default")
    # softmax_scale None or 0 means 1/sqrt(head_dim) in the original (`or`).
    fields["attention_softmax_scale"] = fields.get("attention_softmax_scale") or None
    if "position_embeddings" in values and values["position_embeddings"] != (
        fields.get("max_position_embeddings", 0) > 0
    ):
        errors.append(f"position_embeddings={values['position_embeddings']!r} contradicts"
                      f" max_position_embeddings={fields.get('max_position_embeddings', 0)}")
    padded = _padded_vocab(values, errors)
    if padded is not None:
        fields["vocab_size"] = padded
    if errors:
        raise ValueError(f"original H3 config: {'; '.join(errors)}.")
    return h3.H3Config(**fields)


def resolve_config(config) -> h3.H3Config:
    """`H3Config`, preset name, original config dict, or `H3Config.to_dict()` dict."""
    if isinstance(config, h3.H3Config):
        return config
    if isinstance(config, str):
        return h3.H3Config.from_preset(config)
    if isinstance(config, Mapping):
        # A keyword of the original that is no H3Config field (d_model,
        # n_layer, ssm_cfg, ...) marks the original's form.
        ours = {f.name for f in dataclasses.fields(h3.H3Config)}
        if (set(config) & _ORIGINAL_KEYS) - ours:
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
    wrong = _wrong_rotary_buffers(state, config)
    if head is not None and EMBEDDING in state and not np.array_equal(head, state[EMBEDDING]):
        wrong[LM_HEAD] = (
            f"the tied embedding {EMBEDDING} (untied heads are not supported)",
            "a different matrix",
        )
    return common.load_model(
        state, leaf_layouts(config), config, h3.build_model, source=source, misshaped=wrong
    )


def rotary_inv_freq(dims: int) -> np.ndarray:
    """flash-attn's ``RotaryEmbedding.inv_freq`` buffer (float32), as it computes it."""
    return 1.0 / (10000 ** (np.arange(0, dims, 2, dtype=np.float32) / dims))


def _wrong_rotary_buffers(state: dict, config: h3.H3Config) -> dict[str, tuple[str, str]]:
    """Pops the attention layers' ``rotary_emb.inv_freq`` buffers (we compute
    the frequencies), returning those that are not the ones we compute."""
    if not config.rotary_emb_dim:
        return {}  # a buffer left in the dict is then reported as unexpected
    dims = config.rotary_emb_dim
    expected = rotary_inv_freq(dims)
    wrong = {}
    for i in config.attn_layer_idx:
        name = INV_FREQ.format(i)
        found = state.pop(name, None)
        if found is not None and (found.shape != expected.shape
                                  or not np.allclose(found, expected, rtol=1e-6, atol=0)):
            wrong[name] = (f"1/10000^(2j/{dims}) for j < {dims // 2} (rotary_emb_dim {dims})",
                           f"{found.shape} {np.asarray(found).ravel()[:4]}...")
    return wrong


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


def is_original_checkpoint(path: str | os.PathLike) -> bool:
    """A released H3 weights file: its names hold the original's
    ``backbone.embeddings.word_embeddings.weight`` (optionally under ``model.``
    or a Lightning ``state_dict``)."""
    names = common.weight_names(path)
    return names is not None and any(n.endswith(EMBEDDING) for n in names)


def to_original_state_dict(
    model, *, include_lm_head: bool = True
) -> dict[str, np.ndarray]:
    """Our H3 -> the released names (numpy arrays; the exact inverse of loading),
    with the rotary ``inv_freq`` buffers of attention layers that have them."""
    config = common.config_of(model, h3.H3Config, "an H3 model")
    leaves = common.export_leaves(model, leaf_layouts(config))
    state = {name: np.asarray(leaf) for name, leaf in leaves.items()}
    if include_lm_head:
        state[LM_HEAD] = state[EMBEDDING].copy()  # a copy: safetensors refuses shared storage
    if config.rotary_emb_dim:  # a persistent buffer: the original's strict load needs it
        for i in config.attn_layer_idx:
            state[INV_FREQ.format(i)] = rotary_inv_freq(config.rotary_emb_dim)
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
