"""recurrent_lm: named-axis JAX models for recurrent and hybrid language models.

    import recurrent_lm
    from recurrent_lm.models import griffin

    model = griffin.build_model(griffin.GriffinConfig(...), jax.random.key(0))
    logits = model(pz.nx.wrap(ids, "batch", "seq"))   # {"batch", "seq", "vocabulary"}
    recurrent_lm.save(model, "ckpt"); model = recurrent_lm.load("ckpt")

Importing recurrent_lm imports no architecture: `recurrent_lm.models.<name>`
(or `recurrent_lm.core.registry.get(name)`) does.
"""

from recurrent_lm import axes, layers
from recurrent_lm.checkpoint import load, save
from recurrent_lm.core.functional import functional, jit_forward
from recurrent_lm.core.model import DecoderLM
from recurrent_lm.core.stack import scan_layers, unscan_layers
from recurrent_lm.integrity import CorruptCheckpointError

__version__ = "0.1.0"

__all__ = [
    "CorruptCheckpointError",
    "DecoderLM",
    "axes",
    "functional",
    "jit_forward",
    "layers",
    "load",
    "save",
    "scan_layers",
    "unscan_layers",
]
