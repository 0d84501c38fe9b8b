"""RecurrentGemma checkpoints <-> our Griffin: the official Flax (orbax) release
and HF transformers' ``RecurrentGemmaForCausalLM`` directories.

Official: the release is an orbax PyTree checkpoint whose root is the bare
parameter tree (``embedder``, ``final_norm``, ``blocks.N``); the official
package's own ``save_parameters`` wraps it in ``{"params": ...}``. Both roots
load. We do not use the official loader (``recurrentgemma.jax.load_parameters``),
which fails with orbax >= 0.11.22. The config is inferred from the shapes
(vocabulary, widths, heads, block types, conv width); fields the shapes cannot
give (window, soft cap, sqrt(D) scaling, RoPE, eps) default to the released
models' values and can be overridden with keyword arguments.

HF (`load_hf_checkpoint` / `save_hf_checkpoint`): ``config.json`` (model_type
``recurrent_gemma``) + ``model.safetensors`` or a sharded
``model.safetensors.index.json``, float32 or bfloat16, read lazily (one tensor
at a time). Names: ``model.layers.N.temporal_block.*``; ``nn.Linear``
weights [out, in]; the MLP as ``gate_proj`` / ``up_proj`` (HF's
``intermediate_size`` is both branches, twice ours); the conv as
``[L, 1, taps]``; ``rg_lru.recurrent_param`` (the official ``a_param``); the
head tied to the embeddings (no ``lm_head.weight``); norms zero-centred
(``1 + w``) in both. HF always scales the embeddings by bf16(sqrt(D)) and
always soft-caps, so a model without either cannot be saved in HF's format.

Attention window: our model keeps the OFFICIAL semantics: a token attends to
the ``attention_window_size`` = W previous tokens plus itself (W + 1 keys).
HF's port attends to W keys including the current one. The two agree only
while a sequence is no longer than W (2048 for the releases); beyond that a
converted model gives the official model's logits, not HF's. (HF's numbers
for any length are ours with ``attention_window_size=W - 1``.)

CLI (SRC: an official orbax directory, or an HF directory, told apart by its
``config.json``)::

    python -m checkpoints_conversion.recurrentgemma convert SRC DST [--attention-window-size N ...]
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_conversion import common
from checkpoints_conversion.common import LeafLayout, flatten, unflatten
from recurrent_lm import axes
from recurrent_lm.core.config import PARAM_DTYPES
from recurrent_lm.models import griffin
from recurrent_lm.params import parameter_values

E, V, L, M = axes.EMBEDDING, axes.VOCABULARY, axes.LRU, axes.MLP
H, KV, P = axes.HEADS, axes.KV_HEADS, axes.PROJECTION
SOURCE = "RecurrentGemma checkpoint"
HF_SOURCE = "HF RecurrentGemma checkpoint"
HF_MODEL_TYPE = "recurrent_gemma"
_BLOCK = re.compile(r"^blocks\.(\d+)/")


def leaf_layouts(config: griffin.GriffinConfig) -> list[LeafLayout]:
    """Every leaf of the official tree for `config`, with our labels."""
    layouts = [
        LeafLayout("embedder/input_embedding", ("embedder.embeddings",), (V, E)),
        LeafLayout("final_norm/scale", ("final_norm.scale",), (E,)),
    ]
    for i, block_type in enumerate(config.block_types):
        src, dst = f"blocks.{i}", f"blocks.{i}"
        leaf = lambda path, labels, dims: layouts.append(
            LeafLayout(f"{src}/{path}", tuple(f"{dst}.{x}" for x in labels), dims)
        )
        leaf("temporal_pre_norm/scale", ["temporal_pre_norm.scale"], (E,))
        leaf("channel_pre_norm/scale", ["channel_pre_norm.scale"], (E,))
        leaf("mlp_block/ffw_up/w", ["mlp_block.gate.weights", "mlp_block.up.weights"], (E, M))
        leaf("mlp_block/ffw_up/b", ["mlp_block.gate.bias", "mlp_block.up.bias"], (1, 1, M))
        leaf("mlp_block/ffw_down/kernel", ["mlp_block.down.weights"], (M, E))
        leaf("mlp_block/ffw_down/bias", ["mlp_block.down.bias"], (E,))
        if block_type == griffin.RECURRENT:
            rec = "recurrent_block"
            for dense_name, (d_in, d_out) in (
                ("linear_y", (E, L)), ("linear_x", (E, L)), ("linear_out", (L, E)),
            ):
                leaf(f"{rec}/{dense_name}/kernel", [f"{rec}.{dense_name}.weights"], (d_in, d_out))
                leaf(f"{rec}/{dense_name}/bias", [f"{rec}.{dense_name}.bias"], (d_out,))
            leaf(f"{rec}/conv_1d/w", [f"{rec}.conv_1d.weights"], (axes.CONV_TAPS, L))
            leaf(f"{rec}/conv_1d/b", [f"{rec}.conv_1d.bias"], (L,))
            leaf(f"{rec}/rg_lru/a_param", [f"{rec}.rg_lru.a_param"], (L,))
            for gate in ("input_gate", "a_gate"):
                leaf(f"{rec}/rg_lru/{gate}/w", [f"{rec}.rg_lru.{gate}.weights"],
                     (H, axes.BLOCK_IN, axes.BLOCK_OUT))
                leaf(f"{rec}/rg_lru/{gate}/b", [f"{rec}.rg_lru.{gate}.bias"], (H, axes.BLOCK_OUT))
        else:
            att = "attention_block"
            leaf(f"{att}/proj_q/kernel", [f"{att}.query.weights"], (E, (H, P)))
            leaf(f"{att}/proj_k/kernel", [f"{att}.key.weights"], (E, (KV, P)))
            leaf(f"{att}/proj_v/kernel", [f"{att}.value.weights"], (E, (KV, P)))
            leaf(f"{att}/proj_final/kernel", [f"{att}.output.weights"], ((H, P), E))
            leaf(f"{att}/proj_final/bias", [f"{att}.output.bias"], (E,))
    return layouts


def _strip_root(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accepts the release's bare tree and the official package's {"params": tree}."""
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        return params["params"]
    return params


def infer_config(params: Mapping[str, Any], **overrides) -> griffin.GriffinConfig:
    """A `GriffinConfig` from the shapes of an official tree, plus `overrides`."""
    flat = flatten(_strip_root(params))
    shape = lambda path: tuple(np.shape(flat[path]))
    common.require_leaves(
        flat, ["embedder/input_embedding", "blocks.0/mlp_block/ffw_up/w"], source=SOURCE
    )
    inferred: dict[str, Any] = {}
    inferred["vocab_size"], inferred["hidden_size"] = shape("embedder/input_embedding")
    inferred["intermediate_size"] = shape("blocks.0/mlp_block/ffw_up/w")[-1]
    block_types = []
    for i in range(common.count_numbered(flat, _BLOCK, "blocks")):
        if f"blocks.{i}/recurrent_block/rg_lru/a_gate/w" in flat:
            block_types.append(griffin.RECURRENT)
            if "lru_width" not in inferred:  # the first recurrent block decides
                heads, block, _ = shape(f"blocks.{i}/recurrent_block/rg_lru/a_gate/w")
                inferred["num_attention_heads"], inferred["lru_width"] = heads, heads * block
                if f"blocks.{i}/recurrent_block/conv_1d/w" in flat:
                    inferred["conv1d_width"] = shape(f"blocks.{i}/recurrent_block/conv_1d/w")[0]
        elif f"blocks.{i}/attention_block/proj_k/kernel" in flat:
            block_types.append(griffin.ATTENTION)
        else:
            keys = sorted(k.split("/", 1)[1] for k in flat if k.startswith(f"blocks.{i}/"))
            raise ValueError(
                f"cannot tell the type of blocks.{i}: it has neither"
                f" recurrent_block/rg_lru/a_gate/w nor attention_block/proj_k/kernel"
                f" (found {keys})."
            )
    inferred["block_types"] = tuple(block_types)
    inferred["num_hidden_layers"] = len(block_types)
    if "num_attention_heads" not in inferred and griffin.ATTENTION in block_types:
        # Attention only: proj_k is [D, kv_heads * head_dim].
        i = block_types.index(griffin.ATTENTION)
        kv_dim = shape(f"blocks.{i}/attention_block/proj_k/kernel")[1]
        head_dim = kv_dim // overrides.get("num_key_value_heads", 1)
        inferred["num_attention_heads"] = inferred["hidden_size"] // head_dim
    inferred["param_dtype"] = jnp.dtype(flat["embedder/input_embedding"].dtype).name
    return griffin.GriffinConfig(**{**inferred, **overrides})


def from_official_params(params: Mapping[str, Any], **config_overrides):
    """An official parameter tree -> our Griffin (`DecoderLM`).

    Args:
      params: the official tree (bare, or under "params"), leaves array-like.
      **config_overrides: `GriffinConfig` fields, e.g. ``attention_window_size``,
        ``param_dtype`` (leaves are cast to it) or ``scan_method``.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        leaf, with expected and found shapes.
    """
    config = infer_config(params, **config_overrides)
    return common.load_model(
        flatten(_strip_root(params)),
        leaf_layouts(config),
        config,
        griffin.build_model,
        source=SOURCE,
    )


def to_official_params(model) -> dict[str, Any]:
    """Our Griffin -> the official bare tree (the exact inverse of loading)."""
    config = common.config_of(model, griffin.GriffinConfig, "a Griffin model")
    return unflatten(common.export_leaves(model, leaf_layouts(config)))


def load_official_checkpoint(
    path: str,
    *,
    sharding: jax.sharding.Sharding | None = None,
    **config_overrides,
):
    """Loads an official RecurrentGemma orbax checkpoint directory.

    Args:
      path: the checkpoint directory (e.g. ``.../recurrentgemma/flax/2b/2b``).
      sharding: where to place the restored leaves (default: first local device).
      **config_overrides: see `from_official_params`.
    """
    return from_official_params(
        common.restore_orbax_tree(str(path), sharding), **config_overrides
    )


# ---------------------------------------------------------------------------
# HF transformers (RecurrentGemmaForCausalLM).
# ---------------------------------------------------------------------------

# HF's tanh-approximated GELUs (the official model's); another activation is an error.
_HF_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")
_HF_FIELDS = (  # config.json keys that GriffinConfig shares, with the same meaning
    "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
    "attention_window_size", "conv1d_width", "logits_soft_cap", "rms_norm_eps",
)


def hf_leaf_layouts(config: griffin.GriffinConfig) -> list[LeafLayout]:
    """Every tensor of HF's ``RecurrentGemmaForCausalLM`` state dict for
    `config` (the tied ``lm_head.weight`` aside), with our labels."""
    layouts = [
        LeafLayout("model.embed_tokens.weight", ("embedder.embeddings",), (V, E)),
        LeafLayout("model.final_norm.weight", ("final_norm.scale",), (E,)),
    ]
    for i, block_type in enumerate(config.block_types):
        def leaf(path, label, dims, i=i):
            layouts.append(LeafLayout(f"model.layers.{i}.{path}", (f"blocks.{i}.{label}",), dims))

        leaf("temporal_pre_norm.weight", "temporal_pre_norm.scale", (E,))
        leaf("channel_pre_norm.weight", "channel_pre_norm.scale", (E,))
        for hf_name, ours in (("gate_proj", "gate"), ("up_proj", "up")):
            leaf(f"mlp_block.{hf_name}.weight", f"mlp_block.{ours}.weights", (M, E))
            leaf(f"mlp_block.{hf_name}.bias", f"mlp_block.{ours}.bias", (M,))
        leaf("mlp_block.down_proj.weight", "mlp_block.down.weights", (E, M))
        leaf("mlp_block.down_proj.bias", "mlp_block.down.bias", (E,))
        hf, rec, att = "temporal_block", "recurrent_block", "attention_block"
        if block_type == griffin.RECURRENT:
            for name, (d_out, d_in) in (("linear_y", (L, E)), ("linear_x", (L, E)),
                                        ("linear_out", (E, L))):
                leaf(f"{hf}.{name}.weight", f"{rec}.{name}.weights", (d_out, d_in))
                leaf(f"{hf}.{name}.bias", f"{rec}.{name}.bias", (d_out,))
            leaf(f"{hf}.conv_1d.weight", f"{rec}.conv_1d.weights", (L, 1, axes.CONV_TAPS))
            leaf(f"{hf}.conv_1d.bias", f"{rec}.conv_1d.bias", (L,))
            leaf(f"{hf}.rg_lru.recurrent_param", f"{rec}.rg_lru.a_param", (L,))
            for hf_gate, gate in (("input_gate", "input_gate"), ("recurrent_gate", "a_gate")):
                leaf(f"{hf}.rg_lru.{hf_gate}_weight", f"{rec}.rg_lru.{gate}.weights",
                     (H, axes.BLOCK_IN, axes.BLOCK_OUT))
                leaf(f"{hf}.rg_lru.{hf_gate}_bias", f"{rec}.rg_lru.{gate}.bias", (H, axes.BLOCK_OUT))
        else:
            leaf(f"{hf}.q_proj.weight", f"{att}.query.weights", ((H, P), E))
            leaf(f"{hf}.k_proj.weight", f"{att}.key.weights", ((KV, P), E))
            leaf(f"{hf}.v_proj.weight", f"{att}.value.weights", ((KV, P), E))
            leaf(f"{hf}.o_proj.weight", f"{att}.output.weights", (E, (H, P)))
            leaf(f"{hf}.o_proj.bias", f"{att}.output.bias", (E,))
    return layouts


def config_from_hf(values: Mapping[str, Any], **overrides) -> griffin.GriffinConfig:
    """A `GriffinConfig` from HF's config.json contents, plus `overrides`.

    Reads both the 5.x layout (``block_types``, ``rope_parameters``) and the
    4.x one (``_block_types``, top-level ``rope_theta`` /
    ``partial_rotary_factor``); HF defaults fill absent keys (MHA when
    ``num_key_value_heads`` is absent, as HF does). What our Griffin cannot
    compute (q/k/v biases, another activation or RoPE type, an untied head)
    is an error naming the key.
    """
    source = "HF config.json"
    fields = {k: values[k] for k in _HF_FIELDS if values.get(k) is not None}
    problems = []
    if values.get("attention_bias"):
        problems.append("attention_bias is true (q/k/v biases), which Griffin does not have")
    if values.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings is false; Griffin's head is the embedding matrix")
    activation = values.get("hidden_activation", _HF_ACTIVATIONS[0])
    if activation not in _HF_ACTIVATIONS:
        problems.append(f"hidden_activation {activation!r} is not one of {_HF_ACTIVATIONS}")
    rope_parameters = values.get("rope_parameters") or {}
    if rope_parameters.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type {rope_parameters['rope_type']!r} is not 'default'")
    intermediate = values.get("intermediate_size", 3 * fields.get("hidden_size", 2560))
    if intermediate % 2:
        problems.append(f"intermediate_size {intermediate} is odd: HF splits it into two MLP branches")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ".")
    fields["intermediate_size"] = intermediate // 2
    for key in ("rope_theta", "partial_rotary_factor"):
        value = rope_parameters.get(key, values.get(key))
        if value is not None:
            fields[key] = value
    fields.setdefault("partial_rotary_factor", 0.5)  # HF's default
    if values.get("lru_width") is not None:
        fields["lru_width"] = values["lru_width"]
    layers = fields.get("num_hidden_layers", 26)
    pattern = values.get("block_types") or values.get("_block_types") or griffin.griffin_pattern(3)
    fields["block_types"] = tuple(pattern[i % len(pattern)] for i in range(layers))  # HF cycles it
    kv_heads = values.get("num_key_value_heads")
    fields["num_key_value_heads"] = kv_heads if kv_heads is not None else fields.get(
        "num_attention_heads", 10)
    fields["embeddings_scale_by_sqrt_dim"] = True  # HF always scales
    return griffin.GriffinConfig(**{**fields, **overrides})


def hf_config_dict(config: griffin.GriffinConfig) -> dict[str, Any]:
    """HF's config.json contents for `config`; ValueError if HF cannot compute
    the model (no sqrt(D) embedding scale, no soft cap)."""
    problems = []
    if not config.embeddings_scale_by_sqrt_dim:
        problems.append("embeddings_scale_by_sqrt_dim is False (HF always scales)")
    if not config.logits_soft_cap:
        problems.append("logits_soft_cap is 0 (HF always soft-caps; 0 would divide by zero)")
    if problems:
        raise ValueError("cannot save in HF RecurrentGemma format: " + "; ".join(problems) + ".")
    return {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": HF_MODEL_TYPE,
        **{k: getattr(config, k) for k in _HF_FIELDS},
        "intermediate_size": 2 * config.intermediate_size,
        "lru_width": config.lru_width,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "block_types": list(config.block_types),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor,
        },
        # Also at the top level: transformers 4.x reads them there (5.x accepts both).
        "rope_theta": config.rope_theta,
        "partial_rotary_factor": config.partial_rotary_factor,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": config.param_dtype,
    }


def from_hf_state_dict(state_dict: Mapping[str, Any], config: griffin.GriffinConfig, *,
                       source: str = HF_SOURCE):
    """An HF state dict (tensors, arrays or `common.LazyTensor`s) -> our Griffin.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        tensor, with expected and found shapes.
    """
    leaves = dict(state_dict)
    leaves.pop("lm_head.weight", None)  # tied: the embeddings
    return common.load_model(leaves, hf_leaf_layouts(config), config, griffin.build_model,
                             source=source)


def to_hf_state_dict(model) -> dict[str, np.ndarray]:
    """Our Griffin -> HF's state dict as numpy arrays (the exact inverse of loading)."""
    config = common.config_of(model, griffin.GriffinConfig, "a Griffin model")
    return {k: np.asarray(v) for k, v in common.export_leaves(model, hf_leaf_layouts(config)).items()}


def load_hf_checkpoint(directory: str | os.PathLike, **config_overrides):
    """Loads an HF ``RecurrentGemmaForCausalLM`` directory.

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``; ``pytorch_model.bin`` also works).
      **config_overrides: `GriffinConfig` fields; ``param_dtype`` defaults to
        the stored dtype (bfloat16 stays bfloat16; ``param_dtype="float32"``,
        or HF's name ``dtype="float32"``, casts); ``scan_method`` picks the
        RG-LRU scan.

    Raises:
      FileNotFoundError / ValueError: not an HF directory, another model_type,
        a truncated file, a config Griffin cannot compute.
      CheckpointMismatchError: every missing, unexpected or mis-shaped tensor.
    """
    directory = os.fspath(directory)
    values, state, overrides = common.read_hf_checkpoint(directory, HF_MODEL_TYPE, config_overrides)
    return from_hf_state_dict(state, config_from_hf(values, **overrides), source=f"{HF_SOURCE} {directory}")


def save_hf_checkpoint(model, directory: str | os.PathLike, *,
                       max_shard_size: int | str | None = None) -> None:
    """Writes `model` as an HF ``RecurrentGemmaForCausalLM`` directory that
    ``transformers.RecurrentGemmaForCausalLM.from_pretrained`` loads.

    Args:
      model: our Griffin; tensors keep its ``param_dtype``.
      directory: the new directory (must not exist; written atomically).
      max_shard_size: None for one ``model.safetensors``; else bytes or HF's
        strings ("5GB") per shard, with ``model.safetensors.index.json``.
    """
    config = common.config_of(model, griffin.GriffinConfig, "a Griffin model")
    hf_config = hf_config_dict(config)
    values = parameter_values(model)
    tensors = {layout.path: functools.partial(layout.from_named, values)
               for layout in hf_leaf_layouts(config)}
    common.write_hf_directory(directory, tensors, hf_config,
                              max_shard_bytes=common.parse_size(max_shard_size))


def load_checkpoint(path: str | os.PathLike, **config_overrides):
    """An HF directory (it has ``config.json``) or an official orbax directory."""
    if os.path.isfile(os.path.join(path, common.HF_CONFIG)):
        return load_hf_checkpoint(path, **config_overrides)
    return load_official_checkpoint(path, **config_overrides)


def main(argv: list[str] | None = None) -> int:
    parser, convert = common.convert_parser(
        "recurrentgemma", __doc__,
        source="official orbax checkpoint directory, or HF RecurrentGemma directory",
    )
    common.add_config_flags(
        convert,
        griffin.GriffinConfig,
        ["attention_window_size", "logits_soft_cap", "rope_theta", "partial_rotary_factor"]
        + ["rms_norm_eps", "num_key_value_heads"]
        + ["param_dtype"],
        param_dtype=PARAM_DTYPES,
    )
    convert.add_argument(
        "--no-embeddings-scale",
        dest="embeddings_scale_by_sqrt_dim",
        action="store_const",
        const=False,
        help="the checkpoint does not scale embeddings by sqrt(width)",
    )
    return common.run_convert(parser, argv, load_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
