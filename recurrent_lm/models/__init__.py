"""One module per architecture; each registers itself in `base.MODEL_TYPES`."""

from recurrent_lm.models import griffin, h3
from recurrent_lm.models.base import (
    MODEL_TYPES,
    DecoderLM,
    get_model_type,
    model_type_of,
)

__all__ = ["DecoderLM", "MODEL_TYPES", "get_model_type", "griffin", "h3", "model_type_of"]
