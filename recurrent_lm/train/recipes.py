"""Pretraining recipes: the training settings a released-size preset defaults to.

A preset of a released size (RecurrentGemma 2B, Gemma 2 9B, RWKV-4 14B, ...)
is for pretraining on accelerators, where the plain defaults (float32 compute,
every activation kept, one device) would neither fit nor run fast. Its recipe:

* bfloat16 compute on float32 master weights (the optimiser updates float32);
* the layer stack scanned, each block group rematerialised in the backward
  pass (``remat="block"``: only the residual stream between groups is kept);
* the head and cross-entropy applied 1024 positions at a time (the
  [tokens, vocabulary] logits never exist whole);
* gradient accumulation sized so that a microbatch holds at most one
  8192-token row per device (``max_tokens_per_device``): activation memory
  stays that of one row whatever the global batch;
* FSDP over every device (``mesh="fsdp=-1"``): parameters and optimiser state
  sharded, rows split.

So ``python -m recurrent_lm.train --model griffin --preset recurrentgemma-2b
--batch-size 128 --seq-len 8192 ...`` needs no further flags. Settings given
explicitly (flags, or keyword arguments of `TrainConfig.for_preset`) win. The
"tiny" presets, for experiments, keep the plain defaults.
"""

from __future__ import annotations

from typing import Any

PRETRAINING: dict[str, Any] = {
    "compute_dtype": "bfloat16",
    "param_dtype": "float32",
    "scan_layers": True,
    "remat": "block",
    "loss_chunk_size": 1024,
    "max_tokens_per_device": 8192,
    "mesh": "fsdp=-1",
}

EXPERIMENT_PRESETS = ("tiny",)


def recipe(model: str, preset: str) -> dict[str, Any]:
    """The settings `preset` of `model` defaults to (empty: the plain defaults)."""
    del model  # every architecture's released sizes share the recipe
    return {} if preset in EXPERIMENT_PRESETS else dict(PRETRAINING)
