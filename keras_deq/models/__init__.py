"""Ready-made DEQ models, on TensorFlow and JAX."""

from keras_deq.models.deq_transformer_block import DEQTransformerBlock
from keras_deq.models.deq_transformer_lm import DEQTransformerLM
from keras_deq.models.mdeq_block import MDEQBlock
from keras_deq.models.mdeq_classifier import MDEQClassifier

__all__ = [
    "DEQTransformerBlock",
    "DEQTransformerLM",
    "MDEQBlock",
    "MDEQClassifier",
]
