"""Broyden's ("good") quasi-Newton method on g(z) = f(z) − z."""

from collections.abc import Callable
from typing import NamedTuple

import ml_dtypes
from keras import backend as keras_backend
from keras import ops

from keras_deq import backend
from keras_deq.backend import Tensor
from keras_deq.solvers import _loop
from keras_deq.utils import validation
from keras_deq.utils.numerics import norm


class LowRankInverse(NamedTuple):
    """Broyden's estimate of (I − J_f)⁻¹, per sample: I − Σ_i u_i v_iᵀ.

    Broyden's B ≈ J_g⁻¹ for g(z) = f(z) − z is −I + Σ u_i v_iᵀ, and
    (I − J_f)⁻¹ = −J_g⁻¹. The estimate is exact on the directions the
    solve explored (each step's secant condition) and the identity
    elsewhere.

    Attributes:
        us: `[B, slots, d]`, the u_i (zero in unused slots).
        vts: `[B, slots, d]`, the v_i.
    """

    us: Tensor
    vts: Tensor

    def matvec(self, v: Tensor) -> Tensor:
        """(I − J_f)⁻¹ v for `[B, d]` v."""
        return v - _combine(_matvec(self.vts, v), self.us)

    def transpose_matvec(self, g: Tensor) -> Tensor:
        """(I − J_f)⁻ᵀ g for `[B, d]` g: the implicit backward's solution."""
        return g - _combine(_matvec(self.us, g), self.vts)


def _matvec(vectors: Tensor, v: Tensor) -> Tensor:
    """`[B, slots]` inner products of each sample's vectors with its v."""
    return ops.matmul(vectors, v[:, :, None])[:, :, 0]


def _combine(coefficients: Tensor, vectors: Tensor) -> Tensor:
    """`[B, d]` Σ_i c_i vectors_i per sample."""
    return ops.matmul(coefficients[:, None, :], vectors)[:, 0]


def broyden(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    max_iter: int,
    tol: float,
    stop_mode: str = "rel",
    memory: int | None = None,
) -> _loop.SolverResult:
    """Finds z = f(z) with Broyden's method, each sample on its own.

    Keeps an estimate B ≈ J_g⁻¹ of the inverse Jacobian of g(z) = f(z) − z,
    starting from B₀ = −I (so the first step is a plain fixed-point step) and
    refining it with the "good" Broyden rank-one update after every step;
    the step is z ← z − B g(z). Unlike plain iteration it also converges when
    f is not a contraction (e.g. a linear f with spectral radius above 1).

    B is stored as rank-one factors, one pair per step taken, in a buffer
    of 2 · B · d · min(memory, max_iter − 2) floats that steps write in place
    (for a batch of 32 states of 32×32×64, `max_iter=30` and no `memory`,
    about 470 MB in float32). With `memory` set, the buffer holds the latest
    `memory` pairs and each new pair replaces the oldest (limited-memory
    Broyden, as in the original DEQ code's ring buffer), so memory stops
    growing with `max_iter`; on hard problems (ρ(J) near 1) it costs
    accuracy, since the dropped pairs held curvature the later steps need.
    Each step reads the history four times (products with U, Uᵀ, V and
    Vᵀ), so its cost beyond f is proportional to the buffer as well.

    Args:
        f: maps a `[B, d]` tensor to a `[B, d]` tensor.
        z0: `[B, d]` initial iterate.
        max_iter: most evaluations of f, counting the one at `z0`.
        tol: a sample stops once its residual is below `tol`.
        stop_mode: `"rel"` (‖f(z) − z‖ / ‖f(z)‖) or `"abs"` (‖f(z) − z‖).
            Defaults to `"rel"`.
        memory: most rank-one pairs kept, a positive int. Defaults to `None`
            (all of them: `max_iter − 2`, exact Broyden).

    Returns:
        A `SolverResult` with per-sample `z`, `nstep`, `abs_residual` and
        `rel_residual`, and as `inverse` the final estimate of (I − J_f)⁻¹,
        a `LowRankInverse` (the history buffer, with the last step's pair).

    Examples:

        >>> a = tf.constant([[1.5, 0.0], [0.0, 0.5]])
        >>> res = broyden(lambda z: z @ a + 1.0, tf.zeros([1, 2]), 20, 1e-6)
        >>> [round(float(v), 4) for v in res.z[0]]
        [-2.0, 2.0]

    Reference:
        Broyden, "A class of methods for solving nonlinear simultaneous
        equations", Mathematics of Computation, 1965.
    """
    _loop.check_solver_args(max_iter, tol, stop_mode)
    # Proposals after the first add one pair each: max_iter − 2 in all.
    slots = max(max_iter - 2, 1)
    if memory is not None:
        slots = min(validation.check_int("memory", memory, 1), slots)

    def init(z0, fz0):
        # History 0 holds the u_i, history 1 the v_i. The pair a step makes
        # is written by the next step, before it reads the history: every
        # read then sees the buffer the last write left, so the write can
        # reuse the buffer (in a graph and under XLA alike).
        hist = backend.new_history(z0, 2, slots)
        zero = ops.convert_to_tensor(0, "int32")
        pending = (ops.zeros_like(z0), ops.zeros_like(z0), zero)
        return (hist, pending, zero, z0, fz0 - z0)

    def propose(z, fz, state, active):
        hist, pending, step, z_prev, g_prev = state
        u_prev, vt_prev, slot_prev = pending
        # After `fz`, which comes after every read of the previous step.
        hist = backend.write_history(
            hist, slot_prev, [u_prev, vt_prev], after=[fz]
        )
        us, vts = hist[0], hist[1]
        g = fz - z
        dz = z - z_prev
        dg = g - g_prev
        # B g and vᵀ = dzᵀ B with B = −I + Σ u_i v_iᵀ; zero slots add nothing.
        vg = _matvec(vts, g)
        bg = -g + _combine(vg, us)
        vt = -dz + _combine(_matvec(us, dz), vts)
        # The last step was dz = −B g_prev, so B dg = B g + dz and the
        # good-Broyden u = (dz − B dg) / (dzᵀ B dg) is −B g / (vᵀ dg).
        denom = ops.sum(vt * dg, axis=-1)
        scale = norm(vt) * norm(dg)
        dtype = keras_backend.standardize_dtype(z.dtype)
        eps = ops.convert_to_tensor(ml_dtypes.finfo(dtype).eps, dtype)
        ok = (
            active
            & (step > 0)
            & ops.isfinite(denom)
            & (ops.abs(denom) > eps * scale)
        )
        safe_denom = ops.where(ok, denom, ops.ones_like(denom))
        u = ops.where(ok[:, None], -bg / safe_denom[:, None], ops.zeros_like(g))
        vt = ops.where(ok[:, None], vt, ops.zeros_like(g))
        # The new pair will take the oldest slot (empty until the history is
        # full), whose pair leaves B.
        slot = (step - 1) % slots
        old_u = us[:, slot]
        old_vg = vg[:, slot]
        # The updated B applied to g, without another pass over the history.
        bg_new = (
            bg
            + u * ops.sum(vt * g, axis=-1, keepdims=True)
            - old_u * old_vg[:, None]
        )
        return z - bg_new, (hist, (u, vt, slot), step + 1, z, g)

    def finish(state):
        # The last step's pair is still pending; B includes it (the step
        # was taken with it), so the estimate does too.
        hist, (u, vt, slot), *_ = state
        hist = backend.write_history(hist, slot, [u, vt], after=[])
        return LowRankInverse(hist[0], hist[1])

    return _loop.iterate(f, z0, max_iter, tol, stop_mode, init, propose, finish)
