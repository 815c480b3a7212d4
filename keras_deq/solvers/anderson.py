"""Anderson acceleration (type II mixing)."""

from collections.abc import Callable

from keras import ops

from keras_deq import backend
from keras_deq.backend import Tensor
from keras_deq.solvers import _loop
from keras_deq.utils import validation


def anderson(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    max_iter: int,
    tol: float,
    stop_mode: str = "rel",
    m: int = 6,
    lam: float = 1e-4,
    beta: float = 1.0,
) -> _loop.SolverResult:
    """Finds z = f(z) with Anderson acceleration, each sample on its own.

    Keeps the last `m` iterates z_i and values f(z_i) and takes the next
    iterate as Σ α_i (β f(z_i) + (1 − β) z_i), where α minimises
    ‖Σ α_i (f(z_i) − z_i)‖² + lam · ‖α‖² subject to Σ α_i = 1. The Gram
    matrix is updated one row per step and scaled by its largest diagonal
    entry before `lam` is added, so `lam` is relative to the residuals and the
    m×m solve stays well posed; a sample whose solve still fails (a singular
    or non-finite history) takes a plain fixed-point step instead of raising.
    Memory is 2 · m · B · d floats on top of the iterates.

    Args:
        f: maps a `[B, d]` tensor to a `[B, d]` tensor.
        z0: `[B, d]` initial iterate.
        max_iter: most evaluations of f, counting the one at `z0`.
        tol: a sample stops once its residual is below `tol`.
        stop_mode: `"rel"` (‖f(z) − z‖ / ‖f(z)‖) or `"abs"` (‖f(z) − z‖).
            Defaults to `"rel"`.
        m: history length. Defaults to `6`.
        lam: ridge regularisation of the (scaled) least-squares problem.
            Defaults to `1e-4`.
        beta: mixing; 1 takes the combination of f values only. Defaults to
            `1.0`.

    Returns:
        A `SolverResult` with per-sample `z`, `nstep`, `abs_residual` and
        `rel_residual`.

    Examples:

        >>> f = lambda z: 0.9 * tf.cos(z)
        >>> res = anderson(f, tf.zeros([1, 1]), 30, 1e-6)
        >>> round(float(res.z[0, 0]), 4)
        0.6926

    Reference:
        Anderson, "Iterative procedures for nonlinear integral equations",
        Journal of the ACM, 1965; Walker & Ni, "Anderson acceleration for
        fixed-point iterations", SIAM J. Numer. Anal., 2011.
    """
    _loop.check_solver_args(max_iter, tol, stop_mode)
    validation.check_int("m", m, 1)
    lam = validation.check_range("lam", lam, 0.0, float("inf"))
    beta = validation.check_range("beta", beta, 0.0, 1.0, low_open=True)
    slots = ops.arange(m, dtype="int32")

    def init(z0, fz0):
        # History 0 holds the f(z_i), history 1 the residuals f(z_i) − z_i.
        hist = backend.new_history(z0, 2, m)
        gram = ops.zeros((ops.shape(z0)[0], m, m), z0.dtype)
        return (hist, gram, ops.convert_to_tensor(0, "int32"))

    def propose(z, fz, state, active):
        hist, gram, step = state
        g = fz - z
        slot = step % m
        # Every read of the history below depends on this write, and the
        # next write depends (through f) on the iterate those reads give.
        hist = backend.write_history(hist, slot, [fz, g], after=[])
        fs, gs = hist[0], hist[1]
        row = ops.matmul(gs, g[:, :, None])[:, :, 0]
        is_row = (slots == slot)[None, :, None]
        is_col = (slots == slot)[None, None, :]
        gram = ops.where(
            is_row, row[:, None, :], ops.where(is_col, row[:, :, None], gram)
        )

        valid = slots < ops.minimum(step + 1, m)
        both = valid[:, None] & valid[None, :]
        zero = ops.zeros((), z.dtype)
        diag = ops.where(valid[None], ops.diagonal(gram, 0, -2, -1), zero)
        tiny = ops.convert_to_tensor(1e-30, z.dtype)
        scale = ops.maximum(ops.max(diag, axis=-1), tiny)
        eye = ops.eye(m, dtype=z.dtype)
        h = ops.where(both[None], gram / scale[:, None, None] + lam * eye, eye)
        rhs = ops.broadcast_to(
            ops.cast(valid, z.dtype)[None, :, None], (ops.shape(z)[0], m, 1)
        )
        sol = backend.cholesky_solve(h, rhs)[..., 0]
        alpha = sol / ops.sum(sol, axis=-1, keepdims=True)
        ok = ops.all(ops.isfinite(alpha), axis=-1, keepdims=True)
        alpha = ops.where(ok, alpha, ops.one_hot(slot, m, dtype=z.dtype)[None])

        # αᵀ F as a [1, m] × [m, d] product per sample (faster than a
        # transposed matrix-vector product on this layout).
        z_next = ops.matmul(alpha[:, None, :], fs)[:, 0]
        if beta != 1.0:
            z_next -= (1.0 - beta) * ops.matmul(alpha[:, None, :], gs)[:, 0]
        return z_next, (hist, gram, step + 1)

    return _loop.iterate(f, z0, max_iter, tol, stop_mode, init, propose)
