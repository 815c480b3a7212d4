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
  probes from an int seed, a `keras.random.SeedGenerator` or `None`;
- `unrecorded()`: a context that keeps the forward solve off every tape;
- `loops_run_op_by_op()` and `function(fn, signature, jit_compile,
  state)`: whether an eager loop would run op by op here, and the
  compiled function to run it in instead (on JAX a `jax.jit` given the
  values of `state`'s variables, or `fn` as it is without `state`);
- `current_value(variable)`: a scalar variable's value while a step is
  traced;
- `output_spec(fn, *args)`: KerasTensors of `fn`'s outputs;
- `repeat(step, init, steps)`: `steps` differentiable applications of
  `step`, traced once;
- `attach_backward(z, residuals, backward)`: `z` with the custom gradient
  `backward(residuals, g)`, which refuses second-order gradients;
- `LAYER_METRICS`: whether a layer can record metrics of its own (its
  NFE and residuals) in `call` and in that gradient, also in `fit`;
- `EXPORT_EMPTY_AXES`: whether a SavedModel endpoint exported here takes
  inputs with an axis of size 0;
- `records_now(value)`: whether a metric update with `value` takes effect
  where it is made (on JAX: in eager calls only).
"""

import keras

BACKEND = keras.backend.backend()
SUPPORTED = ("tensorflow", "jax")

if BACKEND == "tensorflow":
    from keras_deq.backend import tensorflow as _impl
elif BACKEND == "jax":
    from keras_deq.backend import jax as _impl
elif BACKEND == "torch":
    raise ImportError(
        f"keras_deq runs on the Keras backends {list(SUPPORTED)}, not yet on "
        "'torch'. Tried with torch 2.13.0 and Keras 3.15: the implicit "
        "gradient holds there, but Keras computes float64 in float32 on "
        "PyTorch (its type promotion), so the float64 checks against "
        "finite differences cannot run, and DEQTransformerLM's cached "
        "decoding and export fail. Set the environment variable "
        "KERAS_BACKEND to 'tensorflow' or 'jax' before importing keras."
    )
else:
    raise ImportError(
        f"keras_deq runs on the Keras backends {list(SUPPORTED)}, but Keras "
        f"is using {BACKEND!r}. Set the environment variable KERAS_BACKEND "
        "to one of them before importing keras."
    )

Tensor = _impl.Tensor
LAYER_METRICS = _impl.LAYER_METRICS
EXPORT_EMPTY_AXES = _impl.EXPORT_EMPTY_AXES
records_now = _impl.records_now
new_history = _impl.new_history
write_history = _impl.write_history
fix_shape = _impl.fix_shape
cholesky_solve = _impl.cholesky_solve
linearize = _impl.linearize
normal = _impl.normal
unrecorded = _impl.unrecorded
loops_run_op_by_op = _impl.loops_run_op_by_op
function = _impl.function
current_value = _impl.current_value
output_spec = _impl.output_spec
repeat = _impl.repeat
attach_backward = _impl.attach_backward

__all__ = [
    "BACKEND",
    "EXPORT_EMPTY_AXES",
    "LAYER_METRICS",
    "SUPPORTED",
    "Tensor",
    "attach_backward",
    "cholesky_solve",
    "current_value",
    "fix_shape",
    "function",
    "linearize",
    "loops_run_op_by_op",
    "new_history",
    "normal",
    "output_spec",
    "records_now",
    "repeat",
    "unrecorded",
    "write_history",
]
