"""The JAX side of `keras_deq.backend`.

Histories are written with `lax.dynamic_update_slice`, which XLA performs
in place on a loop-carried buffer that nothing reads afterwards.
"""

import contextlib

import jax
import jax.numpy as jnp
import keras
from jax.scipy.linalg import cho_solve
from keras.src.backend import compute_output_spec

from keras_deq.backend._common import SECOND_ORDER_REFUSED

Tensor = jax.Array

# Inside a training step Keras' JAX trainer gives a layer the values of its
# weights only, not of the metrics it owns (keras-team/keras#21639), and a
# `custom_vjp` backward returns cotangents only: a layer's statistics are
# recorded in eager calls only (`records_now`).
LAYER_METRICS = False

# A SavedModel exported from JAX (jax2tf) takes every dynamic dimension as
# >= 1: an endpoint cannot be called with an empty axis.
EXPORT_EMPTY_AXES = False


def records_now(value) -> bool:
    """Whether a metric update with `value` takes effect: in an eager call
    (a concrete value, outside Keras' stateless scopes), not in a trace."""
    return not isinstance(value, jax.core.Tracer) and not (
        keras.src.backend.in_stateless_scope()
    )


def new_history(z0: Tensor, count: int, slots: int) -> Tensor:
    """`count` zero-filled histories of `slots` vectors like each row of z0."""
    batch, dim = z0.shape
    return jnp.zeros((count, batch, slots, dim), z0.dtype)


def write_history(
    history: Tensor, slot: Tensor, values: list[Tensor], after: list[Tensor]
) -> Tensor:
    """Puts `values[i]` (`[B, d]`) into slot `slot` of history `i`.

    `after` orders writes after reads in a TensorFlow graph; JAX arrays
    are values, so there is nothing to order.
    """
    del after
    zero = jnp.zeros((), jnp.asarray(slot).dtype)
    block = jnp.stack(values)[:, :, None, :]
    return jax.lax.dynamic_update_slice(
        history, block, (zero, zero, slot, zero)
    )


def fix_shape(x: Tensor, shape) -> Tensor:
    """`x`, whose shape JAX already knows statically; checks it against
    `shape` (`None` matches any size)."""
    if len(x.shape) != len(shape) or any(
        want is not None and have != want
        for have, want in zip(x.shape, shape, strict=True)
    ):
        raise ValueError(
            f"Expected a tensor of shape {tuple(shape)}. Received: "
            f"shape={tuple(x.shape)}"
        )
    return x


def cholesky_solve(h: Tensor, rhs: Tensor) -> Tensor:
    """h⁻¹ rhs for batched SPD `h`; NaN where the factorisation fails."""
    return cho_solve((jnp.linalg.cholesky(h), True), rhs)


def _first_cotangent(pullback, u):
    return pullback(u)[0]


def linearize(f, z: Tensor):
    """`(f(z), vjp)` from one evaluation (`jax.vjp`); the products are
    differentiable by JAX's transformations.

    `vjp` is a `jax.tree_util.Partial`, a pytree of the evaluation's
    residuals, so that it can be handed to a custom gradient explicitly
    (`attach_backward`) rather than closed over.
    """
    fz, pullback = jax.vjp(f, z)
    return fz, jax.tree_util.Partial(_first_cotangent, pullback)


def normal(shape, dtype, seed, index: int) -> Tensor:
    """N(0, 1) draws: probe `index` of `seed` (see `jacobian`'s seeds).

    An int or scalar integer array seed gives the key
    `fold_in(key(seed), index)`; `None` Keras' global generator.
    """
    if seed is None or isinstance(seed, keras.random.SeedGenerator):
        return keras.random.normal(shape, dtype=dtype, seed=seed)
    is_int = isinstance(seed, int) and not isinstance(seed, bool)
    if is_int or (
        isinstance(seed, jax.Array)
        and jnp.issubdtype(seed.dtype, jnp.integer)
        and seed.ndim == 0
    ):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.normal(key, tuple(shape), dtype)
    raise TypeError(
        "`seed` must be an int (or a scalar integer array), a "
        "keras.random.SeedGenerator or None. "
        f"Received: seed={seed!r} of type {type(seed).__name__}"
    )


def unrecorded():
    """Nothing to enter: JAX records no tape. The solve's outputs are held
    constant with `stop_gradient`, so no gradient enters its loop."""
    return contextlib.nullcontext()


def loops_run_op_by_op() -> bool:
    """Never: `lax.while_loop` compiles its body, also eagerly."""
    return False


def function(fn, signature=None, jit_compile: bool = False, state=None):
    """`fn` compiled with `jax.jit`, per input shape, when `state` names
    the layer whose variables it reads: their current values go in as
    arguments (a jitted closure would hold those of its trace). Without
    `state`, `fn` as it is (see `loops_run_op_by_op`)."""
    del signature, jit_compile
    if state is None:
        return fn

    def pure(values, *args):
        mapping = list(zip(state.variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return fn(*args)

    compiled = jax.jit(pure)

    def call(*args):
        return compiled([v.value for v in state.variables], *args)

    return call


def current_value(variable) -> float:
    """A scalar variable's value as last stored, also while a step is
    traced (where `variable.value` is the step's tracer)."""
    return float(keras.ops.convert_to_numpy(variable._value))


def output_spec(fn, *args):
    """KerasTensors of `fn`'s outputs for KerasTensor `args`."""
    return compute_output_spec(fn, *args)


def repeat(step, init, steps: int):
    """`step` applied `steps` times from `init`, differentiably: a
    `lax.fori_loop` with static bounds (a scan), traced once."""
    if steps == 1:
        return step(init)
    return jax.lax.fori_loop(0, steps, lambda _, state: step(state), init)


def attach_backward(z, residuals, backward):
    """`z`, whose incoming gradient g is replaced by `backward(residuals, g)`.

    JAX refuses to differentiate a `custom_vjp` with respect to values its
    rule closes over, so the backward's inputs (the vector-Jacobian
    products' residuals, which depend on the weights being differentiated)
    go in explicitly, as `residuals`, with zero cotangents: the gradient
    reaches the weights through `z`, one evaluation of f. The result
    refuses gradients of its own, as on TensorFlow.
    """

    @jax.custom_vjp
    def attach(z, residuals):
        return z

    def forward(z, residuals):
        return z, residuals

    def grad(residuals, g):
        u = _first_order(backward(residuals, g).astype(g.dtype))
        return u, None

    attach.defvjp(forward, grad)
    return attach(z, residuals)


@jax.custom_vjp
def _first_order(u):
    """u, whose own gradient is refused (see the TensorFlow module)."""
    return u


def _first_order_forward(u):
    return u, None


def _first_order_grad(_, g):
    raise ValueError(SECOND_ORDER_REFUSED)


_first_order.defvjp(_first_order_forward, _first_order_grad)
