"""Hutchinson estimator and power method against dense Jacobians."""

import numpy as np
import pytest
import tensorflow as tf

from keras_deq import jacobian
from tests import testing

D = 6


def mlp(seed=0):
    """A small nonlinear f(z) = tanh(z W + c) V + 0.3 z, float64."""
    rng = np.random.default_rng(seed)
    w = tf.Variable(rng.normal(size=(D, 12)) / 2)
    v = tf.Variable(rng.normal(size=(12, D)) / 3)
    c = tf.constant(rng.normal(size=(1, 12)))

    def f(z):
        return tf.tanh(z @ w + c) @ v + 0.3 * z

    return f, [w, v]


def points(n=3, seed=1):
    return tf.constant(np.random.default_rng(seed).normal(size=(n, D)))


def exact_frobenius(f, z):
    """‖J_f(z)‖_F² / d per sample, from the dense Jacobian."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        fz = f(z)
    jac = tape.batch_jacobian(fz, z)
    return tf.reduce_sum(tf.square(jac), axis=[1, 2]) / D


def test_estimate_is_unbiased():
    f, _ = mlp()
    z = points()
    exact = exact_frobenius(f, z).numpy()
    copies = 400
    tiled = tf.repeat(z, copies, axis=0)  # 400 independent probes per point
    draws = [
        jacobian.frobenius_estimate(f, tiled, num_samples=2, seed=s)
        for s in range(10)
    ]
    mean = np.mean([d.numpy().reshape(3, copies) for d in draws], axis=(0, 2))
    np.testing.assert_allclose(mean, exact, rtol=0.03)
    # A single probe is far from the mean: the test above is not trivial.
    single = draws[0].numpy().reshape(3, copies)[:, 0]
    assert np.max(np.abs(single / exact - 1)) > 0.05


def test_estimate_is_deterministic_per_seed():
    f, _ = mlp()
    z = points()
    a = jacobian.frobenius_estimate(f, z, num_samples=3, seed=7)
    b = jacobian.frobenius_estimate(f, z, num_samples=3, seed=7)
    c = jacobian.frobenius_estimate(f, z, num_samples=3, seed=8)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(a.numpy(), c.numpy())
    assert a.shape == (3,)


def test_gradient_of_a_seeded_estimate_matches_finite_differences():
    """Double backprop: same probes, so the estimate is a smooth function."""
    f, variables = mlp()
    z = points()

    def value():
        est = jacobian.frobenius_estimate(f, z, num_samples=2, seed=3)
        return tf.reduce_sum(est)

    with tf.GradientTape() as tape:
        loss = value()
    grads = tape.gradient(loss, variables)
    numeric = testing.central_differences(lambda: value().numpy(), variables)
    for g, n in zip(grads, numeric, strict=True):
        np.testing.assert_allclose(g.numpy(), n, rtol=1e-6, atol=1e-9)


def test_mean_gradient_matches_finite_differences_of_the_exact_norm():
    f, variables = mlp()
    z = points()
    tiled = tf.repeat(z, 500, axis=0)

    @tf.function
    def estimate_grads(seed):
        with tf.GradientTape() as tape:
            est = jacobian.frobenius_estimate(
                f, tiled, num_samples=2, seed=seed
            )
            loss = tf.reduce_sum(est) / 500
        return tape.gradient(loss, variables)

    draws = [estimate_grads(tf.constant(s)) for s in range(10)]
    mean = [np.mean([d[i].numpy() for d in draws], axis=0) for i in range(2)]
    exact = tf.function(lambda: tf.reduce_sum(exact_frobenius(f, z)))
    numeric = testing.central_differences(lambda: exact().numpy(), variables)
    for g, n in zip(mean, numeric, strict=True):
        error = np.linalg.norm(g - n) / np.linalg.norm(n)
        print(f"relative error of the mean gradient: {error:.4f}")
        assert error < 0.05, error
    # One draw's gradient is not the expected one: the check can fail.
    one = draws[0][0].numpy()
    assert np.linalg.norm(one - numeric[0]) / np.linalg.norm(numeric[0]) > 0.01


def test_frobenius_estimate_rejects_bad_arguments():
    f, _ = mlp()
    with pytest.raises(ValueError, match="num_samples"):
        jacobian.frobenius_estimate(f, points(), num_samples=0)
    with pytest.raises(TypeError, match="seed"):
        jacobian.frobenius_estimate(f, points(), seed="x")
    with pytest.raises(ValueError, match=r"\[batch, d\]"):
        jacobian.frobenius_estimate(f, tf.zeros([2, 3, 4], tf.float64))


def planted_matrices(dominant, seed=0):
    """Matrices P diag(λ) P⁻¹ with λ₁ = dominant[b], |λ_i| ≤ 0.6 |λ₁| else."""
    rng = np.random.default_rng(seed)
    mats = []
    for lam in dominant:
        others = rng.uniform(-0.6, 0.6, size=D - 1) * abs(lam)
        p = rng.normal(size=(D, D)) + 3 * np.eye(D)
        mats.append(p @ np.diag(np.r_[lam, others]) @ np.linalg.inv(p))
    return np.stack(mats)


def test_power_method_matches_dense_eigenvalues():
    mats = planted_matrices([1.7, -0.9, 0.4])
    a = tf.constant(mats)

    def f(z):
        return tf.einsum("bij,bj->bi", a, z)

    radius = jacobian.spectral_radius(f, points(), num_iters=60).numpy()
    expected = np.max(np.abs(np.linalg.eigvals(mats)), axis=-1)
    np.testing.assert_allclose(radius, expected, rtol=1e-6)
    # Too few iterations do not get there: the comparison can fail.
    rough = jacobian.spectral_radius(f, points(), num_iters=2).numpy()
    assert np.max(np.abs(rough / expected - 1)) > 1e-3


def test_power_method_on_a_nonlinear_block():
    f, _ = mlp()
    z = points()
    with tf.GradientTape() as tape:
        tape.watch(z)
        fz = f(z)
    jac = tape.batch_jacobian(fz, z).numpy()
    eig = np.linalg.eigvals(jac)
    expected = np.max(np.abs(eig), axis=-1)
    radius = jacobian.spectral_radius(f, z, num_iters=200).numpy()
    # Where one real eigenvalue dominates, the power method finds it.
    for b in range(3):
        top = eig[b][np.argsort(-np.abs(eig[b]))]
        if abs(top[0].imag) < 1e-12 and abs(top[1]) < 0.9 * abs(top[0]):
            np.testing.assert_allclose(radius[b], expected[b], rtol=1e-5)
    np.testing.assert_allclose(radius, expected, rtol=0.2)
