"""RWKV checkpoints <-> our RWKV-4 and RWKV-7: HF transformers and BlinkDL's ``.pth``.

* HF (``RwkvForCausalLM``, RWKV-4): a directory with ``config.json`` and
  ``model.safetensors`` (or a sharded ``model.safetensors.index.json``, or
  ``pytorch_model.bin``). Names ``rwkv.blocks.3.attention.time_decay`` ...
* BlinkDL (RWKV-LM / ChatRWKV): one ``torch.save`` state dict
  (``emb.weight``, ``blocks.3.att.time_decay`` ...); the config is inferred
  from the shapes. RWKV-7 ("x070") files are told from RWKV-4 ones by their
  keys (``blocks.0.att.r_k``) and load as `recurrent_lm.models.rwkv7`: his
  names, (1, 1, C) vectors, low-rank pairs ``w1`` (C, D) / ``w2`` (D, C) used
  as ``x @ w1 @ w2``, linear weights [out, in]; `save_blinkdl_checkpoint`
  writes either family back exactly.

Values are stored raw in both (``time_decay`` before ``-exp``; ``time_mix_*``
as (1, 1, C)); linear weights are torch's [out, in], as ours. torch is needed
only to read pickled files (``.bin`` / ``.pth``). Also: the GPT-NeoX-20B
tokenizer (``tokenizer.json``) of the Pile models, via `tokenizers`.

CLI::

    python -m checkpoints_conversion.rwkv convert SRC DST   # HF dir or .pth -> recurrent_lm.save dir
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from checkpoints_conversion import common
from checkpoints_conversion.common import LeafLayout
from recurrent_lm import axes
from recurrent_lm.core.config import PARAM_DTYPES
from recurrent_lm.models import rwkv, rwkv7

E, V, A, F = axes.EMBEDDING, axes.VOCABULARY, axes.WKV, axes.MLP
HF_SOURCE = "HF RWKV checkpoint"
BLINKDL_SOURCE = "BlinkDL RWKV-4 checkpoint"
BLINKDL7_SOURCE = "BlinkDL RWKV-7 checkpoint"
# Fields of HF's config.json that RwkvConfig shares.
_HF_FIELDS = (
    "vocab_size",
    "context_length",
    "hidden_size",
    "num_hidden_layers",
    "attention_hidden_size",
    "intermediate_size",
    "layer_norm_epsilon",
    "bos_token_id",
    "eos_token_id",
    "rescale_every",
    "tie_word_embeddings",
)
_BLOCK = re.compile(r"^rwkv\.blocks\.(\d+)\.")


def leaf_layouts(config: rwkv.RwkvConfig) -> list[LeafLayout]:
    """Every leaf of the HF state dict for `config`, with our labels."""
    layouts = [
        LeafLayout("rwkv.embeddings.weight", ("embeddings.embeddings",), (V, E)),
        LeafLayout("rwkv.blocks.0.pre_ln.weight", ("blocks.0.pre_ln.scale",), (E,)),
        LeafLayout("rwkv.blocks.0.pre_ln.bias", ("blocks.0.pre_ln.bias",), (E,)),
        LeafLayout("rwkv.ln_out.weight", ("ln_out.scale",), (E,)),
        LeafLayout("rwkv.ln_out.bias", ("ln_out.bias",), (E,)),
    ]
    if not config.tie_word_embeddings:
        layouts.append(LeafLayout("head.weight", ("head.weights",), (V, E)))
    for i in range(config.num_hidden_layers):
        leaf = lambda path, label, dims, i=i: layouts.append(
            LeafLayout(f"rwkv.blocks.{i}.{path}", (f"blocks.{i}.{label}",), dims)
        )
        for ln in ("ln1", "ln2"):
            leaf(f"{ln}.weight", f"{ln}.scale", (E,))
            leaf(f"{ln}.bias", f"{ln}.bias", (E,))
        leaf("attention.time_decay", "attention.time_decay", (A,))
        leaf("attention.time_first", "attention.time_first", (A,))
        for name in ("key", "value", "receptance"):
            leaf(f"attention.time_mix_{name}", f"attention.time_mix_{name}", (1, 1, E))
            leaf(f"attention.{name}.weight", f"attention.{name}.weights", (A, E))
        leaf("attention.output.weight", "attention.output.weights", (E, A))
        for name in ("key", "receptance"):
            leaf(
                f"feed_forward.time_mix_{name}",
                f"feed_forward.time_mix_{name}",
                (1, 1, E),
            )
        leaf("feed_forward.key.weight", "feed_forward.key.weights", (F, E))
        leaf(
            "feed_forward.receptance.weight",
            "feed_forward.receptance.weights",
            (E, axes.EMBEDDING_IN),
        )
        leaf("feed_forward.value.weight", "feed_forward.value.weights", (E, F))
    return layouts


def from_hf_state_dict(
    state_dict: Mapping[str, Any],
    config: rwkv.RwkvConfig,
    *,
    source: str = HF_SOURCE,
):
    """An HF ``RwkvForCausalLM`` state dict -> our RWKV (`DecoderLM`).

    Args:
      state_dict: ``{name: tensor or array}`` (torch tensors are converted).
        Take it before any eval-mode HF forward: HF then rescales weights in
        place (``rescale_every``).
      config: the model's config (with its build options, e.g.
        ``scan_method``); leaves are cast to ``config.param_dtype``.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        name, with expected and found shapes.
    """
    leaves = dict(state_dict)
    if config.tie_word_embeddings:
        leaves.pop("head.weight", None)  # the same tensor as the embeddings
    return common.load_model(leaves, leaf_layouts(config), config, rwkv.build_model, source=source)


def to_hf_state_dict(model) -> dict[str, np.ndarray]:
    """Our RWKV -> an HF state dict of numpy arrays (the inverse of loading)."""
    config = common.config_of(model, rwkv.RwkvConfig, "an RWKV model")
    leaves = common.export_leaves(model, leaf_layouts(config))
    return {name: np.asarray(leaf) for name, leaf in leaves.items()}


def config_from_hf(values: Mapping[str, Any], **overrides) -> rwkv.RwkvConfig:
    """An `RwkvConfig` from HF's config.json contents (other HF keys are ignored)."""
    fields = {k: values[k] for k in _HF_FIELDS if k in values and values[k] is not None}
    for k in ("bos_token_id", "eos_token_id"):
        if isinstance(fields.get(k), list):  # HF allows a list of eos ids
            fields[k] = fields[k][0]
    return rwkv.RwkvConfig(**{**fields, **overrides})


def hf_config_dict(config: rwkv.RwkvConfig) -> dict[str, Any]:
    """HF's config.json contents for `config`."""
    values = {k: getattr(config, k) for k in _HF_FIELDS}
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "dtype": config.param_dtype,
        **values,
    }


def read_hf_weights(directory: str) -> dict[str, Any]:
    """The state dict of an HF checkpoint directory (safetensors preferred)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return common.read_weights(path)
    raise FileNotFoundError(
        f"{directory} has no model.safetensors, model.safetensors.index.json or"
        " pytorch_model.bin."
    )


def load_hf_checkpoint(directory: str | os.PathLike, **config_overrides):
    """Loads an HF RWKV-4 directory (``config.json`` + weights).

    ``param_dtype`` defaults to the dtype of the stored embeddings; any
    `RwkvConfig` field can be overridden (leaves are cast to ``param_dtype``;
    ``scan_method`` picks the WKV scan).
    """
    directory = os.fspath(directory)
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{config_file} not found: not an HF checkpoint directory."
        )
    with open(config_file) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type", "rwkv") != "rwkv":
        raise ValueError(
            f"{config_file} has model_type {hf_config['model_type']!r}, not 'rwkv'."
        )
    state = read_hf_weights(directory)
    if "param_dtype" not in config_overrides and "rwkv.embeddings.weight" in state:
        config_overrides["param_dtype"] = jnp.dtype(
            state["rwkv.embeddings.weight"].dtype
        ).name
    config = config_from_hf(hf_config, **config_overrides)
    return from_hf_state_dict(state, config, source=f"{HF_SOURCE} {directory}")


def save_hf_checkpoint(model, directory: str | os.PathLike) -> None:
    """Writes `model` as an HF directory: ``config.json`` + ``model.safetensors``."""
    directory = os.fspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists; choose a new directory.")
    state = to_hf_state_dict(model)
    os.makedirs(directory)
    common.write_weights(
        state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}
    )
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(model.config), f, indent=1)


# ---------------------------------------------------------------------------
# BlinkDL's original names.
# ---------------------------------------------------------------------------

_BLINKDL_RENAMES = (
    (re.compile(r"^emb\.weight$"), "rwkv.embeddings.weight"),
    (re.compile(r"^blocks\.0\.ln0\."), "rwkv.blocks.0.pre_ln."),
    (re.compile(r"^blocks\.(\d+)\.att\."), r"rwkv.blocks.\1.attention."),
    (re.compile(r"^blocks\.(\d+)\.ffn\."), r"rwkv.blocks.\1.feed_forward."),
    (re.compile(r"^(blocks\.\d+\.ln[12]\.|ln_out\.)"), r"rwkv.\1"),
)
_TIME_MIX = re.compile(r"\.time_mix_([kvr])$")
_TIME_MIX_NAMES = {"k": "key", "v": "value", "r": "receptance"}


def blinkdl_to_hf_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """BlinkDL names -> HF names (values untouched; unknown names kept as they are)."""
    renamed = {}
    for name, value in state_dict.items():
        new = name
        for pattern, replacement in _BLINKDL_RENAMES:
            new = pattern.sub(replacement, new)
        new = _TIME_MIX.sub(lambda m: f".time_mix_{_TIME_MIX_NAMES[m.group(1)]}", new)
        renamed[new] = value
    return renamed


def hf_to_blinkdl_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """HF names -> BlinkDL names (the inverse of `blinkdl_to_hf_names`)."""
    out = {}
    for name, value in state_dict.items():
        new = name.replace("rwkv.embeddings.weight", "emb.weight").replace(
            ".pre_ln.", ".ln0."
        )
        new = new.replace(".attention.", ".att.").replace(".feed_forward.", ".ffn.")
        new = re.sub(
            r"\.time_mix_(key|value|receptance)$",
            lambda m: f".time_mix_{m.group(1)[0]}",
            new,
        )
        out[new.removeprefix("rwkv.")] = value
    return out


def infer_config(state_dict: Mapping[str, Any], **overrides) -> rwkv.RwkvConfig:
    """An `RwkvConfig` from the shapes of an HF-named state dict, plus `overrides`.

    Fields the shapes cannot give (context_length, epsilon, special ids,
    rescale_every) take the Pile models' values.
    """
    common.require_leaves(
        state_dict,
        [
            "rwkv.embeddings.weight",
            "rwkv.blocks.0.attention.time_decay",
            "rwkv.blocks.0.feed_forward.key.weight",
        ],
        source=BLINKDL_SOURCE,
    )
    shape = lambda name: tuple(np.shape(state_dict[name]))
    vocab, hidden = shape("rwkv.embeddings.weight")
    inferred = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": common.count_numbered(state_dict, _BLOCK, "blocks"),
        "attention_hidden_size": shape("rwkv.blocks.0.attention.time_decay")[0],
        "intermediate_size": shape("rwkv.blocks.0.feed_forward.key.weight")[0],
        "tie_word_embeddings": "head.weight" not in state_dict,
        "param_dtype": jnp.dtype(
            common.to_numpy(state_dict["rwkv.embeddings.weight"]).dtype
        ).name,
    }
    return rwkv.RwkvConfig(**{**inferred, **overrides})


def from_blinkdl_state_dict(
    state_dict: Mapping[str, Any],
    config: rwkv.RwkvConfig | rwkv7.Rwkv7Config | None = None,
    *,
    source: str | None = None,
    **config_overrides,
):
    """A BlinkDL state dict -> our RWKV-4 or RWKV-7 (told apart by the keys,
    `is_rwkv7_state_dict`); `config` None: inferred from the shapes."""
    if is_rwkv7_state_dict(state_dict):
        return from_blinkdl7_state_dict(
            state_dict, config, source=source or BLINKDL7_SOURCE, **config_overrides
        )
    source = source or BLINKDL_SOURCE
    if config is not None and not isinstance(config, rwkv.RwkvConfig):
        raise TypeError(f"{source} holds RWKV-4 weights; got a {type(config).__name__}.")
    hf = blinkdl_to_hf_names(state_dict)
    if config is None:
        config = infer_config(hf, **config_overrides)
    elif config_overrides:
        raise ValueError("pass either config or config overrides, not both.")
    return from_hf_state_dict(hf, config, source=source)


def load_blinkdl_checkpoint(
    path: str | os.PathLike,
    config: rwkv.RwkvConfig | rwkv7.Rwkv7Config | None = None,
    **config_overrides,
):
    """Loads BlinkDL's ``.pth`` (a ``torch.save`` state dict; needs torch) or a
    ``.safetensors`` file with the same names: an RWKV-4 or an RWKV-7 model,
    whichever the keys say."""
    path = os.fspath(path)
    state = common.read_weights(path)
    family = BLINKDL7_SOURCE if is_rwkv7_state_dict(state) else BLINKDL_SOURCE
    return from_blinkdl_state_dict(
        state,
        config,
        source=f"{family} {path}",
        **config_overrides,
    )


def is_blinkdl_checkpoint(path: str | os.PathLike) -> bool:
    """A file (``.pth`` or ``.safetensors``) with BlinkDL's RWKV-4 names
    (``emb.weight``, ``blocks.0.att.time_decay``), read from its index only
    (torch's mmap)."""
    names = common.weight_names(path)
    return names is not None and {"emb.weight", "blocks.0.att.time_decay"} <= names


def is_blinkdl7_checkpoint(path: str | os.PathLike) -> bool:
    """A file with BlinkDL's RWKV-7 names (``emb.weight``, ``blocks.0.att.r_k``)."""
    names = common.weight_names(path)
    return names is not None and {"emb.weight", _RWKV7_MARKER} <= names


def save_blinkdl_checkpoint(model, path: str | os.PathLike) -> None:
    """Writes `model` as BlinkDL's ``.pth`` (needs torch), loadable by his
    runtime (PyPI ``rwkv``: ``RWKV(path_without_pth, "cpu fp32")``).

    BlinkDL files have no tying: a tied model is written with ``head.weight``
    a copy of the embeddings (his runtime requires it), so it loads back untied
    with the same numbers. An RWKV-7 model is written in his x070 layout.
    """
    if isinstance(getattr(model, "config", None), rwkv7.Rwkv7Config):
        state = to_blinkdl7_state_dict(model)
        if "head.weight" not in state:
            state["head.weight"] = state["emb.weight"]
        common.write_weights(state, path)
        return
    state = to_hf_state_dict(model)
    if "head.weight" not in state:
        state["head.weight"] = state["rwkv.embeddings.weight"]
    common.write_weights(hf_to_blinkdl_names(state), path)


# ---------------------------------------------------------------------------
# RWKV-7 (x070): BlinkDL's names are the only format.
# ---------------------------------------------------------------------------

H, N_KEY, N_VALUE, D = axes.HEADS, axes.STATE, axes.PROJECTION, axes.LOW_RANK
_RWKV7_MARKER = "blocks.0.att.r_k"
_BLINKDL_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def is_rwkv7_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether BlinkDL names are RWKV-7's (``blocks.0.att.r_k``; RWKV-4 has
    ``time_decay`` instead)."""
    return _RWKV7_MARKER in state_dict


def rwkv7_leaf_layouts(config: rwkv7.Rwkv7Config) -> list[LeafLayout]:
    """Every leaf of BlinkDL's x070 state dict for `config`, with our labels."""
    keys, values = (H, N_KEY), (H, N_VALUE)
    layouts = [
        LeafLayout("emb.weight", ("embeddings.embeddings",), (V, E)),
        LeafLayout("blocks.0.ln0.weight", ("blocks.0.ln0.scale",), (E,)),
        LeafLayout("blocks.0.ln0.bias", ("blocks.0.ln0.bias",), (E,)),
        LeafLayout("ln_out.weight", ("ln_out.scale",), (E,)),
        LeafLayout("ln_out.bias", ("ln_out.bias",), (E,)),
    ]
    if not config.tie_word_embeddings:
        layouts.append(LeafLayout("head.weight", ("head.weights",), (V, E)))
    for i in range(config.num_hidden_layers):
        leaf = lambda path, label, dims, i=i: layouts.append(
            LeafLayout(f"blocks.{i}.{path}", (f"blocks.{i}.{label}",), dims)
        )
        for ln in ("ln1", "ln2"):
            leaf(f"{ln}.weight", f"{ln}.scale", (E,))
            leaf(f"{ln}.bias", f"{ln}.bias", (E,))
        for mix in ("r", "w", "k", "v", "a", "g"):
            leaf(f"att.x_{mix}", f"att.x_{mix}", (1, 1, E))
        for name in ("w0", "a0", "k_k", "k_a"):
            leaf(f"att.{name}", f"att.{name}", (1, 1, keys))
        leaf("att.r_k", "att.r_k", (H, N_KEY))
        pairs = {"w": keys, "a": keys, "g": values}
        if i > 0 or config.first_layer_value_gate:
            leaf("att.v0", "att.v0", (1, 1, values))
            pairs["v"] = values
        for name, out in pairs.items():
            leaf(f"att.{name}1", f"att.{name}1.weights", (E, D))
            leaf(f"att.{name}2", f"att.{name}2.weights", (D, out))
        for name, out in (("receptance", keys), ("key", keys), ("value", values)):
            leaf(f"att.{name}.weight", f"att.{name}.weights", (out, E))
        leaf("att.output.weight", "att.output.weights", (E, values))
        leaf("att.ln_x.weight", "att.ln_x.scale", (values,))
        leaf("att.ln_x.bias", "att.ln_x.bias", (values,))
        leaf("ffn.x_k", "ffn.x_k", (1, 1, E))
        leaf("ffn.key.weight", "ffn.key.weights", (F, E))
        leaf("ffn.value.weight", "ffn.value.weights", (E, F))
    return layouts


def infer_rwkv7_config(state_dict: Mapping[str, Any], **overrides) -> rwkv7.Rwkv7Config:
    """An `Rwkv7Config` from the shapes of BlinkDL's x070 state dict, plus
    `overrides` (epsilons and special ids take the released models' values)."""
    needed = ["emb.weight", _RWKV7_MARKER, "blocks.0.att.w1", "blocks.0.att.a1",
              "blocks.0.att.g1", "blocks.0.ffn.key.weight"]
    common.require_leaves(state_dict, needed, source=BLINKDL7_SOURCE)
    shape = lambda name: tuple(np.shape(state_dict[name]))
    vocab, hidden = shape("emb.weight")
    layers = common.count_numbered(state_dict, _BLINKDL_BLOCK, "blocks")
    # Block 0's value gate is optional; a later block's is not.
    value_gate = next(
        (f"blocks.{i}.att.v1" for i in (1, 0) if f"blocks.{i}.att.v1" in state_dict), None
    )
    inferred = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "head_size": shape(_RWKV7_MARKER)[-1],
        "decay_low_rank": shape("blocks.0.att.w1")[-1],
        "rate_low_rank": shape("blocks.0.att.a1")[-1],
        "value_low_rank": None if value_gate is None else shape(value_gate)[-1],
        "gate_low_rank": shape("blocks.0.att.g1")[-1],
        "intermediate_size": shape("blocks.0.ffn.key.weight")[0],
        "first_layer_value_gate": "blocks.0.att.v0" in state_dict,
        "tie_word_embeddings": "head.weight" not in state_dict,
        "param_dtype": jnp.dtype(common.to_numpy(state_dict["emb.weight"]).dtype).name,
    }
    return rwkv7.Rwkv7Config(**{**inferred, **overrides})


def from_blinkdl7_state_dict(
    state_dict: Mapping[str, Any],
    config: rwkv7.Rwkv7Config | None = None,
    *,
    source: str = BLINKDL7_SOURCE,
    **config_overrides,
):
    """BlinkDL's x070 state dict -> our RWKV-7; `config` None: inferred.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        name, with expected and found shapes.
    """
    if config is None:
        config = infer_rwkv7_config(state_dict, **config_overrides)
    elif config_overrides:
        raise ValueError("pass either config or config overrides, not both.")
    elif not isinstance(config, rwkv7.Rwkv7Config):
        raise TypeError(f"{source} holds RWKV-7 weights; got a {type(config).__name__}.")
    leaves = dict(state_dict)
    if config.tie_word_embeddings:
        leaves.pop("head.weight", None)  # the same tensor as the embeddings
    return common.load_model(
        leaves, rwkv7_leaf_layouts(config), config, rwkv7.build_model, source=source
    )


def to_blinkdl7_state_dict(model) -> dict[str, np.ndarray]:
    """Our RWKV-7 -> BlinkDL's x070 state dict (numpy; the inverse of loading)."""
    config = common.config_of(model, rwkv7.Rwkv7Config, "an RWKV-7 model")
    leaves = common.export_leaves(model, rwkv7_leaf_layouts(config))
    return {name: np.asarray(leaf) for name, leaf in leaves.items()}


# ---------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------


class NeoXTokenizer:
    """The GPT-NeoX-20B BPE tokenizer (``tokenizer.json``) the Pile models use.

    Same interface as `recurrent_lm.tokenizer.Tokenizer` (encode / decode /
    special ids). The Pile models use id 0 (``<|endoftext|>``) as both bos and
    eos and add none when encoding.
    """

    def __init__(self, tokenizer, *, eos_id: int = 0, bos_id: int = 0):
        self.tokenizer = tokenizer
        self._eos_id, self._bos_id = eos_id, bos_id

    @classmethod
    def load(cls, path: str | os.PathLike, **special_ids) -> NeoXTokenizer:
        """`path`: a ``tokenizer.json`` or a directory holding one."""
        from tokenizers import Tokenizer

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist.")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a tokenizers tokenizer.json: {e}") from e
        return cls(tokenizer, **special_ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def pad_id(self) -> int:
        return self._eos_id

    def encode(
        self, text: str, *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return (
            ([self.bos_id] if add_bos else [])
            + list(ids)
            + ([self.eos_id] if add_eos else [])
        )

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside [0, {self.vocab_size}).")
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike, **special_ids) -> NeoXTokenizer:
    """The GPT-NeoX-20B tokenizer from a ``tokenizer.json`` (or its directory)."""
    return NeoXTokenizer.load(path, **special_ids)


def load_checkpoint(path: str | os.PathLike, **kwargs):
    """An HF directory or a BlinkDL file, told apart by what `path` is."""
    return (load_hf_checkpoint if os.path.isdir(path) else load_blinkdl_checkpoint)(
        path, **kwargs
    )


def main(argv: list[str] | None = None) -> int:
    parser, convert = common.convert_parser(
        "rwkv", __doc__, source="HF checkpoint directory, or a BlinkDL .pth / .safetensors file"
    )
    common.add_config_flags(
        convert, rwkv.RwkvConfig, ["param_dtype"], param_dtype=PARAM_DTYPES
    )
    return common.run_convert(parser, argv, load_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
