"""keras_deq: deep equilibrium models for Keras 3.

The solvers, the Jacobian estimates, the gradient kinds, the penalty and
the layers (`DEQLayer` included) run on TensorFlow and JAX; the models,
diagnostics and callbacks need the TensorFlow backend so far.
"""

from keras_deq import backend
from keras_deq import gradients
from keras_deq import jacobian
from keras_deq import layers
from keras_deq import regularizers
from keras_deq import solvers
from keras_deq.layers import DEQLayer

__version__ = "0.1.0"

if backend.BACKEND == "tensorflow":
    from keras_deq import callbacks  # noqa: E402
    from keras_deq import diagnostics  # noqa: E402
    from keras_deq import models  # noqa: E402
else:

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        backend.require_tensorflow(f"keras_deq.{name}")


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
