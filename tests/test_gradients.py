"""Gradients of DEQLayer against independent references, in float64."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from tests import numerics
from tests.blocks import TanhCell
from tests.blocks import TwoResolutionCell

TIGHT = dict(max_iter=100, tol=1e-13, backward_tol=1e-13)


def make_layer(block=None, **kwargs):
    block = block or TanhCell(units=6, dtype="float64")
    layer = keras_deq.DEQLayer(block, dtype="float64", **{**TIGHT, **kwargs})
    return layer


def problem(seed=0, batch=3, features=4):
    rng = np.random.default_rng(seed)
    x = tf.Variable(rng.normal(size=(batch, features)))
    return x


def weighted_sum(out, seed=7):
    """A loss whose weights differ per element, so no gradient cancels."""
    leaves = tf.nest.flatten(out)
    rng = np.random.default_rng(seed)
    return sum(
        tf.reduce_sum(leaf * rng.normal(size=leaf.shape)) for leaf in leaves
    )


def tape_gradients(layer, x, loss_fn=weighted_sum):
    with tf.GradientTape() as tape:
        loss = loss_fn(layer(x, training=True))
    return tape.gradient(loss, [x] + layer.trainable_variables)


def central_differences(layer, x, eps=1e-6, loss_fn=weighted_sum):
    loss = tf.function(lambda: loss_fn(layer(x, training=False)))
    return numerics.central_differences(
        lambda: loss().numpy(), [x] + layer.trainable_variables, eps
    )


def assert_close_relative(actual, expected, rtol):
    for a, e in zip(actual, expected, strict=True):
        a = np.asarray(a)
        err = np.linalg.norm(a - e) / np.linalg.norm(e)
        assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_implicit_gradient_matches_finite_differences(solver):
    x = problem()
    layer = make_layer(solver=solver)
    implicit = tape_gradients(layer, x)
    reference = central_differences(layer, x)
    assert_close_relative(implicit, reference, 1e-5)


def test_implicit_gradient_matches_long_unrolled_computation():
    x = problem(seed=1)
    layer = make_layer()
    unrolled = keras_deq.DEQLayer(
        layer.block, dtype="float64", gradient="unrolled", max_iter=300
    )
    assert_close_relative(
        tape_gradients(layer, x), tape_gradients(unrolled, x), 1e-8
    )


def test_implicit_gradient_of_nested_state_matches_finite_differences():
    x = problem(seed=2, features=3)
    layer = make_layer(block=TwoResolutionCell(dtype="float64"))
    out = layer(x)
    assert [tuple(t.shape) for t in out] == [(3, 4, 3), (3, 5)]
    assert_close_relative(
        tape_gradients(layer, x), central_differences(layer, x), 1e-5
    )


def test_nested_state_solve_matches_plain_iteration():
    x = problem(seed=2, features=3)
    block = TwoResolutionCell(dtype="float64")
    layer = make_layer(block=block, solver="anderson")
    out = layer(x)
    # Independent reference: iterate the block itself to convergence.
    z = block.initial_state(x)
    for _ in range(500):
        z = block(z, x)
    for a, b in zip(out, z, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-10)


def test_tiny_loss_gives_proportionally_tiny_gradients():
    x = problem(seed=3)
    layer = keras_deq.DEQLayer(TanhCell(units=6), backward_tol=1e-4)
    x32 = tf.Variable(tf.cast(x, tf.float32))
    full = tape_gradients(layer, x32)
    tiny = tape_gradients(layer, x32, lambda out: 1e-8 * weighted_sum(out))
    for g, t in zip(full, tiny, strict=True):
        np.testing.assert_allclose(
            t.numpy() * 1e8, g.numpy(), rtol=1e-4, atol=1e-7
        )
        assert np.linalg.norm(t.numpy()) > 0


def test_phantom_gradient_is_damped_steps_from_the_fixed_point():
    x = problem(seed=4)
    layer = make_layer(gradient="phantom", phantom_steps=3, phantom_tau=0.6)
    out = layer(x)
    block = layer.block
    # Reference: z* by plain iteration, then three damped steps on a tape.
    z_star = block.initial_state(x)
    for _ in range(400):
        z_star = block(z_star, x)
    with tf.GradientTape() as tape:
        z = tf.constant(z_star)
        for _ in range(3):
            z = 0.6 * block(z, x) + 0.4 * z
        loss = weighted_sum(z)
    expected = tape.gradient(loss, [x] + block.trainable_variables)
    np.testing.assert_allclose(out.numpy(), z.numpy(), atol=1e-12)
    assert_close_relative(tape_gradients(layer, x), expected, 1e-9)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_unrolled_gradient_backpropagates_through_every_step(graph):
    """Eagerly the steps are a Python loop; in a tf.function a while loop
    (f traced once): both give the written-out computation's gradient."""
    x = problem(seed=5)
    layer = make_layer(gradient="unrolled", max_iter=4)
    out = layer(x)
    block = layer.block
    with tf.GradientTape() as tape:
        z = block.initial_state(x)
        for _ in range(4):
            z = block(z, x)
        loss = weighted_sum(z)
    expected = tape.gradient(loss, [x] + block.trainable_variables)
    np.testing.assert_allclose(out.numpy(), z.numpy(), atol=1e-14)
    gradients = tape_gradients
    if graph:
        gradients = tf.function(lambda layer, x: tape_gradients(layer, x))
        traced = gradients.get_concrete_function(layer, x).graph
        assert "while" in {op.type.lower() for op in traced.get_operations()}
    assert_close_relative(gradients(layer, x), expected, 1e-12)


def test_gradients_reach_what_the_input_depends_on():
    rng = np.random.default_rng(6)
    inputs = keras.Input((5,), dtype="float64")
    encoded = keras.layers.Dense(4, dtype="float64", name="encoder")(inputs)
    out = make_layer()(encoded)
    model = keras.Model(inputs, out)
    x = tf.constant(rng.normal(size=(3, 5)))
    with tf.GradientTape() as tape:
        loss = weighted_sum(model(x, training=True))
    encoder = model.get_layer("encoder")
    grads = tape.gradient(loss, encoder.trainable_variables)
    loss_fn = tf.function(lambda: weighted_sum(model(x)))
    kernel = encoder.kernel
    value = kernel.numpy()
    eps = 1e-6
    bumped = value.copy()
    bumped[1, 2] += eps
    kernel.assign(bumped)
    up = loss_fn().numpy()
    bumped[1, 2] -= 2 * eps
    kernel.assign(bumped)
    down = loss_fn().numpy()
    kernel.assign(value)
    np.testing.assert_allclose(
        grads[0].numpy()[1, 2], (up - down) / (2 * eps), rtol=1e-6
    )


def test_backward_statistics_are_recorded():
    x = problem(seed=8)
    layer = make_layer(backward_max_iter=50)
    tape_gradients(layer, x)
    assert 1 <= layer.backward_nfe.result().numpy() <= 50
    assert layer.backward_residual.result().numpy() < 1e-13
    assert 1 <= layer.forward_nfe.result().numpy() <= 100


def test_backward_stops_on_a_residual_relative_to_the_incoming_gradient():
    """f(z) = 0.99 z + x: u = g / 0.01, so ‖u‖ is 100 ‖g‖.

    Stopping relative to ‖uJ + g‖ ≈ ‖u‖ (instead of ‖g‖) stops 100 times
    too early here: the gradient came out 1% off at backward_tol 1e-4.
    """
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 5)))
    g = tf.constant(rng.normal(size=(3, 5)) * [[1.0], [1e-6], [1e3]])
    recorded = []

    def f(z):
        return 0.99 * z + x

    with tf.GradientTape() as tape:
        tape.watch(x)
        z = keras_deq.gradients.implicit(
            f,
            tf.stop_gradient(x / 0.01),
            keras_deq.solvers.fixed_point,
            5000,
            1e-4,
            on_backward=recorded.append,
        )
        loss = tf.reduce_sum(z * g)
    u = tape.gradient(loss, x).numpy()
    g = g.numpy()
    true_residual = np.linalg.norm(u - 0.99 * u - g, axis=-1) / np.linalg.norm(
        g, axis=-1
    )
    reported = recorded[0].rel_residual.numpy()
    assert np.all(true_residual < 1e-4), true_residual
    np.testing.assert_allclose(reported, true_residual, rtol=1e-6)
    error = np.linalg.norm(u - g / 0.01, axis=-1) / np.linalg.norm(
        g / 0.01, axis=-1
    )
    assert np.all(error < 1e-4), error
