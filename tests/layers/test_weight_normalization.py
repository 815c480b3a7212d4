"""WeightNormalization: identity at init, exact gradients, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_deq.layers import WeightNormalization
from tests import testing


def layers_and_inputs():
    rng = np.random.default_rng(0)
    return [
        (
            keras.layers.Dense(5, activation="tanh"),
            rng.normal(size=(3, 4)),
        ),
        (
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            rng.normal(size=(2, 6, 6, 3)),
        ),
        (
            keras.layers.Conv1D(3, 2, strides=2, use_bias=False),
            rng.normal(size=(2, 8, 5)),
        ),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["dense", "conv2d", "conv1d"])
def test_wrapped_layer_is_unchanged_at_init(index):
    layer, x = layers_and_inputs()[index]
    x = x.astype("float32")
    before = layer(x).numpy()
    wrapped = WeightNormalization(layer)
    np.testing.assert_allclose(wrapped(x).numpy(), before, atol=1e-6)
    # g holds the norms of the kernel's output units.
    kernel = layer.kernel.numpy()
    axes = tuple(range(kernel.ndim - 1))
    np.testing.assert_allclose(
        wrapped.g.numpy(), np.sqrt((kernel**2).sum(axes)), rtol=1e-6
    )


def test_output_depends_on_the_direction_of_v_only():
    layer, x = layers_and_inputs()[1]
    wrapped = WeightNormalization(layer)
    before = wrapped(x.astype("float32")).numpy()
    layer.kernel.assign(layer.kernel * 3.0)
    np.testing.assert_allclose(
        wrapped(x.astype("float32")).numpy(), before, atol=1e-5
    )
    wrapped.g.assign(wrapped.g * 2.0)
    assert not np.allclose(wrapped(x.astype("float32")).numpy(), before)


@pytest.mark.parametrize("index", [0, 1], ids=["dense", "conv2d"])
def test_gradients_match_finite_differences(index):
    layer, x = layers_and_inputs()[index]
    layer = layer.__class__.from_config(
        {**layer.get_config(), "dtype": "float64"}
    )
    wrapped = WeightNormalization(layer, dtype="float64")
    x = tf.constant(x)
    wrapped.build(x.shape)
    wrapped.g.assign(wrapped.g * 1.3)  # away from the initial ‖v‖
    out_shape = wrapped(x).shape
    weights = tf.constant(np.random.default_rng(1).normal(size=out_shape))

    def loss():
        return tf.reduce_sum(weights * wrapped(x))

    variables = [wrapped.g, layer.kernel] + (
        [layer.bias] if layer.bias is not None else []
    )
    with tf.GradientTape() as tape:
        value = loss()
    grads = tape.gradient(value, variables)
    numeric = testing.central_differences(lambda: loss().numpy(), variables)
    for g, n in zip(grads, numeric, strict=True):
        np.testing.assert_allclose(g.numpy(), n, rtol=1e-6, atol=1e-8)


def test_keras_file_round_trip(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            WeightNormalization(keras.layers.Conv2D(4, 3, name="conv")),
            keras.layers.GlobalAveragePooling2D(),
            WeightNormalization(keras.layers.Dense(2)),
        ]
    )
    model.layers[0].g.assign(model.layers[0].g * 0.5)
    x = np.random.default_rng(2).normal(size=(3, 6, 6, 3)).astype("float32")
    path = str(tmp_path / "wn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.layers[0], WeightNormalization)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_rejects_layers_without_a_supported_kernel():
    with pytest.raises(TypeError, match="Dense or a Keras convolution"):
        WeightNormalization(keras.layers.LayerNormalization())
