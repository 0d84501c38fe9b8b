"""Reading activations out of a model with penzai selectors.

The residual stream after every block::

    logits, stream = residual_stream(model, tokens)
    stream.named_shape   # {"layers": num_layers, "batch", "seq", "embedding"}

It works by selecting every `ResidualBlock` and wrapping it in a
``Sequential([block, SaveIntermediate()])``; the same pattern captures any other
site (select a different layer type).
"""

from __future__ import annotations

from penzai import pz
from penzai.toolshed import save_intermediates

from recurrent_lm import axes
from recurrent_lm.layers import ResidualBlock


def residual_stream(model, tokens, *, segment_pos=None, include_embeddings: bool = False):
    """Runs `model` and returns ``(logits, stream)``.

    Args:
      model: any recurrent_lm `DecoderLM`.
      tokens, segment_pos: as for ``model(...)``.
      include_embeddings: prepend the (scaled) embedding output as layer 0.

    Returns:
      logits {"batch", "seq", "vocabulary"} and the residual stream after every
      block, stacked along "layers": {"layers", "batch", "seq", "embedding"}.
      Works under `jax.jit` (with frozen parameters) as well as eagerly.
    """
    savers: list[save_intermediates.SaveIntermediate] = []

    def save_after(layer):
        saver = save_intermediates.SaveIntermediate()
        savers.append(saver)
        return pz.nn.Sequential([layer, saver])

    capturing = pz.select(model).at_instances_of(ResidualBlock).apply(save_after)
    if include_embeddings:
        capturing = pz.select(capturing).at(lambda m: m.embedder).apply(save_after)
        savers.insert(0, savers.pop())
    logits = capturing(tokens, segment_pos=segment_pos)
    stream = pz.nx.stack([s.saved.value for s in savers], axes.LAYERS)
    return logits, stream
