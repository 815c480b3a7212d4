"""JacobianPenalty on its own: value, gate, metric, config."""

import numpy as np
import pytest
import tensorflow as tf

from keras_deq.regularizers import JacobianPenalty


def scaled(c):
    """f(z) = c · z: J = c · I, so ‖J‖_F² / d = c² exactly."""
    return lambda z: c * z


def test_value_is_gamma_times_the_frobenius_norm_per_unit():
    z = tf.random.stateless_normal([4, 50], [0, 1])
    penalty = JacobianPenalty(weight=2.0, freq=1.0, num_samples=200, seed=3)
    value = float(penalty.loss(scaled(3.0), z))
    # γ · c² = 18; Hutchinson with 4 · 200 probes of 50 units: 0.7% spread.
    assert value == pytest.approx(18.0, rel=0.05)
    assert float(penalty.metric.result()) == pytest.approx(value)


def test_the_gate_off_adds_zero_and_the_metric_reads_nan():
    z = tf.ones([3, 5])
    for settings in (dict(weight=1.0, freq=0.0), dict(weight=0.0, freq=1.0)):
        penalty = JacobianPenalty(**settings)
        assert float(penalty.loss(scaled(2.0), z)) == 0.0
        assert np.isnan(penalty.metric.result().numpy())


def test_the_gate_opens_at_rate_p():
    penalty = JacobianPenalty(weight=1.0, freq=0.3, seed=0)
    z = tf.ones([2, 3])
    opened = sum(float(penalty.loss(scaled(1.0), z)) > 0 for _ in range(400))
    # Binomial(400, 0.3): mean 120, standard deviation 9.2.
    assert 80 < opened < 160


def test_the_variables_are_the_config():
    penalty = JacobianPenalty(weight=0.5, freq=0.25, num_samples=2, seed=1)
    penalty.weight.assign(0.75)
    config = penalty.get_config()
    assert (config["weight"], config["freq"]) == (0.75, 0.25)
    clone = JacobianPenalty.from_config(config)
    assert float(clone.weight.numpy()) == 0.75
    assert clone.num_samples == 2 and clone.seed == 1


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(weight=-1.0), r"`jac_weight` must be a finite number >= 0"),
        (dict(freq=1.5), r"`jac_freq` must be in \[0, 1\]"),
        (dict(num_samples=0), r"`jac_samples` must be an integer >= 1"),
    ],
)
def test_bad_settings_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        JacobianPenalty(**kwargs)
