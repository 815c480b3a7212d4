"""DEQLayer's fixed-point correction loss: value in `fit`, metric, config."""

import keras
import numpy as np
import pytest

import keras_deq
from tests.blocks import LinearCell
from tests.blocks import TanhCell

D = 8


def inputs(n, d=D, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype("float32")


def reference(a, x, weight, num_states, decay):
    """λ Σ_k w_k mean ‖f(z_k) − z*‖² / ‖z*‖² for f(z) = z A + x from 0."""
    a, x = a.astype(np.float64), x.astype(np.float64)
    z_star = x @ np.linalg.inv(np.eye(len(a)) - a)
    weights = decay ** np.arange(num_states - 1, -1, -1.0)
    weights /= weights.sum()
    z, value = np.zeros_like(x), 0.0
    for w in weights:
        step = z @ a + x
        value += (
            w * (((step - z_star) ** 2).sum(-1) / (z_star**2).sum(-1)).mean()
        )
        z = step
    return weight * value


@pytest.mark.parametrize("gradient", ["implicit", "phantom"])
def test_fit_loss_adds_the_correction_and_logs_it(gradient):
    weight, num_states, decay = 3.0, 4, 0.5
    layer = keras_deq.DEQLayer(
        LinearCell(norm=0.7),
        gradient=gradient,
        tol=1e-6,
        max_iter=60,
        correction_weight=weight,
        correction_states=num_states,
        correction_decay=decay,
        name="deq",
    )
    model = keras.Sequential([keras.Input((D,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = inputs(128), inputs(128, seed=1)
    mse = float(np.mean((model.predict(x, verbose=0) - y) ** 2))
    logs = model.fit(x, y, batch_size=128, epochs=1, verbose=0).history
    expected = reference(layer.block.a.numpy(), x, weight, num_states, decay)
    assert expected > 0.05  # 4 plain steps of a 0.7-contraction from 0
    np.testing.assert_allclose(
        logs["deq_correction_loss"][0], expected, rtol=1e-3
    )
    np.testing.assert_allclose(logs["loss"][0] - mse, expected, rtol=1e-3)
    # Evaluation adds nothing and logs no correction.
    result = model.evaluate(x, y, batch_size=128, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], mse, rtol=1e-5)
    assert "deq_correction_loss" not in result


def test_the_correction_teaches_f_to_converge_in_fewer_steps():
    # Trained on the correction alone, the linear map contracts more: the
    # solve from zero needs fewer iterations, and the loss falls.
    layer = keras_deq.DEQLayer(
        LinearCell(norm=0.9),
        tol=1e-4,
        max_iter=200,
        correction_weight=1.0,
        name="deq",
    )
    model = keras.Sequential([keras.Input((D,)), layer])
    x = inputs(256)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=lambda y, p: 0.0 * p
    )
    before = model.evaluate(x, x, verbose=0, return_dict=True)
    radius = np.abs(np.linalg.eigvals(layer.block.a.numpy())).max()
    logs = model.fit(x, x, batch_size=64, epochs=20, verbose=0).history
    after = model.evaluate(x, x, verbose=0, return_dict=True)
    shrunk = np.abs(np.linalg.eigvals(layer.block.a.numpy())).max()
    assert shrunk < 0.7 * radius, (radius, shrunk)
    assert after["deq_forward_nfe"] < 0.7 * before["deq_forward_nfe"]
    losses = logs["deq_correction_loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_off_by_default_with_no_metric():
    layer = keras_deq.DEQLayer(TanhCell(units=4))
    assert layer.correction_weight == 0.0
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(optimizer="sgd", loss="mse")
    logs = model.fit(inputs(8, 4), inputs(8, 4), verbose=0).history
    assert not any("correction" in key for key in logs)


def test_config_round_trip_keeps_the_correction_settings():
    layer = keras_deq.DEQLayer(
        TanhCell(),
        correction_weight=0.5,
        correction_states=2,
        correction_decay=0.9,
    )
    clone = keras_deq.DEQLayer.from_config(layer.get_config())
    assert (
        clone.correction_weight,
        clone.correction_states,
        clone.correction_decay,
    ) == (0.5, 2, 0.9)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(correction_weight=-1.0), ValueError, r"correction_weight.*-1"),
        (dict(correction_states=0), ValueError, r"correction_states.*>= 1"),
        (dict(correction_states=2.0), TypeError, r"correction_states.*2.0"),
        (dict(correction_decay=0), ValueError, r"correction_decay.*\(0, 1\]"),
    ],
)
def test_bad_correction_arguments_raise(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        keras_deq.DEQLayer(TanhCell(), **kwargs)
