"""A user-written noisy layer gets one draw per DEQ call, like dropout."""

import contextlib

import keras
import numpy as np
import tensorflow as tf

import keras_deq
from tests.testing import contraction


class ShiftNoise(keras.layers.Layer):
    """Adds N(0, σ²) per sample and unit: a noise injection of a user's."""

    def __init__(self, stddev, **kwargs):
        super().__init__(**kwargs)
        self.stddev = stddev
        self.seed_generator = keras.random.SeedGenerator(5)
        self.draws = []
        self._noise = None

    def build(self, shape):
        self.units = shape[-1]

    def draw_noise(self, batch_size):
        noise = keras.random.normal(
            (batch_size, self.units),
            stddev=self.stddev,
            seed=self.seed_generator,
        )
        self.draws.append(noise)
        return noise

    @contextlib.contextmanager
    def fixed_noise(self, noise):
        previous, self._noise = self._noise, noise
        try:
            yield
        finally:
            self._noise = previous

    def call(self, inputs, training=None):
        if not training:
            return inputs
        noise = self._noise
        if noise is None:
            noise = self.draw_noise(tf.shape(inputs)[0])
        return inputs + noise


class NoisyCell(keras.layers.Layer):
    """f(z, x) = tanh(noise(z W) + x U), the noise inside a nested layer."""

    def __init__(self, units=6, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.Sequential([ShiftNoise(0.3)])

    def build(self, z_shape, x_shape):
        rng = np.random.default_rng(0)
        w = contraction(rng, self.units, 0.5)
        u = rng.normal(size=(x_shape[-1], self.units))
        self.w = self.add_weight(
            shape=w.shape, initializer=keras.initializers.Constant(w), name="w"
        )
        self.u = self.add_weight(
            shape=u.shape, initializer=keras.initializers.Constant(u), name="u"
        )
        self.inner.build(z_shape)

    def initial_state(self, x):
        return tf.zeros([tf.shape(x)[0], self.units], x.dtype)

    def call(self, z, x, training=None):
        return tf.tanh(self.inner(z @ self.w, training=training) + x @ self.u)


def inputs(n=16, d=4, seed=0):
    return tf.constant(
        np.random.default_rng(seed).normal(size=(n, d)).astype("float32")
    )


def test_the_protocol_is_recognised_structurally():
    assert isinstance(ShiftNoise(0.1), keras_deq.layers.PerSolveNoise)
    assert isinstance(
        keras_deq.layers.VariationalDropout(0.1),
        keras_deq.layers.PerSolveNoise,
    )
    assert not isinstance(
        keras.layers.Dropout(0.1), keras_deq.layers.PerSolveNoise
    )


def test_one_draw_per_call_and_the_output_is_its_fixed_point():
    x = inputs()
    layer = keras_deq.DEQLayer(NoisyCell(), tol=1e-6, max_iter=60)
    z = layer(x, training=True).numpy()
    noise = layer.block.inner.layers[0]
    assert len(noise.draws) == 1
    # The fixed point under that one draw; redrawn per iteration, the
    # residual would stay at the noise's size (0.3).
    assert layer.forward_residual.result().numpy() < 1e-6
    with noise.fixed_noise(noise.draws[0]):
        fz = layer.block(z, x, training=True).numpy()
    np.testing.assert_allclose(fz, z, atol=1e-5)
    without = layer.block(z, x, training=False).numpy()
    assert np.abs(without - z).max() > 0.05  # the noise mattered
    layer(x, training=True)
    assert len(noise.draws) == 2
    assert not np.allclose(noise.draws[0], noise.draws[1])
    # Inference draws nothing.
    layer(x, training=False)
    assert len(noise.draws) == 2


def test_the_backward_uses_the_forward_draw(monkeypatch):
    x = inputs()
    layer = keras_deq.DEQLayer(
        NoisyCell(), tol=1e-6, backward_tol=1e-8, max_iter=60
    )
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
    implicit = tape.gradient(loss, layer.trainable_variables)
    noise_layer = layer.block.inner.layers[0]
    (draw,) = noise_layer.draws
    # Reference: 200 plain iterations under the same draw, backpropagated.
    monkeypatch.setattr(ShiftNoise, "draw_noise", lambda self, b: draw)
    unrolled = keras_deq.DEQLayer(
        layer.block, gradient="unrolled", max_iter=200
    )
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(unrolled(x, training=True)))
    reference = tape.gradient(loss, layer.trainable_variables)
    for a, b in zip(implicit, reference, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-5)
