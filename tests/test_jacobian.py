"""Hutchinson estimator and power method against dense Jacobians, on every
Keras backend (`KERAS_BACKEND=jax pytest tests/test_jacobian.py`)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_deq import jacobian
from tests.any_backend import central_differences
from tests.any_backend import gradients
from tests.any_backend import to_numpy

D = 6


def mlp(seed=0):
    """f(z) = tanh(z W + c) V + 0.3 z in float64, its variables, and its
    Jacobians in closed form: ∂f_i/∂z_j = Σ_k W_jk (1 − t_k²) V_ki + 0.3 δ_ij.
    """
    rng = np.random.default_rng(seed)
    w = keras.Variable(rng.normal(size=(D, 12)) / 2, dtype="float64")
    v = keras.Variable(rng.normal(size=(12, D)) / 3, dtype="float64")
    c = rng.normal(size=(1, 12))

    def tanh(x):
        # Not keras.ops.tanh, which computes float64 in float32 on JAX
        # (Keras 3.15): the finite differences need float64.
        return 1 - 2 / (ops.exp(2 * x) + 1)

    def f(z):
        return ops.matmul(tanh(ops.matmul(z, w) + c), v) + 0.3 * z

    def dense(z):
        z, w_, v_ = to_numpy(z), to_numpy(w), to_numpy(v)
        slope = 1 - np.tanh(z @ w_ + c) ** 2
        return np.einsum("jk,bk,ki->bij", w_, slope, v_) + 0.3 * np.eye(D)

    return f, [w, v], dense


def points(n=3, seed=1):
    return ops.convert_to_tensor(
        np.random.default_rng(seed).normal(size=(n, D))
    )


def exact_frobenius(dense, z):
    """‖J_f(z)‖_F² / d per sample, from the dense Jacobian."""
    return np.sum(np.square(dense(z)), axis=(1, 2)) / D


def test_estimate_is_unbiased():
    f, _, dense = mlp()
    z = points()
    exact = exact_frobenius(dense, z)
    copies = 400
    tiled = ops.repeat(z, copies, axis=0)  # 400 independent probes per point
    draws = [
        to_numpy(jacobian.frobenius_estimate(f, tiled, num_samples=2, seed=s))
        for s in range(10)
    ]
    mean = np.mean([d.reshape(3, copies) for d in draws], axis=(0, 2))
    np.testing.assert_allclose(mean, exact, rtol=0.03)
    # A single probe is far from the mean: the test above is not trivial.
    single = draws[0].reshape(3, copies)[:, 0]
    assert np.max(np.abs(single / exact - 1)) > 0.05


def test_estimate_is_deterministic_per_seed():
    f, _, _ = mlp()
    z = points()
    a = jacobian.frobenius_estimate(f, z, num_samples=3, seed=7)
    b = jacobian.frobenius_estimate(f, z, num_samples=3, seed=7)
    c = jacobian.frobenius_estimate(f, z, num_samples=3, seed=8)
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert not np.allclose(to_numpy(a), to_numpy(c))
    assert tuple(a.shape) == (3,)


def test_gradient_of_a_seeded_estimate_matches_finite_differences():
    """Double backprop: same probes, so the estimate is a smooth function."""
    f, variables, _ = mlp()
    z = points()

    def value():
        est = jacobian.frobenius_estimate(f, z, num_samples=2, seed=3)
        return ops.sum(est)

    grads = gradients(value, variables)
    numeric = central_differences(lambda: float(value()), variables)
    for g, n in zip(grads, numeric, strict=True):
        np.testing.assert_allclose(to_numpy(g), n, rtol=1e-6, atol=1e-9)


def test_mean_gradient_matches_finite_differences_of_the_exact_norm():
    f, variables, dense = mlp()
    z = points()
    tiled = ops.repeat(z, 500, axis=0)

    def estimate_grads(seed):
        def loss():
            est = jacobian.frobenius_estimate(
                f, tiled, num_samples=2, seed=seed
            )
            return ops.sum(est) / 500

        return [to_numpy(g) for g in gradients(loss, variables)]

    draws = [estimate_grads(s) for s in range(10)]
    mean = [np.mean([d[i] for d in draws], axis=0) for i in range(2)]
    numeric = central_differences(
        lambda: float(np.sum(exact_frobenius(dense, z))), variables
    )
    for g, n in zip(mean, numeric, strict=True):
        error = np.linalg.norm(g - n) / np.linalg.norm(n)
        print(f"relative error of the mean gradient: {error:.4f}")
        assert error < 0.05, error
    # One draw's gradient is not the expected one: the check can fail.
    one = draws[0][0]
    assert np.linalg.norm(one - numeric[0]) / np.linalg.norm(numeric[0]) > 0.01


def test_frobenius_estimate_rejects_bad_arguments():
    f, _, _ = mlp()
    with pytest.raises(ValueError, match="num_samples"):
        jacobian.frobenius_estimate(f, points(), num_samples=0)
    with pytest.raises(TypeError, match="seed"):
        jacobian.frobenius_estimate(f, points(), seed="x")
    with pytest.raises(ValueError, match=r"\[batch, d\]"):
        jacobian.frobenius_estimate(f, ops.zeros((2, 3, 4), "float64"))


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
    a = ops.convert_to_tensor(mats)

    def f(z):
        return ops.einsum("bij,bj->bi", a, z)

    radius = to_numpy(jacobian.spectral_radius(f, points(), num_iters=60))
    expected = np.max(np.abs(np.linalg.eigvals(mats)), axis=-1)
    np.testing.assert_allclose(radius, expected, rtol=1e-6)
    # Too few iterations do not get there: the comparison can fail.
    rough = to_numpy(jacobian.spectral_radius(f, points(), num_iters=2))
    assert np.max(np.abs(rough / expected - 1)) > 1e-3


def test_power_method_on_a_nonlinear_block():
    f, _, dense = mlp()
    z = points()
    eig = np.linalg.eigvals(dense(z))
    expected = np.max(np.abs(eig), axis=-1)
    radius = to_numpy(jacobian.spectral_radius(f, z, num_iters=200))
    # Where one real eigenvalue dominates, the power method finds it.
    for b in range(3):
        top = eig[b][np.argsort(-np.abs(eig[b]))]
        if abs(top[0].imag) < 1e-12 and abs(top[1]) < 0.9 * abs(top[0]):
            np.testing.assert_allclose(radius[b], expected[b], rtol=1e-5)
    np.testing.assert_allclose(radius, expected, rtol=0.2)
