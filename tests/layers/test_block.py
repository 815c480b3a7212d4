"""Warm starts: `DEQLayer(x, initial_state=z)`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_deq.layers import DEQLayer
from tests.testing import LinearCell
from tests.testing import TanhCell
from tests.testing import TwoResolutionCell


def linear_layer(solver="fixed_point", **kwargs):
    layer = DEQLayer(
        LinearCell(norm=0.9, seed=1),
        solver=solver,
        max_iter=200,
        tol=1e-6,
        **kwargs,
    )
    layer.build((None, 8))
    return layer


def exact(layer, x):
    a = layer.block.a.numpy().astype(np.float64)
    return x.astype(np.float64) @ np.linalg.inv(np.eye(len(a)) - a)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("eager", [True, False])
def test_a_start_at_the_fixed_point_stops_at_once(solver, eager):
    layer = linear_layer(solver)
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    z_star = exact(layer, x).astype("float32")

    def solve(start):
        layer.forward_nfe.reset_state()
        out = layer(x, initial_state=start)
        return out.numpy(), float(layer.forward_nfe.result())

    if not eager:
        solve_fn = tf.function(lambda start: layer(x, initial_state=start))

        def solve(start):  # noqa: F811
            layer.forward_nfe.reset_state()
            out = solve_fn(tf.constant(start))
            return out.numpy(), float(layer.forward_nfe.result())

    cold, cold_nfe = solve(np.zeros_like(z_star))
    warm, warm_nfe = solve(z_star)
    np.testing.assert_allclose(cold, z_star, atol=1e-4)
    np.testing.assert_allclose(warm, z_star, atol=1e-5)
    assert warm_nfe <= 2 < cold_nfe


def test_a_drifting_stream_needs_fewer_iterations_warm():
    """x_{t+1} = x_t + small noise: start each solve at the last output."""
    layer = DEQLayer(TanhCell(units=16, w_norm=0.95), max_iter=100, tol=1e-5)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5)).astype("float32")
    solve = tf.function(lambda x, z0: layer(x, initial_state=z0))
    cold_solve = tf.function(lambda x: layer(x))
    z = cold_solve(x)
    cold_nfe, warm_nfe = [], []
    for _ in range(10):
        x = x + 0.01 * rng.normal(size=x.shape).astype("float32")
        layer.forward_nfe.reset_state()
        cold = cold_solve(x)
        cold_nfe.append(float(layer.forward_nfe.result()))
        layer.forward_nfe.reset_state()
        z = solve(x, z)
        warm_nfe.append(float(layer.forward_nfe.result()))
        # Both stop on the same relative tolerance: they agree to within it.
        np.testing.assert_allclose(z.numpy(), cold.numpy(), atol=1e-4)
    assert np.mean(warm_nfe) < 0.7 * np.mean(cold_nfe), (warm_nfe, cold_nfe)


@pytest.mark.parametrize("gradient", ["implicit", "phantom", "unrolled"])
def test_no_gradient_flows_into_the_initial_state(gradient):
    layer = linear_layer(gradient=gradient)
    x = tf.constant(
        np.random.default_rng(3).normal(size=(2, 8)).astype("float32")
    )
    start = tf.Variable(tf.ones([2, 8]))

    def loss_and_grads(initial_state):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = layer(x, initial_state=initial_state, training=True)
            loss = tf.reduce_sum(tf.sin(z))
        return tape.gradient(loss, [x, start])

    warm_x, warm_start = loss_and_grads(start)
    cold_x, _ = loss_and_grads(None)
    assert warm_start is None
    if gradient == "implicit":
        # The implicit gradient depends on z* only: equal to the cold one.
        np.testing.assert_allclose(warm_x.numpy(), cold_x.numpy(), atol=1e-4)


def test_a_nested_state_and_a_functional_model():
    cell = TwoResolutionCell()
    layer = DEQLayer(cell, max_iter=60, tol=1e-6)
    x_in = keras.Input((7,))
    fine_in, coarse_in = keras.Input((4, 3)), keras.Input((5,))
    out = layer(x_in, initial_state=[fine_in, coarse_in])
    model = keras.Model([x_in, fine_in, coarse_in], out)
    x = np.random.default_rng(4).normal(size=(2, 7)).astype("float32")
    cold = layer(x)
    warm = model([x, cold[0].numpy(), cold[1].numpy()])
    for a, b in zip(cold, warm, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_a_wrong_initial_state_is_a_clear_error():
    layer = linear_layer()
    x = np.zeros((2, 8), "float32")
    with pytest.raises(ValueError, match=r"initial_state.*shape.*\(2, 8\)"):
        layer(x, initial_state=np.zeros((2, 7), "float32"))
    with pytest.raises(ValueError, match=r"initial_state.*shape.*\(2, 8\)"):
        layer(x, initial_state=np.zeros((3, 8), "float32"))
    with pytest.raises(ValueError, match="structure of the state"):
        layer(x, initial_state=[np.zeros((2, 8), "float32")] * 2)
