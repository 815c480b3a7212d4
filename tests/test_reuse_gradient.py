"""DEQLayer(gradient="reuse"): the backward started from the forward's
Broyden estimate of (I − J)⁻ᵀ, against dense linear algebra, the forward's
own estimate applied by hand, and the tightly solved implicit gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq import solvers
from tests.blocks import CausalSequenceCell
from tests.blocks import LinearCell
from tests.blocks import TanhCell
from tests.test_gradients import assert_close_relative
from tests.test_gradients import tape_gradients
from tests.test_gradients import weighted_sum

TIGHT = dict(max_iter=100, tol=1e-13, backward_tol=1e-13)


def exact_linear_gradients(block, x):
    """z* = x (I − A)⁻¹ by a dense solve, differentiated by the tape."""
    with tf.GradientTape() as tape:
        eye = tf.eye(block.a.shape[0], dtype=block.a.dtype)
        z = tf.transpose(
            tf.linalg.solve(tf.transpose(eye - block.a), tf.transpose(x))
        )
        loss = weighted_sum(z)
    return tape.gradient(loss, [x, block.a])


def test_pure_reuse_is_exact_where_broyden_learns_the_whole_jacobian():
    """With one state unit per sample, one secant pair is the whole
    Jacobian: no backward iteration, and the gradient is exact."""
    x = tf.Variable(np.random.default_rng(0).normal(size=(4, 1)))
    block = LinearCell(norm=0.8, dtype="float64")
    layer = keras_deq.DEQLayer(
        block, dtype="float64", gradient="reuse", backward_max_iter=0, **TIGHT
    )
    grads = tape_gradients(layer, x)
    assert_close_relative(grads, exact_linear_gradients(block, x), 1e-10)
    # No backward solve ran, so there is nothing to report.
    assert np.isnan(layer.backward_nfe.result().numpy())


def test_pure_reuse_applies_the_forward_estimate():
    """d = 6: Broyden's estimate is not the inverse (the good update keeps
    only the secant conditions), and the gradient is exactly the one it
    gives: uᵀ = gᵀ(I − J)⁻¹ estimated, passed through ∂f/∂θ."""
    rng = np.random.default_rng(1)
    x = tf.Variable(rng.normal(size=(3, 6)))
    block = LinearCell(norm=0.9, dtype="float64")
    layer = keras_deq.DEQLayer(
        block, dtype="float64", gradient="reuse", backward_max_iter=0, **TIGHT
    )
    grads = tape_gradients(layer, x)
    # By hand: the same solve, its estimate applied to ∂ℓ/∂z*.
    a = block.a

    def f(z):
        return z @ a + x

    forward = solvers.broyden(f, tf.zeros_like(x), 100, 1e-13)
    z = forward.z
    with tf.GradientTape() as tape:
        tape.watch(z)
        loss = weighted_sum(z)
    g = tape.gradient(loss, z)
    norm = tf.norm(g, axis=-1, keepdims=True)
    u = forward.inverse.transpose_matvec(g / norm) * norm
    with tf.GradientTape() as tape:
        out = f(forward.z)
    expected = tape.gradient(out, [x, a], output_gradients=u)
    assert_close_relative(grads, expected, 1e-10)
    # ... which differs from the exact gradient: this is the approximation
    # that refinements remove.
    exact = exact_linear_gradients(block, x)
    error = np.linalg.norm(grads[0] - exact[0]) / np.linalg.norm(exact[0])
    assert error > 1e-3


@pytest.mark.parametrize("refinements", [3, 100])
def test_refined_reuse_matches_the_exact_gradient(refinements):
    """Refinements are backward iterations from the estimate: enough of
    them give the dense solution, and they start closer than ∂ℓ/∂z*."""
    rng = np.random.default_rng(2)
    x = tf.Variable(rng.normal(size=(3, 6)))
    block = LinearCell(norm=0.9, dtype="float64")
    reuse = keras_deq.DEQLayer(
        block,
        dtype="float64",
        gradient="reuse",
        **{**TIGHT, "backward_max_iter": refinements},
    )
    grads = tape_gradients(reuse, x)
    exact = exact_linear_gradients(block, x)
    if refinements == 100:
        assert_close_relative(grads, exact, 1e-9)
        assert reuse.backward_residual.result().numpy() < 1e-13
        return
    implicit = keras_deq.DEQLayer(
        block, dtype="float64", **{**TIGHT, "backward_max_iter": refinements}
    )
    plain = tape_gradients(implicit, x)

    def error(g):
        return np.linalg.norm(g[0] - exact[0]) / np.linalg.norm(exact[0])

    assert error(grads) < error(plain)
    assert reuse.backward_nfe.result().numpy() == refinements


def test_reuse_matches_implicit_on_a_nonlinear_block():
    x = tf.Variable(np.random.default_rng(3).normal(size=(3, 4)))
    block = TanhCell(units=6, dtype="float64")
    reuse = keras_deq.DEQLayer(
        block, dtype="float64", gradient="reuse", **TIGHT
    )
    implicit = keras_deq.DEQLayer(block, dtype="float64", **TIGHT)
    assert_close_relative(
        tape_gradients(reuse, x), tape_gradients(implicit, x), 1e-9
    )


@pytest.mark.parametrize("refinements", [0, 2])
def test_a_sample_gradient_does_not_depend_on_its_batch(refinements):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 4)) * np.array([[0.1], [1.0], [3.0], [0.5], [2]])
    block = TanhCell(units=6, dtype="float64")
    layer = keras_deq.DEQLayer(
        block,
        dtype="float64",
        gradient="reuse",
        max_iter=30,
        tol=1e-6,
        backward_max_iter=refinements,
    )

    def input_gradient(batch):
        batch = tf.Variable(batch)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(layer(batch, training=True)))
        return tape.gradient(loss, batch).numpy()

    together = input_gradient(x)
    for i in range(len(x)):
        alone = input_gradient(x[i : i + 1])
        np.testing.assert_allclose(alone[0], together[i], rtol=1e-9)


def test_reuse_per_position_rows_matches_implicit():
    """sample_axes=2: the estimate is per position (block-diagonal), the
    refinements solve the coupled system per sample."""
    rng = np.random.default_rng(5)
    x = tf.Variable(rng.normal(size=(2, 7, 3)))
    block = CausalSequenceCell(units=5, dtype="float64")
    kwargs = dict(dtype="float64", sample_axes=2, **TIGHT)
    reuse = keras_deq.DEQLayer(block, gradient="reuse", **kwargs)
    implicit = keras_deq.DEQLayer(block, **kwargs)
    assert_close_relative(
        tape_gradients(reuse, x), tape_gradients(implicit, x), 1e-9
    )


def test_reuse_needs_a_broyden_forward():
    layer = keras_deq.DEQLayer(
        TanhCell(units=6), solver="anderson", gradient="reuse"
    )
    with pytest.raises(ValueError, match='solver="broyden"'):
        layer(tf.ones([2, 4]), training=True)
    with pytest.raises(ValueError, match="backward_max_iter"):
        keras_deq.DEQLayer(TanhCell(units=6), backward_max_iter=-1)


def test_reuse_trains_and_survives_a_keras_round_trip(
    tmp_path, record_property
):
    """fit under XLA (jit_compile=True) lowers the loss; the setting and the
    predictions come back from `.keras`."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(4, 1))).astype(np.float32)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras_deq.DEQLayer(
                TanhCell(units=8),
                gradient="reuse",
                backward_max_iter=2,
                max_iter=20,
                name="deq",
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=True)
    history = model.fit(x, y, epochs=30, batch_size=16, verbose=0).history
    record_property("loss_ratio", history["loss"][-1] / history["loss"][0])
    assert history["loss"][-1] < 0.6 * history["loss"][0], history["loss"]
    assert 1 <= history["deq_backward_nfe"][-1] <= 2
    path = str(tmp_path / "reuse.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    deq = loaded.layers[0]
    assert (deq.gradient, deq.backward_max_iter) == ("reuse", 2)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


@pytest.mark.parametrize("refinements", [0, 2])
def test_reuse_under_mirrored_strategy_matches_single_device(
    mirrored, refinements
):
    """One fit step over two replicas (8 samples each) gives the weights of
    one step on one device over all 16: each replica's reuse backward reads
    only its own samples' Broyden estimates."""
    from tests.layers.test_deq_layer import classifier
    from tests.layers.test_deq_layer import data
    from tests.layers.test_deq_layer import one_step_weights

    kwargs = dict(gradient="reuse", backward_max_iter=refinements, max_iter=20)
    x, y = data(n=16)
    keras.utils.set_random_seed(3)
    single = one_step_weights(classifier(**kwargs), x, y)
    keras.utils.set_random_seed(3)
    with mirrored.scope():
        model = classifier(**kwargs)
        replicated = one_step_weights(model, x, y)
    assert mirrored.num_replicas_in_sync == 2, "conftest makes two CPUs"
    keras.utils.set_random_seed(3)
    fresh = classifier(**kwargs)
    trainable = {id(w) for w in fresh.trainable_weights}
    for a, b, w0 in zip(single, replicated, fresh.weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        if id(w0) in trainable:
            moved = np.abs(a - w0.numpy()).max()
            assert moved > 1e-4, f"the step must move {w0.path}"
    # Both replicas report their samples' refinements (none to report at 0).
    counted = model.get_layer("deq").backward_nfe.count.numpy()
    assert counted == (16 if refinements else 0)
