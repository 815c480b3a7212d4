"""Every public keras_deq layer keeps the Keras layer contract."""

import keras
import numpy as np
import pytest

import keras_deq
from keras_deq import layers
from keras_deq.models import DEQTransformerBlock
from keras_deq.models import MDEQBlock
from tests.testing import TanhCell
from tests.testing import check_layer_contract

RNG = np.random.default_rng(0)

CASES = {
    "DEQLayer": (
        lambda: keras_deq.DEQLayer(TanhCell(units=5), tol=1e-5),
        RNG.normal(size=(8, 4)).astype("float32"),
        1,  # the Jacobian penalty, 0 while γ = 0
    ),
    "DEQLayer_penalty": (
        lambda: keras_deq.DEQLayer(
            TanhCell(units=5), jac_weight=0.5, correction_weight=1.0, seed=0
        ),
        RNG.normal(size=(8, 4)).astype("float32"),
        2,  # the penalty and the correction
        {"random_in_training": True},  # the penalty's probes
    ),
    "DEQLayer_transformer_block": (
        lambda: keras_deq.DEQLayer(
            DEQTransformerBlock(
                8, 2, 16, dropout=0.0, init_stddev=0.05, seed=0
            ),
            sample_axes=2,
            max_iter=60,
            tol=1e-6,
        ),
        RNG.normal(size=(2, 5, 24)).astype("float32"),
        1,
        # XLA's and TF's float32 arithmetic part by about tol.
        {"fit_atol": 1e-4},
    ),
    "DEQLayer_mdeq_block": (
        lambda: keras_deq.DEQLayer(
            MDEQBlock(widths=(4, 8), num_groups=2, seed=0),
            max_iter=30,
            tol=1e-6,
        ),
        [
            RNG.normal(size=(2, 8, 8, 4)).astype("float32"),
            RNG.normal(size=(2, 4, 4, 8)).astype("float32"),
        ],
        1,
        # Known limitation: under XLA the training step fails to compile
        # (the gradient of UpSampling2D's Tile inside the Jacobian
        # penalty's tf.cond needs a compile-time shape).
        {"xla": False},
    ),
    "GroupNorm": (
        lambda: layers.GroupNorm(2),
        RNG.normal(size=(4, 3, 3, 4)).astype("float32"),
        0,
    ),
    "VariationalDropout": (
        lambda: layers.VariationalDropout(0.3, seed=0),
        RNG.normal(size=(8, 6)).astype("float32"),
        0,
        {"random_in_training": True},  # the masks
    ),
    "WeightNormalization": (
        lambda: layers.WeightNormalization(keras.layers.Dense(3)),
        RNG.normal(size=(8, 4)).astype("float32"),
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_contract(name):
    make_layer, x, training_losses, *options = CASES[name]
    check_layer_contract(
        make_layer, x, training_losses=training_losses, **dict(*options)
    )
