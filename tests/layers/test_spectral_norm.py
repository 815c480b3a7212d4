import keras
import numpy as np
import pytest

import keras_deq
from keras_deq.layers import SpectralNormBound
from keras_deq.layers import apply_spectral_norm


def largest_singular_value(kernel):
    matrix = np.asarray(kernel).reshape(-1, kernel.shape[-1])
    return np.linalg.svd(matrix, compute_uv=False).max()


def test_the_bound_holds_now_and_after_every_step():
    block = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            keras.layers.Conv2D(3, 3, padding="same", activation="tanh"),
            keras.layers.Conv2D(3, 1),
        ]
    )
    dense = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5)])
    for layer in (block, dense):
        for v in layer.trainable_variables:
            v.assign(3.0 * v.numpy() + 0.5)  # far above the bound
    paths = apply_spectral_norm(block, 0.9) + apply_spectral_norm(dense, 0.9)
    assert len(paths) == 3
    kernels = [
        block.layers[0].kernel,
        block.layers[1].kernel,
        dense.layers[0].kernel,
    ]
    for kernel in kernels:
        np.testing.assert_allclose(
            largest_singular_value(kernel.numpy()), 0.9, rtol=1e-4
        )
    # Large steps push the kernels up; the optimizer scales them back.
    model = keras.Sequential([keras.Input((4, 4, 3)), block])
    model.compile(optimizer=keras.optimizers.SGD(5.0), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4, 4, 3))
    model.fit(x, 10 * x, epochs=2, batch_size=4, verbose=0)
    for kernel in kernels[:2]:
        assert largest_singular_value(kernel.numpy()) <= 0.9 * (1 + 1e-4)


def test_a_bounded_block_is_a_contraction_with_one_fixed_point():
    # tanh(W z + x) with ‖W‖ ≤ 0.8 contracts: plain iteration from any
    # start reaches the same point.
    dense = keras.layers.Dense(8, activation="tanh")
    layer = keras_deq.DEQLayer(dense, solver="fixed_point", tol=1e-6)
    x = np.random.default_rng(1).normal(size=(32, 8)).astype("float32")
    layer(x)
    dense.kernel.assign(4.0 * dense.kernel.numpy())
    apply_spectral_norm(dense, 0.8)
    z = layer(x).numpy()
    start = np.random.default_rng(2).normal(size=z.shape) * 5
    other = layer(x, initial_state=start.astype("float32")).numpy()
    np.testing.assert_allclose(other, z, atol=1e-4)


def test_the_bound_is_saved_with_the_layer():
    dense = keras.layers.Dense(3)
    dense.build((None, 3))
    apply_spectral_norm(dense, 0.5)
    restored = keras.layers.Dense.from_config(dense.get_config())
    assert isinstance(restored.kernel_constraint, SpectralNormBound)
    assert restored.kernel_constraint.max_norm == 0.5


def test_bad_use_raises():
    with pytest.raises(ValueError, match="max_norm"):
        SpectralNormBound(0.0)
    with pytest.raises(ValueError, match="not built"):
        apply_spectral_norm(keras.layers.Dense(3))
    relu = keras.layers.ReLU()
    relu.build((None, 3))
    with pytest.raises(ValueError, match="no trainable kernel"):
        apply_spectral_norm(relu)
