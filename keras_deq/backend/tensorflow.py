"""The TensorFlow side of `keras_deq.backend`.

Solver histories are written in place inside a `tf.while_loop`. Broyden
and Anderson keep a few `[B, d]` vectors per sample from earlier
iterations. Written functionally (`tf.tensor_scatter_nd_update`), every step
copies the whole history (on a `[32, 32·32·64]` float32 state with ten slots,
two 84 MB copies per step), and the copy doubles the history's peak memory.

A history here is one `[n, B, slots, d]` tensor holding `n` histories of
`slots` vectors per sample, batch-major, so products with one of them are
batched matrix-vector products. In a graph that XLA does not compile, slots
are written with `InplaceUpdate`, which overwrites rows of its input's buffer:
the buffer comes from `Empty` (a `tf.zeros` buffer may be folded into a
constant that every call would then share and overwrite), is created anew by
every solve, and each write waits for every read of the buffer that came
before it (the solvers write first in a step and read after). Under XLA the
write is a dynamic-update-slice, which XLA performs in place when nothing
reads the old buffer afterwards; eagerly it is `tensor_scatter_nd_update`.
"""

import logging

import keras
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla
from tensorflow.python.eager import record
from tensorflow.python.ops import control_flow_util

from keras_deq.backend._common import SECOND_ORDER_REFUSED

Tensor = tf.Tensor

# Layers may update metrics in `call` and in gradient functions (the
# backward solve's statistics).
LAYER_METRICS = True

# An exported endpoint takes inputs with empty axes (a memory of 0
# positions).
EXPORT_EMPTY_AXES = True


def records_now(value) -> bool:
    """Always: a layer's metric updates take effect in graphs too."""
    del value
    return True


def _mode() -> str:
    """How to write: "in_place", "xla" or (eagerly) "scatter"."""
    if not tf.inside_function():
        return "scatter"
    graph = tf.compat.v1.get_default_graph()
    if control_flow_util.GraphOrParentsInXlaContext(graph):
        return "xla"
    return "in_place"


def new_history(z0: tf.Tensor, count: int, slots: int) -> tf.Tensor:
    """`count` zero-filled histories of `slots` vectors like each row of z0."""
    shape = tf.shape(z0)
    full = tf.stack([count, shape[0], slots, shape[1]])
    if _mode() == "in_place":
        return tf.raw_ops.Empty(shape=full, dtype=z0.dtype, init=True)
    return tf.zeros(full, z0.dtype)


def write_history(
    history: tf.Tensor,
    slot: tf.Tensor,
    values: list[tf.Tensor],
    after: list[tf.Tensor],
) -> tf.Tensor:
    """Puts `values[i]` (`[B, d]`) into slot `slot` of history `i`.

    Args:
        history: a tensor from `new_history`.
        slot: scalar int32 slot, the same for every sample.
        values: one `[B, d]` tensor per history.
        after: tensors the write must wait for: ones computed from an
            earlier read of the buffer that the write's inputs do not
            already depend on.

    Returns:
        The updated history (in a graph, the same buffer).
    """
    count = len(values)
    shape = tf.shape(history)
    slots = shape[2]
    mode = _mode()
    if mode == "xla":
        # One [count, B, 1, d] block at `slot` of the [count, B, slots, d]
        # view: a dynamic-update-slice, which XLA performs in place on a
        # loop-carried buffer (a scatter there copies the buffer).
        zero = tf.zeros([], slot.dtype)
        with tf.control_dependencies(after):
            return xla.dynamic_update_slice(
                history,
                tf.stack(values)[:, :, None, :],
                tf.stack([zero, zero, slot, zero]),
            )
    batch = tf.shape(values[0])[0]
    per_sample = tf.range(batch) * slots + slot
    rows = tf.concat(
        [per_sample + i * batch * slots for i in range(count)], axis=0
    )
    with tf.control_dependencies(after):
        flat = tf.reshape(history, tf.stack([-1, shape[3]]))
        if mode == "in_place":
            flat = tf.raw_ops.InplaceUpdate(
                x=flat, i=rows, v=tf.concat(values, axis=0)
            )
        else:
            flat = tf.tensor_scatter_nd_update(
                flat, rows[:, None], tf.concat(values, axis=0)
            )
    return tf.reshape(flat, shape)


def fix_shape(x: tf.Tensor, shape) -> tf.Tensor:
    """`x` with its static shape set to `shape` (checked when run).

    f may lose static dimensions that its input has (a reshape by a
    computed shape, say); a `tf.while_loop` needs them fixed.
    """
    return tf.ensure_shape(x, shape)


def cholesky_solve(h: tf.Tensor, rhs: tf.Tensor) -> tf.Tensor:
    """h⁻¹ rhs for batched SPD `h`; NaN where the factorisation fails.

    `keras.ops.cholesky` raises on TensorFlow where the factorisation
    fails (it checks for NaNs); the solvers need the NaNs, to fall back
    per sample.
    """
    return tf.linalg.cholesky_solve(tf.linalg.cholesky(h), rhs)


def linearize(f, z: tf.Tensor):
    """`(f(z), vjp)` from one evaluation recorded on a persistent tape.

    Under an outer `tf.GradientTape` the products are differentiable.
    """
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        fz = f(z)

    def vjp(u):
        return tape.gradient(
            fz,
            z,
            output_gradients=u,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    return fz, vjp


def normal(shape, dtype, seed, index: int) -> tf.Tensor:
    """N(0, 1) draws: probe `index` of `seed` (see `jacobian`'s seeds).

    An int or scalar integer tensor seed gives `stateless_normal` with
    the key `[seed, index]`; `None` TensorFlow's stateful generator.
    """
    if seed is None:
        return tf.random.normal(shape, dtype=dtype)
    if isinstance(seed, keras.random.SeedGenerator):
        return keras.random.normal(shape, dtype=dtype, seed=seed)
    if isinstance(seed, int) and not isinstance(seed, bool):
        return tf.random.stateless_normal(shape, [seed, index], dtype=dtype)
    if tf.is_tensor(seed) and seed.dtype.is_integer and seed.shape.rank == 0:
        key = tf.stack([tf.cast(seed, tf.int64), tf.constant(index, tf.int64)])
        return tf.random.stateless_normal(shape, key, dtype=dtype)
    raise TypeError(
        "`seed` must be an int (or a scalar integer tensor), a "
        "keras.random.SeedGenerator or None. "
        f"Received: seed={seed!r} of type {type(seed).__name__}"
    )


def unrecorded():
    """A context in which no tape records (persistent and nested ones
    included): the scope `tf.recompute_grad` uses for the same purpose.

    The forward solve runs in it, since its in-place histories have no
    gradient and the gradient of z* is the backward's, never the
    iterations'.
    """
    return record.stop_recording()


def loops_run_op_by_op() -> bool:
    """Whether a `while_loop` here would run op by op (eagerly), so that a
    solve should go through a compiled function (`function`)."""
    return tf.executing_eagerly()


def function(fn, signature=None, jit_compile: bool = False, state=None):
    """`fn` compiled for eager calls: a `tf.function`, for the inputs
    `signature` describes (`(shape, dtype, name)` each) if given, with XLA
    if `jit_compile`. (`state`, the layer whose variables `fn` reads, is
    JAX's need: a `tf.function` reads variables when it runs.)"""
    del state
    if signature is not None:
        signature = [
            tf.TensorSpec(shape, dtype, name=name)
            for shape, dtype, name in signature
        ]
    return tf.function(
        fn,
        input_signature=signature,
        reduce_retracing=True,
        jit_compile=jit_compile or None,
    )


def current_value(variable) -> float:
    """A scalar variable's value now, also while a step is traced."""
    with tf.init_scope():
        return float(keras.ops.convert_to_numpy(variable))


def output_spec(fn, *args):
    """KerasTensors of `fn`'s outputs for KerasTensor `args`, from a
    trace (which lets `fn` use TensorFlow ops)."""
    specs = keras.tree.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), args
    )
    outputs = (
        tf.function(fn, autograph=False)
        .get_concrete_function(*specs)
        .structured_outputs
    )
    return keras.tree.map_structure(
        lambda t: keras.KerasTensor(tuple(t.shape), dtype=t.dtype.name),
        outputs,
    )


def repeat(step, init, steps: int):
    """`step` applied `steps` times from `init`, differentiably.

    Inside a `tf.function` the steps run in a `tf.while_loop`, so `step` is
    traced once rather than `steps` times; `maximum_iterations` bounds the
    loop for XLA's gradient, so the loop carries no counter of its own.
    """
    if tf.executing_eagerly() or steps == 1:
        state = init
        for _ in range(steps):
            state = step(state)
        return state
    return tf.while_loop(
        lambda *state: True,
        lambda *state: step(state),
        init,
        maximum_iterations=steps,
    )


def attach_backward(z, residuals, backward):
    """`z`, whose incoming gradient g is replaced by `backward(residuals, g)`.

    The backward runs unrecorded (even under an outer, persistent or nested
    tape), and its result refuses gradients of its own: see `_first_order`.
    `residuals` is what the backward reads (a nest of tensors); here it may
    also be closed over.
    """

    @tf.custom_gradient
    def attach(z):
        def grad(g):
            with record.stop_recording():
                u = backward(residuals, g)
            return _first_order(tf.cast(u, z.dtype), z)

        return tf.identity(z), grad

    return attach(z)


@tf.custom_gradient
def _first_order(u, anchor):
    """u, whose own gradient is refused.

    u depends on θ and the inputs through z* and J_f(z*), but the backward
    solve is computed unrecorded, so an outer tape would see a constant and
    return plausible, wrong second derivatives. `anchor` (f(z*), which the
    tapes did record) ties u to θ and the inputs, so that any gradient of u
    reaches this function and is refused.
    """

    def grad(_):
        raise ValueError(SECOND_ORDER_REFUSED)

    return tf.identity(u), grad


class _SecondOrderOnlyWarning(logging.Filter):
    """Drops TensorFlow's load-time warning about the refusal above.

    A SavedModel saves the implicit gradient (a model's exported `serve`
    is differentiated exactly as the live model), but not the custom
    gradient inside that gradient function, `_first_order`'s refusal of
    second-order gradients: TensorFlow does not save gradients of gradient
    functions, and a refusal could not be traced anyway. Loading then warns
    that a gradient "will likely fail" for each `internal_grad_fn` holding
    it, which reads as if first-order gradients were broken. Only a
    gradient of the gradient fails (refused, as in the live model), so the
    warning about gradient functions says nothing a user can act on; any
    other function's warning passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith(
                "Importing a function (%s) with ops with unsaved custom "
                "gradients"
            )
            and bool(record.args)
            and "internal_grad_fn" in str(record.args[0])
        )


# TensorFlow's SavedModel loader logs through absl's logger.
logging.getLogger("absl").addFilter(_SecondOrderOnlyWarning())
