"""JacobianPenalty and the fixed-point correction on their own."""

import numpy as np
import pytest
import tensorflow as tf

from keras_deq.regularizers import JacobianPenalty
from keras_deq.regularizers import fixed_point_correction


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


@pytest.mark.parametrize("num_states, decay", [(1, 0.8), (3, 0.8), (4, 0.5)])
def test_fixed_point_correction_matches_numpy_and_finite_differences(
    num_states, decay
):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6)) * 0.3
    x = rng.normal(size=(5, 6))
    z0 = rng.normal(size=(5, 6))
    a_var = tf.Variable(a)

    def f(z):
        return z @ a_var + x

    with tf.GradientTape() as tape:
        # z* = x (I − A)⁻¹ with its exact gradient.
        z_star = x @ tf.linalg.inv(np.eye(6) - a_var)
        value = fixed_point_correction(f, z0, z_star, num_states, decay)
    grad = tape.gradient(value, a_var).numpy()
    iterates = [z0]
    for _ in range(num_states - 1):
        iterates.append(iterates[-1] @ a + x)
    weights = decay ** np.arange(num_states - 1, -1, -1.0)
    weights /= weights.sum()
    scale = ((x @ np.linalg.inv(np.eye(6) - a)) ** 2).sum(-1)

    def reference(a_):
        # The iterates and the normalising ‖z*‖² are held constant; the
        # one step from each iterate and z* itself move with A.
        z_star = x @ np.linalg.inv(np.eye(6) - a_)
        return sum(
            w * (((z @ a_ + x - z_star) ** 2).sum(-1) / scale).mean()
            for w, z in zip(weights, iterates, strict=True)
        )

    np.testing.assert_allclose(float(value), reference(a), rtol=1e-12)
    numeric = np.zeros_like(a)
    eps = 1e-6
    for i in range(6):
        for j in range(6):
            step = np.zeros_like(a)
            step[i, j] = eps
            numeric[i, j] = (reference(a + step) - reference(a - step)) / (
                2 * eps
            )
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_fixed_point_correction_is_zero_at_a_one_step_map():
    # f(z) = x reaches z* = x in one step from anywhere.
    x = tf.random.stateless_normal([3, 4], [0, 2])
    z0 = tf.random.stateless_normal([3, 4], [0, 3])
    value = fixed_point_correction(lambda z: 0.0 * z + x, z0, x, 3, 0.8)
    assert float(value) == 0.0


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(num_states=0), r"`correction_states` must be an integer >= 1"),
        (dict(decay=0.0), r"`correction_decay` must be in \(0, 1\]"),
    ],
)
def test_fixed_point_correction_bad_settings_raise(kwargs, pattern):
    z = tf.ones([2, 3])
    with pytest.raises(ValueError, match=pattern):
        fixed_point_correction(lambda z: z, z, z, **kwargs)
