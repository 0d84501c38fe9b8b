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

E, V, L, M = axes.EMBEDDING, axes.VOCABULARY, axes.LRU, axes.MLP
H, KV, P = axes.HEADS, axes.KV_HEADS, axes.PROJECTION
SOURCE = "RecurrentGemma checkpoint"
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


def main(argv: list[str] | None = None) -> int:
    parser, convert = common.convert_parser(
        "recurrentgemma", __doc__, source="official orbax checkpoint directory"
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
    return common.run_convert(parser, argv, load_official_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
