"""The JAX benchmarks' compiled training step against a hand-derived one."""

import keras
import numpy as np
import pytest

from tests.any_backend import BACKEND

pytestmark = pytest.mark.skipif(
    BACKEND != "jax", reason="benchmarks.jax_steps is for the JAX backend"
)


class Penalised(keras.layers.Layer):
    """y = x W, adding c · Σ W² as a loss."""

    def __init__(self, w, c, **kwargs):
        super().__init__(**kwargs)
        self._w0, self.c = w, c

    def build(self, shape):
        self.w = self.add_weight(
            shape=self._w0.shape,
            initializer=keras.initializers.Constant(self._w0),
        )

    def call(self, x, training=None):
        if training:
            self.add_loss(self.c * keras.ops.sum(self.w**2))
        return keras.ops.matmul(x, self.w)


def test_a_step_is_sgd_on_the_loss_and_the_layer_losses():
    from benchmarks.jax_steps import TrainStep

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype("float32")
    t = rng.normal(size=(5, 2)).astype("float32")
    w = rng.normal(size=(3, 2)).astype("float32")
    layer = Penalised(w, 0.3)
    layer.build(x.shape)
    step = TrainStep(
        layer, x, lambda y: keras.ops.mean((y - t) ** 2), learning_rate=0.1
    )
    loss = step()
    # By hand: L = mean((xW − t)²) + c ΣW², ∂L/∂W = 2 xᵀ(xW − t)/n + 2cW.
    residual = x @ w - t
    np.testing.assert_allclose(
        loss, np.mean(residual**2) + 0.3 * np.sum(w**2), rtol=1e-5
    )
    grad = 2 * x.T @ residual / residual.size + 2 * 0.3 * w
    step.sync()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.w),
        w - 0.1 * grad,
        rtol=1e-5,
        atol=1e-6,
    )
