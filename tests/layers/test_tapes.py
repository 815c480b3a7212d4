"""DEQLayer under persistent and nested tapes, and second-order requests."""

import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from tests import numerics
from tests.blocks import TanhCell

SOLVERS = ["broyden", "anderson", "fixed_point"]
MODES = ["eager", "graph", "xla"]


def compiled(fn, mode):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=mode == "xla")


def inputs(dtype="float32"):
    rng = np.random.default_rng(0)
    return tf.Variable(rng.normal(size=(3, 4)), dtype=dtype)


def loss_of(out):
    weights = np.random.default_rng(7).normal(size=out.shape)
    return tf.reduce_sum(out * tf.cast(weights, out.dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_persistent_and_nested_tapes_give_the_plain_gradient(solver, mode):
    layer = keras_deq.DEQLayer(TanhCell(units=4), solver=solver, tol=1e-5)
    x = inputs()
    layer(x)
    sources = [x] + layer.trainable_variables

    def plain():
        with tf.GradientTape() as tape:
            loss = loss_of(layer(x, training=True))
        return tape.gradient(loss, sources)

    def persistent_and_nested():
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                loss = loss_of(layer(x, training=True))
            inner_grads = inner.gradient(loss, sources)
            inference = layer(x, training=False)  # no gradient asked
        return inner_grads, outer.gradient(loss, sources), inference

    expected = compiled(plain, mode)()
    inner_grads, outer_grads, inference = compiled(
        persistent_and_nested, mode
    )()
    assert np.all(np.isfinite(inference.numpy()))
    for a, b, e in zip(inner_grads, outer_grads, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)


def second_order(layer, x, direction):
    """d/dx of (∂L/∂x)·r, with L the weighted sum of the layer's output."""
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = loss_of(layer(x, training=True))
        grad = inner.gradient(loss, x)
        projected = tf.reduce_sum(grad * direction)
    return outer.gradient(projected, x)


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_second_order_through_the_implicit_gradient_is_refused(solver, mode):
    layer = keras_deq.DEQLayer(TanhCell(units=4), solver=solver)
    x = inputs()
    direction = tf.ones_like(x)
    with pytest.raises(ValueError, match="unrolled.*phantom"):
        compiled(lambda: second_order(layer, x, direction), mode)()


def test_second_order_of_the_unrolled_gradient_is_exact():
    """Against central differences of the first-order gradient, float64."""
    layer = keras_deq.DEQLayer(
        TanhCell(units=4, dtype="float64"),
        gradient="unrolled",
        max_iter=6,
        dtype="float64",
    )
    x = inputs("float64")
    direction = tf.constant(np.random.default_rng(3).normal(size=(3, 4)))

    def projected_gradient():
        with tf.GradientTape() as tape:
            loss = loss_of(layer(x, training=True))
        return float(tf.reduce_sum(tape.gradient(loss, x) * direction))

    expected = numerics.central_differences(projected_gradient, [x])[0]
    actual = second_order(layer, x, direction).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-9)


def test_second_order_of_the_phantom_gradient_holds_z_star_fixed():
    """Phantom with one step is f(z*, x) with z* a constant: its second
    derivative is that of x ↦ L(f(z*, x)), checked by central differences
    of a gradient computed without the layer."""
    block = TanhCell(units=4, dtype="float64")
    layer = keras_deq.DEQLayer(
        block, gradient="phantom", tol=1e-12, max_iter=60, dtype="float64"
    )
    x = inputs("float64")
    direction = tf.constant(np.random.default_rng(3).normal(size=(3, 4)))
    z_star = tf.constant(layer(x).numpy())

    def projected_gradient():
        with tf.GradientTape() as tape:
            loss = loss_of(block(z_star, x))
        return float(tf.reduce_sum(tape.gradient(loss, x) * direction))

    expected = numerics.central_differences(projected_gradient, [x])[0]
    actual = second_order(layer, x, direction).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-9)
