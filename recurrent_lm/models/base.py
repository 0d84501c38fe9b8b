"""What every architecture shares: the decoder LM struct, input checks, registry.

Call convention (all models)::

    tokens = pz.nx.wrap(ids, "batch", "seq")
    logits = model(tokens)                        # one document per row
    logits = model(tokens, segment_pos=pos)       # packed / padded rows

``pos`` is an int NamedArray {"batch", "seq"}: 0 starts a document, -1 marks
padding (see `recurrent_lm.layers.positions`). Logits are {"batch", "seq",
"vocabulary"}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import named, positions


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_tokens(tokens, vocab_size: int) -> None:
    """Validates model inputs; the range check runs when the ids are concrete."""
    named.check_named(tokens, axes.TOKEN_AXES, "tokens")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}.")
    if tokens.named_shape[axes.SEQ] == 0:
        raise ValueError("tokens has an empty 'seq' axis: there is nothing to run.")
    ids = tokens.unwrap(*axes.TOKEN_AXES)
    if _is_concrete(ids) and ids.size:
        ids = np.asarray(ids)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            where = tuple(int(i) for i in np.argwhere(ids == bad)[0])
            raise ValueError(
                f"token id {bad} at (batch, seq) = {where} is outside the vocabulary"
                f" range [0, {vocab_size})."
            )


def check_segment_pos(segment_pos, tokens) -> None:
    named.check_named(segment_pos, axes.TOKEN_AXES, "segment_pos")
    if not jnp.issubdtype(segment_pos.dtype, jnp.integer):
        raise TypeError(f"segment_pos must be integers, got dtype {segment_pos.dtype}.")
    if dict(segment_pos.named_shape) != dict(tokens.named_shape):
        raise ValueError(
            f"segment_pos has named shape {dict(segment_pos.named_shape)} but tokens"
            f" have {dict(tokens.named_shape)}; they must match."
        )


@pz.pytree_dataclass
class DecoderLM(pz.nn.Layer):
    """A decoder-only language model: embed, residual blocks, norm, head.

    Named axes: tokens {"batch", "seq"} (int) -> logits {"batch", "seq",
    "vocabulary"}. ``segment_pos`` (optional, {"batch", "seq"}) is checked here
    and passed to every block as a side input; unknown keyword arguments are
    an error rather than silently ignored.

    Attributes:
      config: the architecture's config dataclass (static).
      embedder: tokens -> {"batch", "seq", "embedding"}.
      blocks: a `pz.nn.Sequential` of `ResidualBlock`s; select them with
        ``pz.select(model).at_instances_of(ResidualBlock)``.
      final_norm: normalisation of the last residual stream.
      head: {"embedding"} -> {"vocabulary"} (tied decode, soft cap, ...).
    """

    config: Any = dataclasses.field(metadata={"pytree_node": False})
    embedder: pz.nn.Layer
    blocks: pz.nn.Sequential
    final_norm: pz.nn.Layer
    head: pz.nn.Layer

    def __call__(self, tokens, /, *, segment_pos=None, **side_inputs):
        if side_inputs:
            raise TypeError(
                f"unknown keyword arguments {sorted(side_inputs)}; a model takes"
                " tokens and optionally segment_pos."
            )
        check_tokens(tokens, self.config.vocab_size)
        if segment_pos is None:
            segment_pos = positions.default_segment_pos(tokens)
        else:
            check_segment_pos(segment_pos, tokens)
        x = self.embedder(tokens, segment_pos=segment_pos)
        x = self.blocks(x, segment_pos=segment_pos)
        return self.head(self.final_norm(x, segment_pos=segment_pos), segment_pos=segment_pos)


# ---------------------------------------------------------------------------
# Registry of architectures, used by `recurrent_lm.save` / `recurrent_lm.load`.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelType:
    name: str
    config_class: type
    build_model: Callable[..., DecoderLM]


MODEL_TYPES: dict[str, ModelType] = {}


def register_model_type(name: str, config_class: type, build_model: Callable) -> None:
    MODEL_TYPES[name] = ModelType(name, config_class, build_model)


def model_type_of(config) -> ModelType:
    for model_type in MODEL_TYPES.values():
        if isinstance(config, model_type.config_class):
            return model_type
    raise ValueError(f"no registered architecture uses config type {type(config).__name__}.")


def get_model_type(name: str) -> ModelType:
    if name not in MODEL_TYPES:
        raise ValueError(f"unknown model type {name!r}; known: {sorted(MODEL_TYPES)}.")
    return MODEL_TYPES[name]
