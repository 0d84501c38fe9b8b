"""Token embedding tables (penzai's `EmbeddingTable`), with our initialiser, and
learned position embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core.context import require_context
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


@pz.pytree_dataclass
class LearnedPositions(pz.nn.Layer):
    """Adds a learned vector for each token's position in its document (GPT-2's
    ``wpe``): ``x + table[segment_pos]``.

    Named axes: in {..., "seq", "embedding"} -> same.
    Side input: ``context`` (its ``segment_pos``: positions restart in every
    document, and continue across sampling-mode calls).
    Parameter: ``table`` {"positions", "embedding"}.

    Padding (position -1) reads row 0; no real token sees a pad's result. A
    position past the table gives NaN, not a clamped row (a gather's default
    under jit): such a sequence is longer than the model was built for, and
    NaN logits cannot go unnoticed.
    """

    table: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, x: pz.nx.NamedArray, *, context=None, **_unused_side_inputs) -> pz.nx.NamedArray:
        segment_pos = require_context(context, "LearnedPositions").segment_pos
        rows = self.table.value.untag(axes.POSITIONS, axes.EMBEDDING)
        lookup = lambda pos, table: jnp.take(
            table, jnp.maximum(pos, 0), axis=0, mode="fill", fill_value=jnp.nan
        )
        return x + pz.nx.nmap(lookup)(segment_pos, rows).tag(axes.EMBEDDING).astype(x.dtype)
