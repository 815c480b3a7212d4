"""Plain (optionally damped) fixed-point iteration."""

from collections.abc import Callable

from keras_deq.backend import Tensor
from keras_deq.solvers import _loop
from keras_deq.utils import validation


def fixed_point(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    max_iter: int,
    tol: float,
    stop_mode: str = "rel",
    damping: float = 1.0,
) -> _loop.SolverResult:
    """Finds z = f(z) by iterating z ← damping · f(z) + (1 − damping) · z.

    Converges when f is a contraction; memory is O(B·d). Each sample stops on
    its own residual and returns its lowest-residual iterate.

    Args:
        f: maps a `[B, d]` tensor to a `[B, d]` tensor.
        z0: `[B, d]` initial iterate.
        max_iter: most evaluations of f, counting the one at `z0`.
        tol: a sample stops once its residual is below `tol`.
        stop_mode: `"rel"` (‖f(z) − z‖ / ‖f(z)‖) or `"abs"` (‖f(z) − z‖).
            Defaults to `"rel"`.
        damping: step size in (0, 1]. Defaults to `1.0` (undamped).

    Returns:
        A `SolverResult` with per-sample `z`, `nstep`, `abs_residual` and
        `rel_residual`.

    Examples:

        >>> f = lambda z: 0.5 * z + 1.0
        >>> res = fixed_point(f, tf.zeros([2, 3]), 50, 1e-6)
        >>> float(res.z[0, 0])  # doctest: +ELLIPSIS
        1.99999...
    """
    damping = validation.check_range(
        "damping", damping, 0.0, 1.0, low_open=True
    )

    def propose(z, fz, state, active):
        if damping == 1.0:
            return fz, state
        return damping * fz + (1.0 - damping) * z, state

    return _loop.iterate(
        f, z0, max_iter, tol, stop_mode, lambda z, fz: (), propose
    )
