"""recurrent_lm: named-axis JAX models for recurrent and hybrid language models.

    import recurrent_lm
    from recurrent_lm.models import griffin

    model = griffin.build_model(griffin.GriffinConfig(...), jax.random.key(0))
    logits = model(pz.nx.wrap(ids, "batch", "seq"))   # {"batch", "seq", "vocabulary"}
    recurrent_lm.save(model, "ckpt"); model = recurrent_lm.load("ckpt")
"""

from recurrent_lm import axes, layers, models
from recurrent_lm.checkpoint import load, save

__version__ = "0.1.0"

__all__ = ["axes", "layers", "load", "models", "save"]
