"""keras_deq: deep equilibrium models for Keras 3 on TensorFlow."""

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_deq needs the TensorFlow backend of Keras, but Keras is using "
        f"{keras.backend.backend()!r}. Set the environment variable "
        "KERAS_BACKEND=tensorflow before importing keras."
    )

from keras_deq import callbacks  # noqa: E402
from keras_deq import diagnostics  # noqa: E402
from keras_deq import gradients  # noqa: E402
from keras_deq import jacobian  # noqa: E402
from keras_deq import layers  # noqa: E402
from keras_deq import models  # noqa: E402
from keras_deq import regularizers  # noqa: E402
from keras_deq import solvers  # noqa: E402
from keras_deq.layers import DEQLayer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DEQLayer",
    "callbacks",
    "diagnostics",
    "gradients",
    "jacobian",
    "layers",
    "models",
    "regularizers",
    "solvers",
]
