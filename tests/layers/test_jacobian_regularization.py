"""The Jacobian penalty of DEQLayer: value, gradient, gate, distribution."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from tests.blocks import LinearCell
from tests.blocks import TanhCell

D = 8


def inputs(n, d=D, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype("float32")


def exact_penalty(layer, gamma):
    """γ ‖J_f‖_F² / d for a LinearCell, whose Jacobian is Aᵀ everywhere."""
    a = layer.block.a.numpy()
    return gamma * np.sum(a**2) / a.shape[0]


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_penalty_and_its_gradient_match_the_exact_frobenius_norm(jit):
    gamma = 2.0
    layer = keras_deq.DEQLayer(LinearCell(), jac_weight=gamma, seed=1)
    x = inputs(8192)
    layer.build(x.shape)

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            layer(x, training=True)
            penalty = tf.add_n(layer.losses)
        return penalty, tape.gradient(penalty, layer.block.a)

    penalty, grad = step()
    np.testing.assert_allclose(
        penalty.numpy(), exact_penalty(layer, gamma), rtol=0.05
    )
    # E[∇_A γ‖εAᵀ‖²/d] = 2γA/d; z* carries no gradient of the penalty.
    expected = 2 * gamma * layer.block.a.numpy() / D
    error = np.linalg.norm(grad.numpy() - expected) / np.linalg.norm(expected)
    assert error < 0.1, error


def test_fit_loss_includes_the_penalty():
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras_deq.DEQLayer(LinearCell(), jac_weight=3.0, name="deq"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = inputs(256), inputs(256, 1, seed=1)
    mse = float(np.mean((model.predict(x, verbose=0) - y) ** 2))
    logs = model.fit(x, y, batch_size=256, epochs=1, verbose=0).history
    assert logs["deq_jac_loss"][0] > 0.1
    np.testing.assert_allclose(
        logs["loss"][0] - mse, logs["deq_jac_loss"][0], rtol=1e-4
    )
    # Evaluation (training=False) adds nothing.
    np.testing.assert_allclose(
        model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)[
            "loss"
        ],
        mse,
        rtol=1e-5,
    )


def test_bernoulli_gate_fires_with_probability_p():
    layer = keras_deq.DEQLayer(
        TanhCell(units=D), jac_weight=1.0, jac_freq=0.25, seed=3
    )
    x = inputs(16, 4)
    layer.build(x.shape)

    @tf.function
    def call():
        layer(x, training=True)
        return tf.add_n(layer.losses)

    penalties = np.array([call().numpy() for _ in range(300)])
    fraction = np.mean(penalties > 0)
    assert 0.17 <= fraction <= 0.33, fraction
    # The metric averages over the calls that computed the penalty.
    assert layer.jac_loss.count.numpy() == np.sum(penalties > 0)
    np.testing.assert_allclose(
        layer.jac_loss.result().numpy(),
        penalties[penalties > 0].mean(),
        rtol=1e-5,
    )


@pytest.fixture
def estimator_runs(monkeypatch):
    """Counts executions (not traces) of the Hutchinson estimator."""
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    original = keras_deq.jacobian.frobenius_estimate

    def counting(*args, **kwargs):
        with tf.control_dependencies([counter.assign_add(1)]):
            return tf.identity(original(*args, **kwargs))

    monkeypatch.setattr(keras_deq.jacobian, "frobenius_estimate", counting)
    return counter


@pytest.mark.parametrize(
    "weight, freq, expected", [(1.0, 0.0, 0), (0.0, 1.0, 0), (1.0, 1.0, 6)]
)
def test_estimator_runs_only_when_the_gate_is_on(
    estimator_runs, weight, freq, expected
):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras_deq.DEQLayer(
                TanhCell(units=D), jac_weight=weight, jac_freq=freq
            ),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = inputs(48, 4), inputs(48, D)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert estimator_runs.numpy() == expected


def test_nothing_is_added_at_inference(estimator_runs):
    layer = keras_deq.DEQLayer(TanhCell(units=D), jac_weight=1.0)
    x = inputs(8, 4)
    layer(x, training=False)
    layer(x)
    assert layer.losses == []
    assert estimator_runs.numpy() == 0
    layer(x, training=True)
    assert estimator_runs.numpy() == 1
    assert len(layer.losses) == 1


def test_gamma_and_p_change_without_retracing():
    layer = keras_deq.DEQLayer(LinearCell(), jac_weight=0.0, seed=0)
    x = inputs(2048)
    layer.build(x.shape)

    @tf.function
    def call():
        layer(x, training=True)
        return tf.add_n(layer.losses)

    assert call().numpy() == 0.0
    layer.jac_weight.assign(1.5)
    np.testing.assert_allclose(
        call().numpy(), exact_penalty(layer, 1.5), rtol=0.05
    )
    layer.jac_freq.assign(0.0)
    assert call().numpy() == 0.0
    assert call.experimental_get_tracing_count() == 1


def test_penalty_under_mirrored_strategy(mirrored):
    strategy = mirrored
    with strategy.scope():
        layer = keras_deq.DEQLayer(
            LinearCell(trainable_a=False), jac_weight=2.0, name="deq"
        )
        model = keras.Sequential(
            [keras.Input((D,)), layer, keras.layers.Dense(1)]
        )
        model.compile(optimizer="adam", loss="mse")
    assert strategy.num_replicas_in_sync == 2
    x, y = inputs(4096), inputs(4096, 1, seed=1)
    logs = model.fit(x, y, batch_size=1024, epochs=2, verbose=0).history
    np.testing.assert_allclose(
        logs["deq_jac_loss"], exact_penalty(layer, 2.0), rtol=0.05
    )
    assert np.all(np.isfinite(logs["loss"]))


def test_penalty_under_mixed_precision():
    x = inputs(512, 4)
    values = {}
    for policy in ["float32", "mixed_float16"]:
        keras.mixed_precision.set_global_policy(policy)
        layer = keras_deq.DEQLayer(
            TanhCell(units=D, w_norm=0.9), jac_weight=1.0, seed=5
        )
        out = layer(x, training=True)
        (penalty,) = layer.losses
        assert penalty.dtype == tf.float32
        values[policy] = penalty.numpy()
        assert out.dtype == layer.compute_dtype
    # Same seed, same probes: only the float16 block's rounding differs.
    np.testing.assert_allclose(
        values["mixed_float16"], values["float32"], rtol=0.02
    )


def test_config_round_trip_keeps_the_penalty_settings():
    layer = keras_deq.DEQLayer(
        TanhCell(), jac_weight=0.5, jac_freq=0.05, jac_samples=2, seed=4
    )
    config = layer.get_config()
    clone = keras_deq.DEQLayer.from_config(config)
    for key in ["jac_weight", "jac_freq", "jac_samples", "seed"]:
        assert clone.get_config()[key] == config[key]
    clone.build((None, 4))
    assert clone.jac_weight.numpy() == 0.5
    np.testing.assert_allclose(clone.jac_freq.numpy(), 0.05)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(jac_weight=-1.0), ValueError, r"jac_weight.*>= 0.*-1\.0"),
        (dict(jac_weight=float("inf")), ValueError, "jac_weight.*finite"),
        (dict(jac_freq=1.5), ValueError, r"jac_freq.*\[0, 1\].*1\.5"),
        (dict(jac_samples=0), ValueError, "jac_samples.*>= 1.*0"),
        (dict(jac_freq="often"), TypeError, "jac_freq.*'often'"),
        (dict(seed=1.5), TypeError, "seed.*1.5"),
    ],
)
def test_bad_penalty_arguments_raise(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        keras_deq.DEQLayer(TanhCell(), **kwargs)


def test_layer_spectral_radius_is_that_of_the_block():
    layer = keras_deq.DEQLayer(LinearCell())
    x = inputs(4)
    layer.build(x.shape)
    # A symmetric A with eigenvalues -0.85, 0.6, ...: ρ = 0.85.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(D, D)))
    eig = np.r_[-0.85, np.linspace(0.6, -0.5, D - 1)]
    layer.block.a.assign((q * eig) @ q.T)
    radius = layer.spectral_radius(x).numpy()
    expected = 0.85
    np.testing.assert_allclose(radius, expected, rtol=1e-4)
