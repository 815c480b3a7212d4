"""keras_deq: deep equilibrium models for Keras 3.

Everything runs on Keras' TensorFlow and JAX backends (see
`keras_deq.backend`); on JAX, `AdaptiveJacobian` measures the NFE on a
`probe` batch.
"""

from keras_deq import backend
from keras_deq import callbacks
from keras_deq import diagnostics
from keras_deq import gradients
from keras_deq import jacobian
from keras_deq import layers
from keras_deq import models
from keras_deq import regularizers
from keras_deq import solvers
from keras_deq.layers import DEQLayer

__version__ = "0.1.0"

__all__ = [
    "DEQLayer",
    "backend",
    "callbacks",
    "diagnostics",
    "gradients",
    "jacobian",
    "layers",
    "models",
    "regularizers",
    "solvers",
]
