"""DEQLayer on every Keras backend, against dense numpy references.

The block is f(z, x) = tanh(z W + x U) with a contractive W, in float64, so
that its fixed point, its Jacobian and the implicit function theorem's
gradients are computed here in numpy, independently of the layer.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_deq import DEQLayer
from keras_deq import gradients as kinds
from keras_deq import solvers
from tests.any_backend import BACKEND
from tests.any_backend import COMPILE_MODES
from tests.any_backend import TanhCell
from tests.any_backend import compiled
from tests.any_backend import contraction
from tests.any_backend import gradients
from tests.any_backend import run_module
from tests.any_backend import to_numpy

DIM, INPUTS, BATCH = 6, 4, 3


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class TanhBlock(keras.layers.Layer):
    """tanh(z W + x U), written with `keras.ops`.

    tanh(a) as 2 σ(2a) − 1: Keras 3.15's `ops.tanh` computes float64 in
    float32 on JAX.
    """

    def __init__(self, w=None, u=None, **kwargs):
        super().__init__(**kwargs)
        self._w, self._u = w, u

    def build(self, z_shape, x_shape):
        def constant(value):
            if value is None:
                return keras.initializers.RandomNormal(0.0, 0.1, seed=0)
            return keras.initializers.Constant(np.asarray(value))

        self.w = self.add_weight(
            shape=(z_shape[-1], z_shape[-1]),
            initializer=constant(self._w),
            name="w",
        )
        self.u = self.add_weight(
            shape=(x_shape[-1], z_shape[-1]),
            initializer=constant(self._u),
            name="u",
        )

    def initial_state(self, x):
        return keras.ops.zeros((keras.ops.shape(x)[0], DIM), x.dtype)

    def call(self, z, x, training=None):
        a = keras.ops.matmul(z, self.w) + keras.ops.matmul(x, self.u)
        return 2.0 * keras.ops.sigmoid(2.0 * a) - 1.0


def problem(seed=0, norm=0.6, dtype="float64"):
    rng = np.random.default_rng(seed)
    w = contraction(rng, DIM, norm)
    u = rng.normal(size=(INPUTS, DIM)) / np.sqrt(INPUTS)
    x = rng.normal(size=(BATCH, INPUTS)).astype(dtype)
    return w, u, x


def fixed_point(w, u, x, steps=400):
    z = np.zeros((x.shape[0], w.shape[0]))
    for _ in range(steps):
        z = np.tanh(z @ w + x @ u)
    return z


def implicit_gradients(w, u, x, g):
    """∂(Σ g ⊙ z*)/∂W and ∂/∂U by the implicit function theorem, densely."""
    z = fixed_point(w, u, x)
    grad_w, grad_u = np.zeros_like(w), np.zeros_like(u)
    for b in range(x.shape[0]):
        s = 1.0 - z[b] ** 2  # f = tanh(a): ∂f/∂a = diag(s)
        jacobian = s[:, None] * w.T  # J_f = diag(s) Wᵀ
        v = np.linalg.solve((np.eye(DIM) - jacobian).T, g[b])  # (I − J)⁻ᵀ g
        grad_w += np.outer(z[b], s * v)
        grad_u += np.outer(x[b], s * v)
    return grad_w, grad_u


def layer_for(w, u, dtype="float64", **kwargs):
    kwargs.setdefault("tol", 1e-10)
    kwargs.setdefault("backward_tol", 1e-10)
    kwargs.setdefault("max_iter", 200)
    return DEQLayer(TanhBlock(w, u, dtype=dtype), dtype=dtype, **kwargs)


@pytest.mark.parametrize("solver", solvers.names())
@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_the_output_is_the_dense_fixed_point(solver, mode):
    w, u, x = problem()
    layer = layer_for(w, u, solver=solver)
    out = to_numpy(compiled(lambda x: layer(x), mode)(x))
    np.testing.assert_allclose(out, fixed_point(w, u, x), atol=1e-8)


@pytest.mark.parametrize("gradient", ["implicit", "reuse", "unrolled"])
def test_parameter_gradients_follow_the_implicit_function_theorem(gradient):
    w, u, x = problem(1)
    g = np.random.default_rng(2).normal(size=(BATCH, DIM))
    # The unrolled gradient is exact for its steps; 150 of a 0.6-contraction
    # leave 0.6^150 of the fixed point's.
    layer = layer_for(w, u, gradient=gradient, max_iter=150)
    layer(x)
    block = layer.block
    grads = gradients(
        lambda: keras.ops.sum(keras.ops.multiply(layer(x, training=True), g)),
        [block.w, block.u],
    )
    for got, want in zip(grads, implicit_gradients(w, u, x, g), strict=True):
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-7, atol=1e-9)


# Kinds as objects own their settings; the layer's `backward_*` arguments,
# set here to what would spoil the gradient, do not reach them.
OWN_SETTINGS = {
    "implicit": (
        kinds.Implicit(solver="anderson", max_iter=200, tol=1e-10),
        dict(backward_max_iter=1, backward_tol=0.5),
    ),
    "reuse": (
        kinds.Reuse(max_iter=200, tol=1e-10),
        dict(backward_max_iter=0),
    ),
    "unrolled": (kinds.Unrolled(steps=150), dict(max_iter=2)),
}


@pytest.mark.parametrize("name", sorted(OWN_SETTINGS))
def test_a_gradient_object_uses_its_own_settings(name):
    kind, spoilers = OWN_SETTINGS[name]
    w, u, x = problem(1)
    g = np.random.default_rng(2).normal(size=(BATCH, DIM))
    layer = layer_for(w, u, gradient=kind, **spoilers)
    layer(x)
    grads = gradients(
        lambda: keras.ops.sum(keras.ops.multiply(layer(x, training=True), g)),
        [layer.block.w, layer.block.u],
    )
    for got, want in zip(grads, implicit_gradients(w, u, x, g), strict=True):
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-7, atol=1e-9)
    # The same spoilers with the kind's name do spoil it.
    named = layer_for(w, u, gradient=name, **spoilers)
    named(x)
    spoilt = gradients(
        lambda: keras.ops.sum(keras.ops.multiply(named(x, training=True), g)),
        [named.block.w, named.block.u],
    )
    assert np.abs(to_numpy(spoilt[0]) - to_numpy(grads[0])).max() > 1e-4


def test_a_phantom_object_takes_its_steps_and_damping():
    """Phantom(steps=2, tau=0.5) against the two damped steps from z*
    written out on the backend, not the layer's `phantom_steps`."""
    w, u, x = problem(3)
    g = np.random.default_rng(4).normal(size=(BATCH, DIM))
    layer = layer_for(w, u, gradient=kinds.Phantom(steps=2, tau=0.5))
    layer(x)
    block = layer.block
    z_star = keras.ops.convert_to_tensor(fixed_point(w, u, x))

    def by_hand(steps):
        z = z_star
        for _ in range(steps):
            z = 0.5 * block(z, x) + 0.5 * z
        return keras.ops.sum(keras.ops.multiply(z, g))

    variables = [block.w, block.u]
    got = gradients(
        lambda: keras.ops.sum(keras.ops.multiply(layer(x, training=True), g)),
        variables,
    )
    want = gradients(lambda: by_hand(2), variables)
    one_step = gradients(lambda: by_hand(1), variables)
    for a, b, c in zip(got, want, one_step, strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-9)
        assert np.abs(to_numpy(a) - to_numpy(c)).max() > 1e-3


def test_a_gradient_object_round_trips_through_the_config():
    kind = kinds.Reuse(max_iter=3, tol=1e-6)
    layer = DEQLayer(TanhCell(units=DIM), gradient=kind)
    config = json.loads(json.dumps(layer.get_config()))
    restored = DEQLayer.from_config(config)
    assert restored.gradient == kind
    assert restored.gradient is not kind
    assert restored.gradient != kinds.Reuse(max_iter=4, tol=1e-6)
    # Its backward statistics come with it; a phantom object has none.
    assert hasattr(restored, "backward_nfe")
    phantom = DEQLayer(TanhCell(units=DIM), gradient=kinds.Phantom())
    assert not hasattr(phantom, "backward_nfe")
    # A name stays a name.
    named = DEQLayer(TanhCell(units=DIM), gradient="reuse")
    assert DEQLayer.from_config(named.get_config()).gradient == "reuse"


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: kinds.Implicit(max_iter=-1), ValueError, r"max_iter=-1"),
        (lambda: kinds.Implicit(tol=0.0), ValueError, r"tol=0.0"),
        (lambda: kinds.Implicit(solver="lbfgs"), ValueError, r"solver='lbfgs'"),
        (
            lambda: kinds.Implicit(solver_options={"m": 5}),
            ValueError,
            r"solver_options.*needs a `solver`",
        ),
        (
            lambda: kinds.Implicit("anderson", solver_options={"x": 1}),
            TypeError,
            r"solver_options.*\['x'\]",
        ),
        (lambda: kinds.Phantom(steps=0), ValueError, r"steps=0"),
        (lambda: kinds.Phantom(tau=1.5), ValueError, r"tau=1.5"),
        (lambda: kinds.Unrolled(steps=0), ValueError, r"steps=0"),
        (
            lambda: DEQLayer(TanhBlock(), gradient=lambda problem: problem),
            TypeError,
            r"`gradient` must be a gradient kind's name or a .*GradientKind",
        ),
        (
            lambda: DEQLayer(TanhBlock(), gradient="phantom2"),
            ValueError,
            r"`gradient` must be one of .*gradient='phantom2'",
        ),
    ],
)
def test_bad_gradient_objects_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("gradient", ["phantom", "implicit_0"])
def test_the_phantom_gradient_is_one_step_from_the_fixed_point(gradient):
    # One undamped phantom step, or an implicit backward of no iterations:
    # f(z*) with z* constant, so ∂/∂W = z*ᵀ (g ⊙ s) and ∂/∂U = xᵀ (g ⊙ s),
    # s = 1 − z*².
    w, u, x = problem(3)
    g = np.random.default_rng(4).normal(size=(BATCH, DIM))
    if gradient == "implicit_0":
        gradient = kinds.Implicit(max_iter=0)
    layer = layer_for(w, u, gradient=gradient)
    layer(x)
    grads = gradients(
        lambda: keras.ops.sum(keras.ops.multiply(layer(x, training=True), g)),
        [layer.block.w, layer.block.u],
    )
    z = fixed_point(w, u, x)
    s = 1.0 - z**2
    want = [z.T @ (g * s), x.T @ (g * s)]
    for got, expected in zip(grads, want, strict=True):
        np.testing.assert_allclose(to_numpy(got), expected, atol=1e-9)


def test_input_gradients_follow_the_implicit_function_theorem():
    w, u, x = problem(5)
    g = np.random.default_rng(6).normal(size=(BATCH, DIM))
    layer = layer_for(w, u)
    x_var = keras.Variable(x, dtype="float64")
    (grad_x,) = gradients(
        lambda: keras.ops.sum(
            keras.ops.multiply(layer(x_var.value, training=True), g)
        ),
        [x_var],
    )
    z = fixed_point(w, u, x)
    want = np.zeros_like(x)
    for b in range(BATCH):
        s = 1.0 - z[b] ** 2
        v = np.linalg.solve((np.eye(DIM) - s[:, None] * w.T).T, g[b])
        want[b] = u @ (s * v)
    np.testing.assert_allclose(to_numpy(grad_x), want, rtol=1e-7, atol=1e-9)


def test_the_penalty_is_the_dense_jacobian_norm():
    # γ · mean_b ‖J_f(z*_b)‖_F² / d, estimated with many probes.
    w, u, x = problem(7, norm=0.9)
    layer = layer_for(w, u, jac_weight=2.0, jac_samples=100, seed=0)
    layer(x, training=True)
    (loss,) = layer.losses
    z = fixed_point(w, u, x)
    dense = np.mean(
        [np.sum(((1 - z[b] ** 2)[:, None] * w.T) ** 2) / DIM for b in range(3)]
    )
    np.testing.assert_allclose(float(to_numpy(loss)), 2.0 * dense, rtol=0.3)


def test_the_correction_loss_is_the_distance_of_early_steps_to_z_star():
    w, u, x = problem(8)
    layer = layer_for(
        w, u, correction_weight=3.0, correction_states=2, correction_decay=0.5
    )
    layer(x, training=True)
    # The penalty's 0 (γ = 0) and the correction.
    loss = sum(to_numpy(t) for t in layer.losses)
    z_star = fixed_point(w, u, x)
    z1 = np.tanh(x @ u)  # one step from 0
    z2 = np.tanh(z1 @ w + x @ u)
    scale = np.sum(z_star**2, axis=-1)

    def distance(z):
        return np.mean(np.sum((z - z_star) ** 2, axis=-1) / scale)

    # Weights ∝ 0.5^(N−1−k): 1/3 for the first step, 2/3 for the second.
    want = 3.0 * (distance(z1) / 3 + 2 * distance(z2) / 3)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_each_sample_stops_on_its_own_residual():
    # x = 0 gives z* = 0 at once; the other sample needs iterations.
    w, u, x = problem(9)
    x[0] = 0.0
    layer = layer_for(w, u, solver="fixed_point", tol=1e-8)
    layer(x)
    f = lambda z: layer.block(z, keras.ops.convert_to_tensor(x))  # noqa: E731
    _, result = layer.solve(f, keras.ops.zeros((BATCH, DIM), "float64"))
    nstep = to_numpy(result.nstep)
    assert nstep[0] <= 2 < nstep[1]


def test_a_warm_start_reaches_the_same_fixed_point():
    w, u, x = problem(10)
    layer = layer_for(w, u)
    cold = to_numpy(layer(x))
    warm = to_numpy(layer(x, initial_state=cold + 0.1))
    np.testing.assert_allclose(warm, cold, atol=1e-8)


def test_a_nested_state_is_solved_per_leaf():
    # Two leaves, each its own tanh fixed point: the solver sees them
    # concatenated, the output keeps the dict.
    w, u, x = problem(11)

    class Pair(keras.layers.Layer):
        def build(self, z_shape, x_shape):
            self.inner = TanhBlock(w, u, dtype="float64")
            self.inner.build(z_shape["a"], x_shape)

        def initial_state(self, x):
            zeros = keras.ops.zeros((keras.ops.shape(x)[0], DIM), x.dtype)
            return {"a": zeros, "b": zeros}

        def call(self, z, x, training=None):
            return {"a": self.inner(z["a"], x), "b": self.inner(z["b"], 2 * x)}

    layer = DEQLayer(Pair(dtype="float64"), tol=1e-10, dtype="float64")
    out = layer(x)
    np.testing.assert_allclose(
        to_numpy(out["a"]), fixed_point(w, u, x), atol=1e-8
    )
    np.testing.assert_allclose(
        to_numpy(out["b"]), fixed_point(w, u, 2 * x), atol=1e-8
    )


def test_sample_axes_two_solves_each_position_alone():
    w, u, _ = problem(12)
    x = np.random.default_rng(13).normal(size=(2, 5, INPUTS))

    class PerPosition(TanhBlock):
        def initial_state(self, x):
            return keras.ops.zeros((*keras.ops.shape(x)[:2], DIM), x.dtype)

    layer = DEQLayer(
        PerPosition(w, u, dtype="float64"),
        sample_axes=2,
        tol=1e-10,
        dtype="float64",
    )
    out = to_numpy(layer(x))
    want = fixed_point(w, u, x.reshape(-1, INPUTS)).reshape(2, 5, DIM)
    np.testing.assert_allclose(out, want, atol=1e-8)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's transformations")
def test_under_jax_second_order_gradients_are_refused():
    import jax

    w, u, x = problem(14)
    layer = layer_for(w, u)
    layer(x)
    variables = layer.trainable_variables

    def loss(values, x):
        mapping = list(zip(variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return keras.ops.sum(layer(x, training=True))

    values = [v.value for v in variables]

    def input_gradient_norm(x):
        return sum(keras.ops.sum(g**2) for g in jax.grad(loss)(values, x))

    with pytest.raises(ValueError, match="first-order gradients only"):
        jax.grad(input_gradient_norm)(x)


def test_fit_learns_and_the_loss_holds_the_penalty():
    # A model with a DEQLayer trains with `fit`; its logged loss includes
    # the penalty and the correction, which `evaluate` (no training) drops.
    rng = np.random.default_rng(15)
    x = rng.normal(size=(128, INPUTS)).astype("float32")
    y = (x @ rng.normal(size=(INPUTS, 1)) > 0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((INPUTS,)),
            DEQLayer(
                TanhBlock(),
                jac_weight=1.0,
                correction_weight=1.0,
                tol=1e-5,
                seed=0,
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(0.05), "mse")
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]
    assert (
        model.evaluate(x, y, verbose=0, return_dict=True)["loss"] < losses[-1]
    )


def test_another_backend_gets_an_error_naming_the_supported_ones():
    # Keras' numpy backend imports jax in Keras 3.8 (the lowest version).
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    done = subprocess.run(
        [sys.executable, "-c", "import keras_deq"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode != 0
    assert "ImportError: keras_deq runs on the Keras backends" in done.stderr
    assert "['tensorflow', 'jax'], but Keras is using 'numpy'" in done.stderr


@pytest.mark.skipif(BACKEND != "jax", reason="compares against TensorFlow")
def test_jax_matches_tensorflow_on_the_same_weights(tmp_path):
    """float32 forward ≤ 1e-5 and parameter gradients ≤ 1e-4 relative,
    TensorFlow run in a subprocess on the same weights and inputs."""
    w, u, x = problem(16, norm=0.8, dtype="float32")
    g = np.random.default_rng(17).normal(size=(BATCH, DIM)).astype("float32")
    np.savez(tmp_path / "case.npz", w=w, u=u, x=x, g=g)
    results = {}
    for backend in ("jax", "tensorflow"):
        stdout = run_module(
            "tests.layers.test_deq_layer_any_backend",
            tmp_path / "case.npz",
            backend=backend,
        )
        results[backend] = json.loads(stdout.strip().splitlines()[-1])
    for gradient in ("implicit", "phantom", "unrolled"):
        jax_run = results["jax"][gradient]
        tf_run = results["tensorflow"][gradient]
        np.testing.assert_allclose(jax_run["z"], tf_run["z"], atol=1e-5)
        for a, b in zip(jax_run["grads"], tf_run["grads"], strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def _one_backend_run(path):
    """Prints the float32 outputs and gradients of this backend as JSON."""
    case = np.load(path)
    out = {}
    for gradient in ("implicit", "phantom", "unrolled"):
        layer = layer_for(
            case["w"],
            case["u"],
            dtype="float32",
            gradient=gradient,
            tol=1e-6,
            max_iter=60,
        )
        z = layer(case["x"])
        grads = gradients(
            lambda layer=layer: keras.ops.sum(
                layer(case["x"], training=True) * case["g"]
            ),
            [layer.block.w, layer.block.u],
        )
        out[gradient] = {
            "z": to_numpy(z).tolist(),
            "grads": [to_numpy(t).tolist() for t in grads],
        }
    print(json.dumps(out))


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
@pytest.mark.parametrize("gradient", ["implicit", "phantom"])
def test_data_parallel_over_two_devices_trains_as_one(tmp_path, gradient):
    """`fit` under `keras.distribution.DataParallel` over 2 CPU devices
    (`--xla_force_host_platform_device_count=2`, each run in a subprocess)
    gives the weights and losses of the same `fit` on one device: each
    sample's solve and the penalty's probes do not depend on the split."""
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"{devices}.npz"
        run_module(
            "tests.layers.test_deq_layer_any_backend",
            "data_parallel",
            gradient,
            devices,
            out,
            backend="jax",
            xla_flags="--xla_force_host_platform_device_count=2",
        )
        runs[devices] = dict(np.load(out))
    one, two = runs[1], runs[2]
    assert two["sharded_over"] == 2 and one["sharded_over"] == 1
    # Training moved the weights, by the same steps on one and two devices.
    assert np.abs(one["w"] - one["w0"]).max() > 1e-3
    for name in ("loss", "w", "u", "dense"):
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-6)


def _data_parallel_run(gradient, devices, out):
    """Four steps of `fit` (penalty and correction on) on `devices` CPUs."""
    import jax

    assert len(jax.devices()) == 2, jax.devices()
    if devices == 2:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices())
        )
    rng = np.random.default_rng(16)
    x = rng.normal(size=(64, INPUTS)).astype("float32")
    y = (x @ rng.normal(size=(INPUTS, 1)) > 0).astype("float32")
    keras.utils.set_random_seed(0)
    layer = DEQLayer(
        TanhBlock(),
        gradient=gradient,
        jac_weight=1.0,
        correction_weight=1.0,
        tol=1e-5,
        seed=0,
    )
    model = keras.Sequential(
        [keras.Input((INPUTS,)), layer, keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.5), "mse")
    w0 = to_numpy(layer.block.w.value)
    history = model.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
    sharding = layer.block.w.value.sharding
    np.savez(
        out,
        sharded_over=len(sharding.device_set),
        loss=np.asarray(history.history["loss"]),
        w0=w0,
        w=to_numpy(layer.block.w.value),
        u=to_numpy(layer.block.u.value),
        dense=to_numpy(model.layers[-1].kernel.value),
    )


if __name__ == "__main__":
    if sys.argv[1] == "data_parallel":
        _data_parallel_run(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        _one_backend_run(sys.argv[1])
