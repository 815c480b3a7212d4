"""What tests that run on every Keras backend share.

These tests import nothing backend-specific at module level; under
`KERAS_BACKEND=jax` the conftest collects only them (`ANY_BACKEND_TESTS`).
"""

import keras
import numpy as np

BACKEND = keras.backend.backend()

# How a test can run a function: as it is, and each compiled form the
# backend has (a TensorFlow graph, with and without XLA; `jax.jit`).
COMPILE_MODES = {
    "tensorflow": ("eager", "graph", "xla"),
    "jax": ("eager", "jit"),
}[BACKEND]


def compiled(fn, mode):
    """`fn` run eagerly or compiled the way `mode` names."""
    if mode == "eager":
        return fn
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=mode == "xla")
    import jax

    return jax.jit(fn)


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def contraction(rng, n, norm):
    """An n×n matrix with spectral norm `norm`."""
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.linspace(norm, norm / 3, n)
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * s) @ q2
