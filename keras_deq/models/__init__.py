"""Ready-made DEQ models."""

from keras_deq import backend as _backend
from keras_deq.models.deq_transformer_block import DEQTransformerBlock
from keras_deq.models.deq_transformer_lm import DEQTransformerLM
from keras_deq.models.mdeq_block import MDEQBlock
from keras_deq.models.mdeq_classifier import MDEQClassifier

_backend.require_tensorflow(__name__)

__all__ = [
    "DEQTransformerBlock",
    "DEQTransformerLM",
    "MDEQBlock",
    "MDEQClassifier",
]
