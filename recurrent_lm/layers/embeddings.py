"""Token embedding tables (penzai's `EmbeddingTable`), with our initialiser,
learned position embeddings and the lookup every architecture embeds tokens with."""

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
    std: float | None = None,
    dtype=jnp.float32,
) -> pz.nn.EmbeddingTable:
    """An `EmbeddingTable` {"vocabulary", "embedding"}, normal with std
    `std` (None: 1/sqrt(width)).

    Share one table between `EmbeddingLookup` and `pz.nn.EmbeddingDecode` to tie
    input and output embeddings.
    """
    shape = {axes.VOCABULARY: vocab_size, axes.EMBEDDING: width}
    if std is None:
        initializer, options = init.fan_in_normal, {"fan_in_axes": (axes.EMBEDDING,)}
    else:
        initializer, options = init.normal, {"std": std}
    return pz.nn.EmbeddingTable(
        embeddings=pz.nn.make_parameter(
            f"{name}.embeddings", init_base_rng, initializer, shape, dtype, **options
        ),
        vocabulary_axis=axes.VOCABULARY,
    )


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # table
class EmbeddingLookup(pz.nn.EmbeddingLookup):
    """`pz.nn.EmbeddingLookup` that gives NaN for token ids outside the vocabulary.

    Named axes: token ids {..., no table axis} -> {..., the table's other axes}.

    A model call checks its token ids when they are concrete (a clear error,
    `recurrent_lm.core.model.check_tokens`). Under the caller's own `jax.jit`
    (or grad, vmap) they are tracers with no values to check, and a plain
    gather would clamp an out-of-range id to the last row, and read a negative
    one from the end of the table: wrong logits, silently. This lookup fills
    the embedding of an id outside [0, vocabulary) with NaN instead, so the
    logits of that batch row are NaN from that position on, and at its earlier
    positions too where a layer mixes the whole row (attention multiplies the
    NaN value by a zero weight, H3 convolves by FFT); other rows are
    unaffected. A training loss over such a batch is NaN, even with the bad id
    on a masked position, and the training loop stops on a NaN loss. The
    fill-mode gather costs nothing measurable in a forward pass (the tiny
    presets of every architecture, batch 8 x 256 tokens, on CPU).
    """

    def __call__(self, token_index, **_unused_side_inputs):
        vocabulary = self.table.vocabulary_axis
        table = self.table.embeddings.value
        size = table.named_shape[vocabulary]

        def lookup(rows, ids):
            # jnp.take reads -1 as the last row: send negative ids out of range too.
            ids = jnp.where(ids < 0, size, ids)
            return jnp.take(rows, ids, axis=0, mode="fill", fill_value=jnp.nan)

        return pz.nx.nmap(lookup)(table.untag_prefix(vocabulary), token_index)


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
