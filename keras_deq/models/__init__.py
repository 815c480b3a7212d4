"""Ready-made DEQ models.

`MDEQClassifier` runs on TensorFlow and JAX; the DEQ-Transformer needs
TensorFlow so far.
"""

from keras_deq import backend as _backend
from keras_deq.models.mdeq_block import MDEQBlock
from keras_deq.models.mdeq_classifier import MDEQClassifier

_TENSORFLOW_ONLY = ("DEQTransformerBlock", "DEQTransformerLM")

if _backend.BACKEND == "tensorflow":
    from keras_deq.models.deq_transformer_block import DEQTransformerBlock
    from keras_deq.models.deq_transformer_lm import DEQTransformerLM
else:

    def __getattr__(name):
        if name in _TENSORFLOW_ONLY:
            _backend.require_tensorflow(f"keras_deq.models.{name}")
        raise AttributeError(
            f"module 'keras_deq.models' has no attribute {name!r}"
        )


__all__ = [
    "DEQTransformerBlock",
    "DEQTransformerLM",
    "MDEQBlock",
    "MDEQClassifier",
]
