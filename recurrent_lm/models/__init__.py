"""One module per architecture; each registers itself in `base.MODEL_TYPES`."""

from recurrent_lm.models import gemma, griffin, h3, rwkv
from recurrent_lm.models.base import (
    MODEL_TYPES,
    DecoderLM,
    get_model_type,
    model_type_of,
)

__all__ = ["MODEL_TYPES", "DecoderLM", "gemma", "get_model_type", "griffin", "h3", "model_type_of", "rwkv"]
