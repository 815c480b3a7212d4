"""DEQLayer.solve, per-position solves (sample_axes=2), solving off tapes."""

import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq.layers import DEQLayer
from tests import testing
from tests.testing import CausalSequenceCell
from tests.testing import TanhCell

# --- DEQLayer.solve: the layer's solver on a map given by the caller ---


def fixed_point(cell, x, iterations=300):
    """Reference: plain iteration of the (contractive) cell, in float64."""
    w, u, b = (v.numpy().astype(np.float64) for v in (cell.w, cell.u, cell.b))
    z = np.zeros((x.shape[0], w.shape[0]))
    for _ in range(iterations):
        z = np.tanh(z @ w + x @ u + b)
    return z


def test_solve_finds_the_fixed_point_of_a_bound_map():
    """solve(f) with a second input bound into f, against plain iteration
    of the same map, with the layer's own settings (its tol)."""
    cell = TanhCell(units=6, w_norm=0.6)
    layer = DEQLayer(cell, max_iter=40, tol=1e-6)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    layer(x)
    shift = tf.constant(np.linspace(-1, 1, 3), tf.float32)
    z_star, result = layer.solve(lambda z: cell(z, x + shift), tf.zeros([4, 6]))
    np.testing.assert_allclose(
        z_star, fixed_point(cell, x + shift.numpy()), atol=1e-5
    )
    assert result.nstep.shape == (4,)
    assert (result.rel_residual.numpy() < 1e-6).all()
    assert (result.nstep.numpy() < 40).all()


# --- sample_axes=2: one solve per sequence position -------------------


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
    fd = testing.central_differences(
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


# --- Under persistent and nested tapes; second-order requests ---------


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

    expected = testing.central_differences(projected_gradient, [x])[0]
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

    expected = testing.central_differences(projected_gradient, [x])[0]
    actual = second_order(layer, x, direction).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-9)
