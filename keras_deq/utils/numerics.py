"""Numerics the solvers and the Jacobian estimates share."""

from keras import ops


def norm(x, keepdims: bool = False):
    """Euclidean norm over the last axis, in x's dtype: sqrt(Σ x²).

    Not `keras.ops.norm`, which computes float64 input in float32 on JAX.
    """
    return ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=keepdims))
