"""What `keras.ops` lacks, one small module per Keras backend.

The rest of keras_deq is written with `keras.ops`; the few operations it
has no portable form for live in `keras_deq/backend/{backend}.py`, each
module with the same functions:

- `new_history(z0, count, slots)` and `write_history(history, slot,
  values, after)`: the solvers' per-sample histories, written in place
  where the backend allows (see `tensorflow.py`);
- `fix_shape(x, shape)`: states the static shape of a loop variable;
- `cholesky_solve(h, rhs)`: solves h x = rhs for symmetric positive
  definite `h`, with NaNs (not an error) where `h` is not;
- `linearize(f, z)`: `(f(z), vjp)`, vector-Jacobian products of one
  evaluation of f;
- `normal(shape, dtype, seed, index)`: the Jacobian estimates' Gaussian
  probes from an int seed, a `keras.random.SeedGenerator` or `None`.
"""

import keras

BACKEND = keras.backend.backend()
SUPPORTED = ("tensorflow", "jax")

if BACKEND == "tensorflow":
    from keras_deq.backend import tensorflow as _impl
elif BACKEND == "jax":
    from keras_deq.backend import jax as _impl
else:
    raise ImportError(
        f"keras_deq runs on the Keras backends {list(SUPPORTED)}, but Keras "
        f"is using {BACKEND!r}. Set the environment variable KERAS_BACKEND "
        "to one of them before importing keras."
    )

# What runs on every supported backend so far; the rest needs TensorFlow.
PORTABLE = ("keras_deq.solvers", "keras_deq.jacobian")


def require_tensorflow(module: str) -> None:
    """Raises `ImportError` unless Keras runs on TensorFlow.

    Args:
        module: the importing module's name, for the message.
    """
    if BACKEND != "tensorflow":
        raise ImportError(
            f"{module} needs the TensorFlow backend of Keras so far; on "
            f"{BACKEND!r}, keras_deq offers {', '.join(PORTABLE)}. Set the "
            "environment variable KERAS_BACKEND=tensorflow before importing "
            "keras to use the rest."
        )


Tensor = _impl.Tensor
new_history = _impl.new_history
write_history = _impl.write_history
fix_shape = _impl.fix_shape
cholesky_solve = _impl.cholesky_solve
linearize = _impl.linearize
normal = _impl.normal

__all__ = [
    "BACKEND",
    "SUPPORTED",
    "Tensor",
    "PORTABLE",
    "cholesky_solve",
    "fix_shape",
    "linearize",
    "new_history",
    "normal",
    "require_tensorflow",
    "write_history",
]
