"""Gradient kinds by name: the built-in ones and one a user registers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq import gradients
from keras_deq.solvers import SolverResult
from tests.blocks import TanhCell

DENSE = "test_dense_implicit"


def dense_implicit(problem):
    """The implicit gradient by a dense solve of (I − J)ᵀ u = g.

    Independent of the package's backward: it forms J_f(z*) with
    `batch_jacobian` and calls `tf.linalg.solve` (small states only).
    """
    forward = problem.solve()
    z_star = forward.z
    with tf.GradientTape() as tape:
        tape.watch(z_star)
        fz = problem.f(z_star)
    jac = tf.stop_gradient(tape.batch_jacobian(fz, z_star))
    eye = tf.eye(
        tf.shape(jac)[-1], batch_shape=tf.shape(jac)[:1], dtype=jac.dtype
    )
    system = tf.transpose(eye - jac, [0, 2, 1])

    @tf.custom_gradient
    def attach(z):
        def grad(g):
            u = tf.linalg.solve(system, tf.cast(g, jac.dtype)[..., None])[
                ..., 0
            ]
            if problem.on_backward is not None:
                batch = tf.shape(u)[:1]
                zeros = tf.zeros(batch, u.dtype)
                problem.on_backward(
                    SolverResult(u, tf.ones(batch, tf.int32), zeros, zeros)
                )
            return tf.cast(u, g.dtype)

        return tf.identity(z), grad

    return attach(fz), forward


if DENSE not in gradients.names():
    gradients.register(DENSE, dense_implicit, backward_statistics=True)


def data(n=32, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = ((x[:, 0] > 0).astype("int32") + (x[:, 1] > 1)) % 3
    return x, y


def classifier(gradient, **kwargs):
    model = keras.Sequential([keras.Input((4,))])
    model.add(
        keras_deq.DEQLayer(
            TanhCell(units=8),
            gradient=gradient,
            tol=1e-6,
            max_iter=60,
            name="deq",
            **kwargs,
        )
    )
    model.add(keras.layers.Dense(3, name="head"))
    return model


def fit(model, x, y, epochs=1):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model.fit(
        x, y, batch_size=len(x), epochs=epochs, verbose=0, shuffle=False
    ).history


def test_a_registered_kind_matches_the_implicit_gradient_in_fit():
    x, y = data()
    keras.utils.set_random_seed(3)
    mine = classifier(DENSE)
    keras.utils.set_random_seed(3)
    reference = classifier("implicit", backward_tol=1e-10, backward_max_iter=80)
    before = [w.numpy() for w in mine.weights]
    logs = fit(mine, x, y)
    fit(reference, x, y)
    moved = 0.0
    for a, b, w0 in zip(mine.weights, reference.weights, before, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5)
        moved = max(moved, np.abs(a.numpy() - w0).max())
    assert moved > 1e-3  # the step did something to compare
    # Registered with backward statistics: the layer tracks them.
    assert logs["deq_backward_nfe"] == [1.0]
    assert logs["deq_forward_residual"][0] < 1e-6


def test_a_registered_kind_trains_and_round_trips_by_name(
    tmp_path, record_property
):
    x, y = data(n=256)
    model = classifier(DENSE)
    logs = fit(model, x, y, epochs=30)
    record_property("loss_ratio", logs["loss"][-1] / logs["loss"][0])
    # Seeds 0-4: the loss falls to 0.35-0.59 of the first epoch's.
    assert logs["loss"][-1] < 0.75 * logs["loss"][0]
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("deq").gradient == DENSE
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def test_override_training_takes_a_registered_kind():
    layer = keras_deq.DEQLayer(TanhCell(units=4))
    layer.override_training(gradient=DENSE)
    assert layer.training_overrides == {"gradient": DENSE}
    with pytest.raises(ValueError, match=r"`gradient` must be one of"):
        layer.override_training(gradient="no_such_kind")


def test_registry_refuses_bad_registrations():
    assert {"implicit", "phantom", "unrolled", DENSE} <= set(gradients.names())
    with pytest.raises(ValueError, match=r"already registered as 'implicit'"):
        gradients.register("implicit", dense_implicit)
    with pytest.raises(TypeError, match=r"`kind` must be callable"):
        gradients.register("test_not_callable", 3)
    with pytest.raises(ValueError, match=r"non-empty string"):
        gradients.register("", dense_implicit)
    with pytest.raises(
        ValueError,
        match=r"`gradient` must be one of .*Received: gradient='jfb'",
    ):
        keras_deq.DEQLayer(TanhCell(), gradient="jfb")
