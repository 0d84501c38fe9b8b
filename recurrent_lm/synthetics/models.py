"""The small models of the synthetic-task papers, on our architectures.

The H3 paper and Zoology train 2-layer models of width 32-128 with an MLP of
4x the width after every sequence mixer. `paper_config` builds that shape
from each architecture's own blocks:

* ``attention``: our Gemma layers (rotary global attention, one head of the
  full width by default, a gated MLP of 4x), as the H3 paper's one-head
  baseline. Its positions differ: the H3 paper's has learned absolute
  position embeddings, Zoology's none but a short convolution before each
  attention (and 2 heads). With nothing local, it must learn a rotary
  previous-token head before it can match: the H3 induction head takes it
  ~24,000 steps (99.8 %; ~6 % after 2,000), where the recurrent models,
  whose conv / token shift gives them the previous token, need ~2,000.
  `attention_heads` splits the width into more heads;
* ``h3``: two H3 mixers (no attention layer), state size 64 (safari's);
* ``rwkv`` (RWKV-4), ``rwkv7``: two blocks each (RWKV-7 heads of
  ``min(64, width)``);
* ``griffin``: a recurrent block then a local-attention block (window
  `window`, one head); ``hawk``: two recurrent blocks (Griffin without
  attention, as in the Griffin paper);
* ``mamba``, ``mamba2``: two mixer blocks each, as released (no MLP between
  mixers); Mamba-2 with "tiny"'s heads of 32, state 32, one group.

Or any registered preset with overrides (`preset_config`).
"""

from __future__ import annotations

from typing import Any

from recurrent_lm.core import registry

PAPER_MODELS: dict[str, str] = {
    "attention": "gemma",
    "h3": "h3",
    "rwkv": "rwkv",
    "rwkv7": "rwkv7",
    "griffin": "griffin",
    "hawk": "griffin",
    "mamba": "mamba",
    "mamba2": "mamba2",
}
"""Synthetic-task model name -> registered architecture."""


def _paper_fields(name: str, width: int, window: int, attention_heads: int) -> dict[str, Any]:
    mlp = 4 * width
    if name == "attention":
        if width % attention_heads:
            raise ValueError(f"attention_heads ({attention_heads}) must divide the width ({width}).")
        return dict(num_layers=2, num_query_heads=attention_heads, num_key_value_heads=attention_heads,
                    hidden_dim=width, head_dim=width // attention_heads, intermediate_dim=mlp)
    if name == "h3":
        return dict(hidden_size=width, num_hidden_layers=2, n_inner=mlp, attn_layer_idx=(),
                    d_state=64, embedding_dropout=0.0, num_attention_heads=1)
    if name == "rwkv":
        return dict(hidden_size=width, num_hidden_layers=2, intermediate_size=mlp)
    if name == "rwkv7":
        return dict(hidden_size=width, num_hidden_layers=2, head_size=min(64, width))
    if name in ("griffin", "hawk"):
        blocks = ("recurrent", "attention") if name == "griffin" else ("recurrent", "recurrent")
        return dict(hidden_size=width, lru_width=width, num_hidden_layers=2, block_types=blocks,
                    num_attention_heads=1, intermediate_size=mlp, attention_window_size=window)
    if name == "mamba":
        return dict(hidden_size=width, num_hidden_layers=2)
    if name == "mamba2":  # "tiny"'s heads of 32, state 32, one group
        return dict(hidden_size=width, num_hidden_layers=2)
    raise ValueError(f"unknown synthetic-task model {name!r}; choose one of {sorted(PAPER_MODELS)}.")


def paper_config(name: str, width: int, vocab_size: int, *, window: int = 1024, attention_heads: int = 1,
                 **overrides):
    """``(architecture, config)`` of the papers' 2-layer model `name` at `width`
    (`window`: Griffin's local attention; `attention_heads`: the ``attention``
    model's heads, each ``width / attention_heads`` wide)."""
    if name not in PAPER_MODELS:
        raise ValueError(f"unknown synthetic-task model {name!r}; choose one of {sorted(PAPER_MODELS)}.")
    if attention_heads != 1 and name != "attention":
        raise ValueError(f"attention_heads applies to the 'attention' model, not {name!r}.")
    if attention_heads < 1:
        raise ValueError(f"attention_heads must be positive, got {attention_heads}.")
    architecture = registry.get(PAPER_MODELS[name])
    fields = {**_paper_fields(name, width, window, attention_heads), **overrides}
    fields["vocab_size"] = vocab_size  # Gemma's vocabulary_size takes this alias
    # Gemma 1's layers (global attention, no soft caps); the others' "tiny".
    preset = "gemma-2b" if name == "attention" else "tiny"
    return architecture, architecture.config_class.from_preset(preset, **fields)


def model_label(name: str, attention_heads: int = 1) -> str:
    """How results name the paper model `name`: ``attention`` with its heads when not 1."""
    return f"attention ({attention_heads} heads)" if name == "attention" and attention_heads != 1 else name


def preset_config(model: str, preset: str, vocab_size: int, **overrides):
    """``(architecture, config)``: registered `model`'s `preset` with `overrides`."""
    architecture = registry.get(model)
    config = architecture.config_class.from_preset(preset, **{**overrides, "vocab_size": vocab_size})
    return architecture, config
