"""Ready-made DEQ models."""

from keras_deq.models.deq_transformer import DEQTransformerBlock
from keras_deq.models.deq_transformer import DEQTransformerLM
from keras_deq.models.mdeq import MDEQBlock
from keras_deq.models.mdeq import MDEQClassifier

__all__ = [
    "DEQTransformerBlock",
    "DEQTransformerLM",
    "MDEQBlock",
    "MDEQClassifier",
]
