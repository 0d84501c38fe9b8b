"""Token embedding tables (penzai's `EmbeddingTable`), with our initialiser."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import init


def embedding_table(
    name: str,
    init_base_rng: jax.Array | None,
    vocab_size: int,
    width: int,
    *,
    dtype=jnp.float32,
) -> pz.nn.EmbeddingTable:
    """An `EmbeddingTable` {"vocabulary", "embedding"}, normal with std 1/sqrt(width).

    Share one table between `pz.nn.EmbeddingLookup` and `pz.nn.EmbeddingDecode`
    to tie input and output embeddings.
    """
    return pz.nn.EmbeddingTable(
        embeddings=pz.nn.make_parameter(
            f"{name}.embeddings",
            init_base_rng,
            init.fan_in_normal,
            {axes.VOCABULARY: vocab_size, axes.EMBEDDING: width},
            dtype,
            fan_in_axes=(axes.EMBEDDING,),
        ),
        vocabulary_axis=axes.VOCABULARY,
    )


def bfloat16_sqrt(width: int) -> float:
    """sqrt(width) rounded to bfloat16, as Gemma-family models scale embeddings.

    The rounding is part of the trained models (sqrt(2560) = 50.596 -> 50.5).
    """
    # numpy, not jnp: this must stay a Python constant even under tracing.
    return float(np.asarray(np.sqrt(np.float32(width)), dtype=jnp.bfloat16))
