"""The solvers against closed forms and a dense reference, on every
Keras backend (`KERAS_BACKEND=jax pytest tests/solvers` runs them on JAX)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_deq import solvers
from tests.any_backend import BACKEND
from tests.any_backend import COMPILE_MODES
from tests.any_backend import compiled
from tests.any_backend import contraction
from tests.any_backend import to_numpy

ALL = ["broyden", "anderson", "fixed_point"]


def linear_problem(rho, d=8, batch=3, seed=0):
    """z = z Aᵀ + b per sample, with ρ(A) = rho, and its exact solution."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    a *= rho / np.max(np.abs(np.linalg.eigvals(a)))
    b = rng.normal(size=(batch, d))
    exact = np.linalg.solve(np.eye(d) - a, b.T).T

    def f(z):
        return ops.matmul(z, a.T) + b

    return f, b, exact


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_linear_fixed_point_matches_closed_form(name, mode):
    f, b, exact = linear_problem(rho=0.7)
    solve = compiled(lambda z0: solvers.get(name)(f, z0, 200, 1e-10), mode)
    result = solve(ops.zeros_like(b))
    np.testing.assert_allclose(to_numpy(result.z), exact, atol=1e-5)
    assert np.all(to_numpy(result.rel_residual) < 1e-10)
    assert np.all(to_numpy(result.nstep) <= 200)


def test_broyden_solves_where_plain_iteration_diverges():
    f, b, exact = linear_problem(rho=1.5)
    z0 = ops.zeros_like(b)
    result = solvers.broyden(f, z0, 40, 1e-10)
    np.testing.assert_allclose(to_numpy(result.z), exact, atol=1e-5)
    plain = solvers.fixed_point(f, z0, 40, 1e-10)
    assert np.all(to_numpy(plain.rel_residual) > 1e-2)


def test_result_fields_and_residuals_are_of_the_returned_z():
    f, b, _ = linear_problem(rho=0.9)
    for name in ALL:
        result = solvers.get(name)(f, ops.zeros_like(b), 5, 1e-12)
        z = to_numpy(result.z)
        fz = to_numpy(f(result.z))
        abs_res = np.linalg.norm(fz - z, axis=-1)
        np.testing.assert_allclose(
            to_numpy(result.abs_residual), abs_res, rtol=1e-6
        )
        np.testing.assert_allclose(
            to_numpy(result.rel_residual),
            abs_res / np.linalg.norm(fz, axis=-1),
            rtol=1e-6,
        )
        assert keras.backend.standardize_dtype(result.nstep.dtype) == "int32"
        assert tuple(result.nstep.shape) == (3,)


@pytest.mark.parametrize("name", ALL)
def test_abs_stop_mode_stops_on_absolute_residual(name):
    f, b, _ = linear_problem(rho=0.5)
    result = solvers.get(name)(f, ops.zeros_like(b) * 1e3, 100, 1e-3, "abs")
    assert np.all(to_numpy(result.abs_residual) < 1e-3)
    # Stopping was on the absolute residual: the relative one is smaller
    # but not pushed to its own tolerance by extra iterations.
    assert np.all(to_numpy(result.nstep) < 100)


def tanh_batch(scales, d=16, seed=1):
    rng = np.random.default_rng(seed)
    w = contraction(rng, d, 0.95).astype(np.float32)
    x = (rng.normal(size=(len(scales), d)) * np.array(scales)[:, None]).astype(
        np.float32
    )

    def f(z):
        return ops.tanh(ops.matmul(z, w) + x_var)

    x_var = keras.Variable(x)
    return f, x, x_var


@pytest.mark.parametrize("name", ALL)
def test_sample_result_does_not_depend_on_its_batch(name):
    scales = [0.01, 0.3, 1.0, 3.0, 10.0, 0.05, 30.0, 0.5]
    f, x, x_var = tanh_batch(scales)
    solve = solvers.get(name)
    batch = solve(f, ops.zeros_like(x), 60, 1e-3)
    steps = to_numpy(batch.nstep)
    # The batch mixes fast and slow samples, so a batch-global stopping rule
    # would keep iterating the fast ones and change their results.
    assert steps.min() < steps.max()
    for i in range(len(scales)):
        x_var.assign(np.repeat(x[i : i + 1], len(scales), 0))
        alone = solve(f, ops.zeros_like(x), 60, 1e-3)
        np.testing.assert_allclose(
            to_numpy(alone.z)[0], to_numpy(batch.z)[i], atol=1e-5
        )
        assert to_numpy(alone.nstep)[0] == steps[i]
    x_var.assign(x)


@pytest.mark.parametrize("name", ALL)
def test_non_finite_sample_does_not_poison_the_batch(name):
    scales = [1.0, 1.0, 1.0, 1.0]
    f, x, x_var = tanh_batch(scales)
    clean = solvers.get(name)(f, ops.zeros_like(x), 40, 1e-4)
    bad = x.copy()
    bad[1, 3] = np.nan
    x_var.assign(bad)
    result = solvers.get(name)(f, ops.zeros_like(x), 40, 1e-4)
    keep = [0, 2, 3]
    z = to_numpy(result.z)
    np.testing.assert_allclose(z[keep], to_numpy(clean.z)[keep], atol=1e-6)
    # The bad sample ends at once on its (finite) initial iterate, its
    # residual reported as infinite.
    assert np.all(np.isfinite(z[1]))
    assert np.isinf(to_numpy(result.rel_residual)[1])
    assert to_numpy(result.nstep)[1] == 1


@pytest.mark.parametrize("name", ALL)
def test_divergence_ends_at_max_iter_with_lowest_residual_iterate(name):
    rng = np.random.default_rng(4)
    b = rng.normal(size=(2, 4))

    def f(z):
        # Grows without bound from any start; later iterates overflow.
        return 1e3 * z**3 + b

    result = solvers.get(name)(f, ops.zeros_like(b), 25, 1e-6)
    assert np.all(to_numpy(result.nstep) <= 25)
    z = to_numpy(result.z)
    assert np.all(np.isfinite(z))
    # z0 = 0 has relative residual ‖b‖/‖b‖ = 1; what is returned is no worse
    # (the best iterate is chosen on the stopping criterion).
    assert np.all(to_numpy(result.rel_residual) <= 1.0)
    abs_only = solvers.get(name)(f, ops.zeros_like(b), 25, 1e-6, "abs")
    np.testing.assert_array_less(
        to_numpy(abs_only.abs_residual), np.linalg.norm(b, axis=-1) + 1e-9
    )


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="counts Python calls of f, which only eager TensorFlow makes",
)
def test_loop_stops_as_soon_as_every_sample_converged():
    calls = []

    def f(z):
        calls.append(1)
        return 0.5 * z + 1.0

    # Eagerly each evaluation of f is a Python call, so they can be counted.
    result = solvers.fixed_point(f, ops.zeros((2, 3)), 100, 1e-3)
    assert len(calls) == int(to_numpy(result.nstep).max()) < 100


def test_anderson_survives_a_singular_history():
    # f is constant: every residual after the first is identical, so the
    # Gram matrix of residual differences is singular.
    b = np.array([[1.0, 2.0, 3.0]], "float32")
    z0 = ops.zeros_like(b)
    result = solvers.anderson(lambda z: ops.zeros_like(z) + b, z0, 20, 1e-6)
    np.testing.assert_allclose(to_numpy(result.z), b, atol=1e-6)


def test_get_and_register():
    assert solvers.get("broyden") is solvers.broyden
    with pytest.raises(ValueError, match=r"solver='newton'"):
        solvers.get("newton")
    with pytest.raises(
        ValueError,
        match=r"`backward_solver` must be one of \[.*'broyden'.*\] \(or a "
        r"solver added with keras_deq.solvers.register\).*backward_solver='x'",
    ):
        solvers.get("x", "backward_solver")
    with pytest.raises(ValueError, match="already registered"):
        solvers.register("broyden", solvers.broyden)
    with pytest.raises(ValueError, match="non-empty string"):
        solvers.register("", solvers.broyden)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"max_iter": 0}, ValueError, r"max_iter.*>= 1.*max_iter=0"),
        ({"max_iter": 2.5}, TypeError, r"max_iter=2.5"),
        ({"tol": 0.0}, ValueError, r"tol.*> 0.*tol=0.0"),
        ({"tol": -1e-3}, ValueError, r"tol=-0.001"),
        ({"stop_mode": "max"}, ValueError, r"stop_mode.*'rel'.*'max'"),
    ],
)
@pytest.mark.parametrize("name", ALL)
def test_bad_arguments_raise(name, kwargs, error, pattern):
    args = {"max_iter": 10, "tol": 1e-3, **kwargs}
    with pytest.raises(error, match=pattern):
        solvers.get(name)(lambda z: z, ops.zeros((1, 2)), **args)


def test_unknown_keyword_arguments_raise():
    with pytest.raises(TypeError, match="stopmode"):
        solvers.broyden(
            lambda z: z, ops.zeros((1, 2)), 10, 1e-3, stopmode="abs"
        )


@pytest.mark.parametrize(
    "name, kwargs, pattern",
    [
        ("anderson", {"m": 0}, r"`m`.*m=0"),
        ("broyden", {"memory": 0}, r"`memory`.*memory=0"),
        ("anderson", {"beta": 0.0}, r"`beta`.*beta=0.0"),
        ("anderson", {"lam": -1.0}, r"`lam`.*lam=-1.0"),
        ("fixed_point", {"damping": 1.5}, r"`damping`.*damping=1.5"),
    ],
)
def test_solver_specific_arguments_are_checked(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        solvers.get(name)(lambda z: z, ops.zeros((1, 2)), 10, 1e-3, **kwargs)


def test_damped_fixed_point_follows_its_update_rule():
    result = solvers.fixed_point(
        lambda z: 0.5 * z + 1.0, ops.zeros((1, 1)), 2, 1e-9, damping=0.25
    )
    # z1 = 0.25 · f(0) + 0.75 · 0 = 0.25, whose relative residual
    # 0.875 / 1.125 is below z0's 1, so it is the one returned.
    np.testing.assert_allclose(to_numpy(result.z), [[0.25]])


def dense_broyden(f, z0, max_iter, memory):
    """Good Broyden with an explicit inverse-Jacobian matrix, in NumPy.

    Keeps the latest `memory` rank-one pairs: B = −I + Σ u vᵀ over them. A
    new pair comes from the current B (u = (dz − B dg) / (dzᵀ B dg),
    vᵀ = dzᵀ B) and then replaces the oldest. Returns every iterate and
    the last B (the one the last step used).
    """
    d = z0.shape[0]
    pairs = []

    def inverse():
        return -np.eye(d) + sum((np.outer(u, v) for u, v in pairs), 0)

    z, g = z0, f(z0) - z0
    z_prev = g_prev = None
    iterates = [z]
    for _ in range(max_iter - 1):
        if z_prev is not None:
            b = inverse()
            dz, dg = z - z_prev, g - g_prev
            bdg = b @ dg
            u = (dz - bdg) / (dz @ bdg)
            v = b.T @ dz
            pairs = (pairs + [(u, v)])[-memory:]
        z_prev, g_prev = z, g
        z = z - inverse() @ g
        g = f(z) - z
        iterates.append(z)
    return iterates, inverse()


@pytest.mark.parametrize("memory", [None, 3, 1])
@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_broyden_follows_dense_reference(memory, mode):
    # ρ = 1.2: plain iteration diverges, and 9 steps do not finish the
    # solve, so the returned iterate depends on every update.
    rng = np.random.default_rng(3)
    d, iters = 12, 10
    a = rng.normal(size=(d, d))
    a *= 1.2 / np.max(np.abs(np.linalg.eigvals(a)))
    b = rng.normal(size=(2, d))
    ref, ref_inverse = [], []
    for row in b:
        path, inverse = dense_broyden(
            lambda z, row=row: a @ z + row, np.zeros(d), iters, memory or d
        )
        res = [np.linalg.norm(a @ z + row - z) for z in path]
        ref.append(path[int(np.argmin(res))])
        # Broyden's B estimates (J_f − I)⁻¹; the result holds −B.
        ref_inverse.append(-inverse)

    def solve(z0):
        f = lambda z: ops.matmul(z, a.T) + b  # noqa: E731
        return solvers.broyden(f, z0, iters, 1e-30, "abs", memory=memory)

    solve = compiled(solve, mode)
    z0 = ops.zeros((2, d), "float64")
    for _ in range(3):  # the in-place history must start empty every call
        result = solve(z0)
        np.testing.assert_allclose(to_numpy(result.z), np.stack(ref), rtol=1e-8)
        # The estimate (I − J)⁻¹ ≈ −B applied to each basis vector, and
        # its transpose.
        for i, m in enumerate(ref_inverse):
            dense = solvers.LowRankInverse(
                ops.repeat(result.inverse.us[i : i + 1], d, 0),
                ops.repeat(result.inverse.vts[i : i + 1], d, 0),
            )
            eye = ops.eye(d, dtype="float64")
            columns = to_numpy(dense.matvec(eye)).T
            np.testing.assert_allclose(columns, m, atol=1e-8)
            rows = to_numpy(dense.transpose_matvec(eye))
            np.testing.assert_allclose(rows, m, atol=1e-8)
    if memory == 1:
        f = lambda z: ops.matmul(z, a.T) + b  # noqa: E731
        full = solvers.broyden(f, z0, iters, 1e-30, "abs")
        assert np.abs(to_numpy(full.z) - to_numpy(result.z)).max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_a_stopped_row_resumes_when_the_rows_it_reads_move(name):
    """Row 1 copies a tenth of row 0, so it meets an absolute tolerance
    long before row 0 (which still moves by ~10 × tol after row 1 would
    have stopped for good). Every returned row must be within tol of its
    fixed point in the final context: the closed form is z = (1, 0.1)."""
    tol = 1e-6

    def f(z):
        return ops.stack([0.9 * z[:, 0] + 0.1, 0.1 * z[:, 0]], axis=1)[..., 0]

    # Rows are the "samples" of the loop: [2, 1].
    def rows(z):
        return ops.reshape(f(ops.reshape(z, (1, 2, 1))), (2, 1))

    # float64: a compiled loop body (XLA on JAX) may round f differently,
    # by an ulp, from the eager re-evaluation below.
    z0 = ops.zeros((2, 1), "float64")
    result = solvers.get(name)(rows, z0, 300, tol, "abs")
    z = to_numpy(result.z)[:, 0]
    residual = np.abs(to_numpy(rows(result.z))[:, 0] - z)
    assert np.all(residual < tol), (residual, to_numpy(result.nstep))
    np.testing.assert_allclose(
        to_numpy(result.abs_residual), residual, atol=1e-9
    )
    np.testing.assert_allclose(z[1], 0.1 * z[0], atol=tol)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_an_overflowing_iteration_is_never_reported_converged(name, stop_mode):
    # Plain iteration of z ← 2z + 1 doubles |z| every step: after about 60
    # steps ‖f(z)‖ overflows float32 while ‖f(z) − z‖ does not, and a
    # relative residual of finite / inf reads exactly 0. The root solvers
    # find the (repelling) fixed point z = −1, which is a true solution.
    result = solvers.get(name)(
        lambda z: 2.0 * z + 1.0, ops.zeros((2, 3)), 200, 1e-6, stop_mode
    )
    z = to_numpy(result.z)
    fz = 2.0 * z.astype(np.float64) + 1.0
    # Residuals recomputed in float64 from the returned z: the reported ones
    # must be those of z, and a sample under tol must really be a solution.
    abs_res = np.linalg.norm(fz - z, axis=-1)
    rel_res = abs_res / np.linalg.norm(fz, axis=-1)
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(
        to_numpy(result.abs_residual), abs_res, rtol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(result.rel_residual), rel_res, rtol=1e-5, atol=1e-7
    )
    if name == "fixed_point":
        # z_k = 2^k − 1: the relative residual 2^k / (2^(k+1) − 1) > 0.5
        # (0.5 once rounded to float32), far from tol.
        assert np.all(to_numpy(result.rel_residual) >= 0.5)
    else:
        np.testing.assert_allclose(z, -1.0, atol=1e-5)
