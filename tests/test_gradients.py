"""Gradients of DEQLayer against independent references, in float64."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq import gradients
from keras_deq import solvers
from keras_deq.solvers import SolverResult
from tests import testing
from tests.testing import CausalSequenceCell
from tests.testing import LinearCell
from tests.testing import TanhCell
from tests.testing import TwoResolutionCell

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
    return testing.central_differences(
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


# --- The registry of gradient kinds -----------------------------------


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
    with pytest.raises(TypeError, match=r"must be a GradientKind or callable"):
        gradients.register("test_not_callable", 3)
    with pytest.raises(ValueError, match=r"non-empty string"):
        gradients.register("", dense_implicit)
    with pytest.raises(
        ValueError,
        match=r"`gradient` must be one of .*Received: gradient='jfb'",
    ):
        keras_deq.DEQLayer(TanhCell(), gradient="jfb")


# --- gradient="reuse": the backward from the forward's Broyden estimate ----


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
