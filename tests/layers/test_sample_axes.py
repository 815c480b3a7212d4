"""DEQLayer(sample_axes=2): one solve per sequence position."""

import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from tests import numerics
from tests.blocks import CausalSequenceCell
from tests.blocks import TanhCell


def sequences(seed=0, batch=3, length=8, features=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, length, features))


def layer_for(sample_axes, **kwargs):
    kwargs = {"solver": "broyden", "max_iter": 40, "tol": 1e-3, **kwargs}
    return keras_deq.DEQLayer(
        CausalSequenceCell(dtype="float64"),
        sample_axes=sample_axes,
        dtype="float64",
        **kwargs,
    )


def plain_iteration(block, x, steps=400):
    z = block.initial_state(x)
    for _ in range(steps):
        z = block(z, x)
    return z.numpy()


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_later_inputs_leave_earlier_outputs_exactly_unchanged(solver):
    x = sequences()
    changed = x.copy()
    changed[:, 5:] = sequences(seed=1)[:, 5:]
    per_position = layer_for(2, solver=solver)
    a, b = per_position(x).numpy(), per_position(changed).numpy()
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-2
    # One problem per sequence: the quasi-Newton updates mix positions, so
    # at tolerance 1e-3 later inputs move earlier outputs.
    per_sequence = layer_for(1, solver=solver)
    a, b = per_sequence(x).numpy(), per_sequence(changed).numpy()
    assert np.abs(a[:, :5] - b[:, :5]).max() > 1e-9


def test_solution_and_statistics_per_position():
    x = sequences(seed=2)
    layer = layer_for(2, tol=1e-10)
    out = layer(x).numpy()
    np.testing.assert_allclose(
        out, plain_iteration(layer.block, tf.constant(x)), atol=1e-9
    )
    assert out.shape == (3, 8, 5)
    # Means over 3 × 8 positions, each solved to 1e-10.
    assert float(layer.forward_residual.result()) < 1e-10
    assert float(layer.forward_nfe.count) == 24


def test_implicit_gradient_per_position_matches_finite_differences():
    x = tf.Variable(sequences(seed=3, batch=2, length=4, features=2))
    layer = layer_for(2, max_iter=100, tol=1e-13, backward_tol=1e-13)
    weights = np.random.default_rng(4).normal(size=(2, 4, 5))

    def loss(training):
        return tf.reduce_sum(layer(x, training=training) * weights)

    with tf.GradientTape() as tape:
        value = loss(True)
    grads = tape.gradient(value, [x] + layer.trainable_variables)
    fd = numerics.central_differences(
        lambda: loss(False).numpy(), [x] + layer.trainable_variables
    )
    for g, e in zip(grads, fd, strict=True):
        err = np.linalg.norm(g.numpy() - e) / np.linalg.norm(e)
        assert err < 1e-6


def test_spectral_radius_is_per_sequence():
    x = sequences(seed=5, batch=2, length=3, features=4)
    layer = layer_for(2, tol=1e-10)
    rho = layer.spectral_radius(x, num_iters=200).numpy()
    assert rho.shape == (2,)
    # Dense reference: the Jacobian of the whole flattened sequence at z*.
    z = tf.constant(layer(x).numpy())
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(z)
        fz = layer.block(z, xt)
    jac = tape.batch_jacobian(fz, z).numpy().reshape(2, 15, 15)
    expected = [np.abs(np.linalg.eigvals(j)).max() for j in jac]
    np.testing.assert_allclose(rho, expected, rtol=1e-3)


def test_bad_sample_axes_raise():
    with pytest.raises(ValueError, match="sample_axes"):
        keras_deq.DEQLayer(TanhCell(), sample_axes=0)
    layer = keras_deq.DEQLayer(TanhCell(units=4), sample_axes=2)
    with pytest.raises(ValueError, match="sample_axes"):
        layer(np.zeros((2, 4), "float32"))


def test_config_round_trip_keeps_sample_axes():
    layer = layer_for(2)
    clone = keras_deq.DEQLayer.from_config(layer.get_config())
    assert clone.sample_axes == 2
