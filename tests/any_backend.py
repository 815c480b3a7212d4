"""What tests that run on every Keras backend share.

These tests import nothing backend-specific at module level; under
`KERAS_BACKEND=jax` the conftest collects only them (`ANY_BACKEND_TESTS`).
"""

import os
import subprocess
import sys

import keras
import numpy as np

BACKEND = keras.backend.backend()

# How a test can run a function: as it is, and each compiled form the
# backend has (a TensorFlow graph, with and without XLA; `jax.jit`).
COMPILE_MODES = {
    "tensorflow": ("eager", "graph", "xla"),
    "jax": ("eager", "jit"),
}[BACKEND]


def compiled(fn, mode):
    """`fn` run eagerly or compiled the way `mode` names."""
    if mode == "eager":
        return fn
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=mode == "xla")
    import jax

    return jax.jit(fn)


def run_module(module, *args, backend, xla_flags=None):
    """Runs `python -m module args` under Keras backend `backend` (with
    `XLA_FLAGS=xla_flags`, or none) from the repository root; returns its
    stdout, after checking that it exited with 0."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    run = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def gradients(loss_fn, variables):
    """∂ loss_fn() / ∂ v for each `keras.Variable` v that loss_fn reads.

    On JAX the variables' values are passed through a
    `keras.StatelessScope`, since `jax.grad` cannot see closed-over state.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        return tape.gradient(loss, variables)
    import jax

    def loss_of(values):
        mapping = list(zip(variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return loss_fn()

    return jax.grad(loss_of)([v.value for v in variables])


def central_differences(value_fn, variables, eps=1e-6):
    """∂value/∂v for each variable, by central differences, entry by entry.

    `value_fn()` returns a float computed from the current variable values;
    each variable is restored after its entries have been bumped.
    """
    grads = []
    for var in variables:
        value = np.array(var.numpy())
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            for sign in (1, -1):
                bumped = value.copy()
                bumped[index] += sign * eps
                var.assign(bumped)
                grad[index] += sign * value_fn() / (2 * eps)
        var.assign(value)
        grads.append(grad)
    return grads


def contraction(rng, n, norm):
    """An n×n matrix with spectral norm `norm`."""
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.linspace(norm, norm / 3, n)
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * s) @ q2


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class LinearCell(keras.layers.Layer):
    """f(z, x) = z A + x: J_f = Aᵀ at every point, z* = x (I − A)⁻¹."""

    def __init__(self, norm=0.5, seed=0, trainable_a=True, **kwargs):
        super().__init__(**kwargs)
        self.norm = norm
        self.seed = seed
        self.trainable_a = trainable_a

    def build(self, z_shape, x_shape):
        rng = np.random.default_rng(self.seed)
        a = contraction(rng, z_shape[-1], self.norm)
        self.a = self.add_weight(
            shape=a.shape,
            initializer=keras.initializers.Constant(a),
            trainable=self.trainable_a,
            name="a",
        )

    def call(self, z, x, training=None):
        return z @ self.a + x

    def get_config(self):
        config = super().get_config()
        config.update(
            norm=self.norm, seed=self.seed, trainable_a=self.trainable_a
        )
        return config


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class TanhCell(keras.layers.Layer):
    """f(z, x) = tanh(z W + x U + b): a contraction when ‖W‖ < 1."""

    def __init__(self, units=6, w_norm=0.6, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.w_norm = w_norm
        self.seed = seed

    def build(self, z_shape, x_shape):
        rng = np.random.default_rng(self.seed)
        w = contraction(rng, self.units, self.w_norm)
        u = rng.normal(size=(x_shape[-1], self.units)) / np.sqrt(x_shape[-1])
        self.w = self.add_weight(
            shape=w.shape, initializer=keras.initializers.Constant(w), name="w"
        )
        self.u = self.add_weight(
            shape=u.shape, initializer=keras.initializers.Constant(u), name="u"
        )
        self.b = self.add_weight(
            shape=(self.units,), initializer="random_normal", name="b"
        )

    def initial_state(self, x):
        return keras.ops.zeros((keras.ops.shape(x)[0], self.units), x.dtype)

    def call(self, z, x, training=None):
        return keras.ops.tanh(z @ self.w + x @ self.u + self.b)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, w_norm=self.w_norm, seed=self.seed)
        return config
