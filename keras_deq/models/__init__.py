"""Ready-made DEQ models."""

from keras_deq.models.mdeq import MDEQBlock
from keras_deq.models.mdeq import MDEQClassifier

__all__ = ["MDEQBlock", "MDEQClassifier"]
