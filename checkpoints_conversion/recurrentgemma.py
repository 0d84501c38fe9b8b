"""Official RecurrentGemma (Flax / orbax) checkpoints <-> our Griffin.

The release is an orbax PyTree checkpoint whose root is the bare parameter
tree (``embedder``, ``final_norm``, ``blocks.N``); the official package's own
``save_parameters`` wraps it in ``{"params": ...}``. Both roots load. We do
not use the official loader (``recurrentgemma.jax.load_parameters``), which
fails with orbax >= 0.11.22.

The config is inferred from the shapes (vocabulary, widths, heads, block
types, conv width); fields the shapes cannot give (window, soft cap, sqrt(D)
scaling, RoPE, eps) default to the released models' values and can be
overridden with keyword arguments.

CLI::

    python -m checkpoints_conversion.recurrentgemma convert SRC DST [--attention-window-size N ...]
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_conversion.common import (
    LeafLayout,
    check_leaves,
    convert_leaves,
    convert_parser,
    flatten,
    restore_orbax_tree,
    unflatten,
)
from recurrent_lm import axes
from recurrent_lm.models import griffin
from recurrent_lm.params import (
    CheckpointMismatchError,
    abstract_parameters,
    bind_parameters,
    parameter_values,
)

E, V, L, M = axes.EMBEDDING, axes.VOCABULARY, axes.LRU, axes.MLP
H, KV, P = axes.HEADS, axes.KV_HEADS, axes.PROJECTION
_BLOCK = re.compile(r"^blocks\.(\d+)$")


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
    need = ["embedder/input_embedding", "blocks.0/mlp_block/ffw_up/w"]
    absent = [p for p in need if p not in flat]
    if absent:
        raise CheckpointMismatchError(
            "RecurrentGemma checkpoint",
            missing={p: "?" for p in absent},
            hint="(cannot infer the config without these leaves)",
        )
    inferred: dict[str, Any] = {}
    inferred["vocab_size"], inferred["hidden_size"] = shape("embedder/input_embedding")
    inferred["intermediate_size"] = shape("blocks.0/mlp_block/ffw_up/w")[-1]

    indices = sorted(
        int(m.group(1)) for key in _strip_root(params) if (m := _BLOCK.match(str(key)))
    )
    if indices != list(range(len(indices))):
        raise ValueError(f"checkpoint blocks are not numbered 0..n-1: found blocks {indices}.")
    block_types = []
    for i in indices:
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


def from_official_params(
    params: Mapping[str, Any], *, scan_method: str | None = None, **config_overrides
):
    """An official parameter tree -> our Griffin (`DecoderLM`).

    Args:
      params: the official tree (bare, or under "params"), leaves array-like.
      scan_method: RG-LRU scan implementation (None = backend default).
      **config_overrides: `GriffinConfig` fields, e.g. ``attention_window_size``,
        ``logits_soft_cap`` or ``param_dtype`` (leaves are cast to it).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected or mis-shaped
        leaf, with expected and found shapes.
    """
    config = infer_config(params, **config_overrides)
    flat = flatten(_strip_root(params))
    build = lambda key: griffin.build_model(config, key, scan_method=scan_method)
    expected = abstract_parameters(build)
    layouts = leaf_layouts(config)
    check_leaves(
        flat, layouts, expected, source="RecurrentGemma checkpoint",
        hint=f"(config: {config})",
    )
    values = convert_leaves(flat, layouts, expected, jnp.dtype(config.param_dtype))
    return bind_parameters(build(None), values, expected, source="RecurrentGemma checkpoint")


def to_official_params(model) -> dict[str, Any]:
    """Our Griffin -> the official bare tree (the exact inverse of loading)."""
    config = model.config
    if not isinstance(config, griffin.GriffinConfig):
        raise TypeError(f"expected a Griffin model, got one with {type(config).__name__}.")
    values = parameter_values(model)
    return unflatten({layout.path: layout.from_named(values) for layout in leaf_layouts(config)})


def load_official_checkpoint(
    path: str,
    *,
    scan_method: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
    **config_overrides,
):
    """Loads an official RecurrentGemma orbax checkpoint directory.

    Args:
      path: the checkpoint directory (e.g. ``.../recurrentgemma/flax/2b/2b``).
      scan_method: RG-LRU scan implementation (None = backend default).
      sharding: where to place the restored leaves (default: first local device).
      **config_overrides: see `from_official_params`.
    """
    return from_official_params(
        restore_orbax_tree(str(path), sharding), scan_method=scan_method, **config_overrides
    )


def _overrides_from_args(args) -> dict[str, Any]:
    overrides = {}
    for field in ("attention_window_size", "logits_soft_cap", "rope_theta",
                  "partial_rotary_factor", "rms_norm_eps", "param_dtype",
                  "num_key_value_heads"):
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    if args.no_embeddings_scale:
        overrides["embeddings_scale_by_sqrt_dim"] = False
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser, convert = convert_parser(
        "recurrentgemma",
        "Convert an official RecurrentGemma Flax checkpoint to recurrent_lm's format.",
        source="official orbax directory",
        source_help="official checkpoint directory",
    )
    convert.add_argument("--attention-window-size", type=int)
    convert.add_argument("--logits-soft-cap", type=float)
    convert.add_argument("--rope-theta", type=float)
    convert.add_argument("--partial-rotary-factor", type=float)
    convert.add_argument("--rms-norm-eps", type=float)
    convert.add_argument("--num-key-value-heads", type=int)
    convert.add_argument("--param-dtype", choices=griffin.PARAM_DTYPES)
    convert.add_argument("--no-embeddings-scale", action="store_true",
                         help="the checkpoint does not scale embeddings by sqrt(width)")
    args = parser.parse_args(argv)

    import recurrent_lm.checkpoint

    model = load_official_checkpoint(args.src, **_overrides_from_args(args))
    recurrent_lm.checkpoint.save(model, args.dst)
    config = dataclasses.asdict(model.config)
    print(f"converted {args.src} -> {args.dst}")
    print(f"config: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
