"""The iteration every solver shares: residuals, stopping and best iterate.

A solver only says how to propose the next iterate from the current one;
everything a user relies on -- per-sample stopping, frozen converged samples,
the lowest-residual iterate, robustness to non-finite values -- lives here
once, so the three solvers cannot drift apart on it.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

from keras import ops

from keras_deq import backend
from keras_deq.backend import Tensor
from keras_deq.utils import validation
from keras_deq.utils.numerics import norm

STOP_MODES = ("rel", "abs")

# Keeps the relative residual finite when f(z) is exactly zero.
_NORM_EPS = 1e-12


class SolverResult(NamedTuple):
    """What a solver returns; every field is per sample.

    Attributes:
        z: `[B, d]`, each sample's lowest-residual iterate.
        nstep: `[B]` int32, evaluations of f the sample used (including the
            one at `z0`) until it converged, or `max_iter`.
        abs_residual: `[B]`, ‖f(z) − z‖ of the returned `z`.
        rel_residual: `[B]`, ‖f(z) − z‖ / ‖f(z)‖ of the returned `z`.
        inverse: what the solver learned of the Jacobian on its way, or
            `None`: Broyden's estimate of (I − J_f)⁻¹ at its last iterate, a
            `keras_deq.solvers.LowRankInverse`. A backward pass can start
            from it (`DEQLayer(gradient="reuse")`).

    Examples:

        >>> f = lambda z: 0.5 * z + 1.0
        >>> res = keras_deq.solvers.fixed_point(f, tf.zeros([2, 1]), 60, 1e-6)
        >>> res.z.shape, res.nstep.shape, res.rel_residual.shape
        (TensorShape([2, 1]), TensorShape([2]), TensorShape([2]))
    """

    z: Tensor
    nstep: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    inverse: Any = None


def check_solver_args(max_iter: int, tol: float, stop_mode: str) -> None:
    """Raises for settings no solver can honour."""
    validation.check_int("max_iter", max_iter, 1)
    validation.check_positive("tol", tol)
    validation.check_choice("stop_mode", stop_mode, STOP_MODES)


def residuals(z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ‖f(z) − z‖ and ‖f(z) − z‖ / ‖f(z)‖ of `[B, d]` tensors.

    The relative residual is +inf for a sample whose ‖f(z)‖ overflows the
    dtype: an iteration that blew up, which would otherwise read
    finite / inf = 0, converged. (An overflowing ‖z‖ needs no check of its
    own: then ‖f(z) − z‖ overflows too, or f(z) ≈ z and ‖f(z)‖ does.)
    """
    abs_res = norm(fz - z)
    fz_norm = norm(fz)
    rel_res = ops.where(
        ops.isfinite(fz_norm),
        abs_res / (fz_norm + _NORM_EPS),
        ops.convert_to_tensor(float("inf"), abs_res.dtype),
    )
    return abs_res, rel_res


def iterate(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    max_iter: int,
    tol: float,
    stop_mode: str,
    init: Callable[[Tensor, Tensor], Any],
    propose: Callable[[Tensor, Tensor, Any, Tensor], tuple],
    finish: Callable[[Any], Any] | None = None,
) -> SolverResult:
    """Runs a solver in a `keras.ops.while_loop` with per-sample stopping.

    The loop is `tf.while_loop` on TensorFlow and `lax.while_loop` on JAX;
    neither is differentiated through (the gradient kinds attach their own
    backward), so the solve keeps no activations.

    Args:
        f: maps `[B, d]` to `[B, d]`.
        z0: `[B, d]` initial iterate.
        max_iter: the most evaluations of f, counting the one at `z0`.
        tol: a sample stops once its residual (per `stop_mode`) is below it.
        stop_mode: `"rel"` or `"abs"`.
        init: `(z0, f(z0)) -> state`, the solver's own loop state (a nest of
            tensors whose shapes do not change across iterations).
        propose: `(z, f(z), state, active) -> (z_next, state)`. `active` is
            the `[B]` mask of samples still iterating; the driver freezes the
            others whatever is proposed for them, so `propose` only has to
            keep its own state finite for them. A frozen sample may be
            active again later (see below), so its state must stay usable.
        finish: `state -> inverse`, the result's `inverse` from the final
            state. Defaults to `None` (no `inverse`).

    f is evaluated on the whole batch at every step, frozen samples
    included, so their residuals are re-read. For independent samples those
    do not change. Where f couples rows (the positions of a causal sequence
    solved as rows, `DEQLayer(sample_axes=2)`), a stopped row's residual
    rises when the rows it reads move after it stopped; it then iterates
    again, so that the returned rows are within `tol` of their fixed point
    in the final context, not in a context that was left. A sample whose
    residual went non-finite stops for good.

    Returns:
        A `SolverResult`.
    """
    check_solver_args(max_iter, tol, stop_mode)
    z0 = ops.convert_to_tensor(z0)
    tol = ops.convert_to_tensor(tol, z0.dtype)

    def criterion(abs_res, rel_res):
        return rel_res if stop_mode == "rel" else abs_res

    fz0 = f(z0)
    abs0, rel0 = residuals(z0, fz0)
    crit0 = criterion(abs0, rel0)
    finite0 = ops.isfinite(crit0)
    inf = ops.convert_to_tensor(float("inf"), z0.dtype)
    # The best iterate starts as z0 so that every sample always has one, even
    # if f(z0) is not finite; its residual then reads as +inf.
    best = (
        z0,
        ops.where(finite0, abs0, inf),
        ops.where(finite0, rel0, inf),
        ops.where(finite0, crit0, inf),
    )
    failed = ~finite0
    active = finite0 & (crit0 >= tol)
    nstep = ops.ones_like(crit0, dtype="int32")
    state = init(z0, fz0)

    def cond(k, z, fz, state, best, active, failed, nstep):
        return (k < max_iter) & ops.any(active)

    def body(k, z, fz, state, best, active, failed, nstep):
        z_prop, state = propose(z, fz, state, active)
        # f may lose static dimensions that z0 has (a reshape by a
        # computed shape, say); the loop needs them fixed.
        z_new = backend.fix_shape(
            ops.where(active[:, None], z_prop, z), z0.shape
        )
        fz_new = backend.fix_shape(f(z_new), z0.shape)
        abs_res, rel_res = residuals(z_new, fz_new)
        crit = criterion(abs_res, rel_res)
        finite = ops.isfinite(crit)
        best_z, best_abs, best_rel, best_crit = best
        # A stopped sample sits on its best iterate; its residual is
        # re-read, since rows that f couples may have moved its context.
        take = finite & (~active | (crit < best_crit))
        best = (
            ops.where(take[:, None], z_new, best_z),
            ops.where(take, abs_res, best_abs),
            ops.where(take, rel_res, best_rel),
            ops.where(take, crit, best_crit),
        )
        nstep += ops.cast(active, "int32")
        # A sample whose residual went non-finite stops here and is put back
        # on its best iterate, so f never sees the bad values again.
        z_new = ops.where(finite[:, None], z_new, best[0])
        fz_new = ops.where(finite[:, None], fz_new, best[0])
        failed |= ~finite
        active = ~failed & (crit >= tol)
        return k + 1, z_new, fz_new, state, best, active, failed, nstep

    one = ops.convert_to_tensor(1, "int32")
    loop_vars = (one, z0, fz0, state, best, active, failed, nstep)
    _, _, _, state, best, _, _, nstep = ops.while_loop(
        cond, body, loop_vars, maximum_iterations=max_iter - 1
    )
    return SolverResult(
        z=best[0],
        nstep=nstep,
        abs_residual=best[1],
        rel_residual=best[2],
        inverse=None if finish is None else finish(state),
    )
