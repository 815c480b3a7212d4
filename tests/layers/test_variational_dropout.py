"""VariationalDropout: one mask per DEQ solve, new masks per call."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq.layers import VariationalDropout
from tests.testing import DropoutCell


def inputs(n=16, d=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype("float32")


@pytest.fixture
def recorded_masks(monkeypatch):
    """Records every mask VariationalDropout draws."""
    masks = []
    original = VariationalDropout.draw_noise

    def recording(self, *args, **kwargs):
        mask = original(self, *args, **kwargs)
        masks.append(mask)
        return mask

    monkeypatch.setattr(VariationalDropout, "draw_noise", recording)
    return masks


def test_standalone_masks_are_per_sample_and_channel():
    layer = VariationalDropout(0.25, seed=1)
    x = np.ones((64, 5, 5, 32), "float32")
    out = layer(x, training=True).numpy()
    # Shared over the spatial axes, values 0 or 1/(1 − rate).
    np.testing.assert_array_equal(out, out[:, :1, :1, :] * np.ones_like(out))
    assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.75)}
    kept = np.mean(out[:, 0, 0, :] > 0)
    assert 0.7 < kept < 0.8
    np.testing.assert_array_equal(layer(x, training=False), x)
    dense = VariationalDropout(0.5, seed=2)(
        np.ones((64, 7), "float32"), training=True
    ).numpy()
    assert set(np.unique(dense)) == {0.0, 2.0}


def test_one_mask_per_deq_call_and_the_solve_converges(recorded_masks):
    layer = keras_deq.DEQLayer(DropoutCell(rate=0.3), tol=1e-5, max_iter=40)
    x = inputs()
    z = layer(x, training=True).numpy()
    assert len(recorded_masks) == 1
    mask = recorded_masks[0]
    assert mask.shape == (16, 6)
    assert 0 < np.mean(mask.numpy() == 0) < 0.7
    # The output is the fixed point of the block under that one mask; a
    # mask redrawn per iteration would leave a residual of dropout size.
    assert layer.forward_residual.result().numpy() < 1e-5
    with layer.block.drop.fixed_noise(mask):
        fz = layer.block(z, x, training=True).numpy()
    np.testing.assert_allclose(fz, z, atol=1e-4)
    # The next call draws a new mask.
    layer(x, training=True)
    assert len(recorded_masks) == 2
    assert not np.array_equal(recorded_masks[1].numpy(), mask.numpy())


def test_backward_uses_the_forward_mask(recorded_masks, monkeypatch):
    x = tf.constant(inputs())
    layer = keras_deq.DEQLayer(
        DropoutCell(rate=0.3), tol=1e-6, backward_tol=1e-8, max_iter=60
    )
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
    implicit = tape.gradient(loss, layer.trainable_variables)
    (mask,) = recorded_masks
    # Reference: 200 plain iterations under the same mask, backpropagated.
    monkeypatch.setattr(
        VariationalDropout, "draw_noise", lambda self, *a, **k: mask
    )
    unrolled = keras_deq.DEQLayer(
        layer.block, gradient="unrolled", max_iter=200
    )
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(unrolled(x, training=True)))
    reference = tape.gradient(loss, layer.trainable_variables)
    for a, b in zip(implicit, reference, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-5)


def test_no_dropout_at_inference(recorded_masks):
    layer = keras_deq.DEQLayer(DropoutCell(rate=0.5), tol=1e-6)
    x = inputs()
    a = layer(x, training=False).numpy()
    b = layer(x).numpy()
    np.testing.assert_array_equal(a, b)
    assert recorded_masks == []
    # And it is the fixed point of the block without dropout.
    fz = layer.block(a, x, training=False).numpy()
    np.testing.assert_allclose(fz, a, atol=1e-5)


def test_dropout_in_a_compiled_fit(recorded_masks):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras_deq.DEQLayer(DropoutCell(rate=0.2), name="deq", tol=1e-4),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x, y = inputs(64), inputs(64, 1, seed=1)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert np.all(np.array(history["deq_forward_residual"]) < 1e-4)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(rate=1.0), ValueError, r"rate.*\[0, 1\).*1\.0"),
        (dict(rate=-0.1), ValueError, "rate.*-0.1"),
        (dict(rate=0.1, seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        VariationalDropout(**kwargs)
