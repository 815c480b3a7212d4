"""Backward passes through a fixed point: implicit, phantom and unrolled.

Each function takes `f`, mapping a `[B, d]` state to `[B, d]` (the DEQ block
with its input injection bound), and returns the DEQ output with the gradient
of the chosen kind attached. Gradients reach the variables f reads and any
tensor f closes over, such as the injected input.
"""

from collections.abc import Callable

import tensorflow as tf
from tensorflow.python.eager import record

from keras_deq import jacobian
from keras_deq.solvers import SolverResult

GRADIENTS = ("implicit", "phantom", "unrolled")


def implicit(
    f: Callable[[tf.Tensor], tf.Tensor],
    z_star: tf.Tensor,
    solver: Callable[..., SolverResult],
    max_iter: int,
    tol: float,
    on_backward: Callable[[SolverResult], None] | None = None,
) -> tf.Tensor:
    """Returns f(z*) whose gradient follows the implicit function theorem.

    With g = ∂ℓ/∂z (the incoming gradient), the backward solves
    uᵀ = uᵀ J_f(z*) + gᵀ with `solver`, using vector-Jacobian products of the
    one evaluation f(z*) made here, and passes u on through that evaluation:
    the variables and inputs of f receive (∂f/∂θ)ᵀ u. Nothing from the forward
    solve is kept, so memory does not depend on its number of iterations.

    Each sample's linear system is solved scaled to ‖g‖ = 1 and scaled back,
    stopping once ‖u − uJ − g‖ / ‖g‖ < `tol` (the absolute residual of the
    scaled system): the rule is relative to ‖∂ℓ/∂z*‖, not to ‖u‖, which is
    larger by up to 1 / (1 − ρ(J)); and a loss multiplied by 1e-8 (or by a
    mixed-precision loss scale) gives gradients scaled the same way. The
    `SolverResult` passed to `on_backward` reports that same ratio as its
    `rel_residual`.

    Args:
        f: maps `[B, d]` to `[B, d]`.
        z_star: `[B, d]` fixed point, with no gradient of its own.
        solver: the backward solver, e.g. `keras_deq.solvers.broyden`.
        max_iter: most vector-Jacobian products in the backward solve.
        tol: residual relative to ‖g‖ at which a sample's backward solve
            stops.
        on_backward: called with the backward `SolverResult` (for metrics).

    Returns:
        f(z*), `[B, d]`.

    Reference:
        Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019, §3.1.
    """
    z_out, vjp = jacobian.linearize(f, z_star)

    @tf.custom_gradient
    def attach(z):
        def grad(g):
            g = tf.cast(g, z_star.dtype)
            scale = tf.norm(g, axis=-1, keepdims=True)
            g_unit = tf.math.divide_no_nan(g, scale)
            # Unrecorded even under an outer tape (a persistent one, or one
            # asking for a gradient of this gradient): see `_first_order`.
            with record.stop_recording():
                result = solver(
                    lambda u: vjp(u) + g_unit, g_unit, max_iter, tol, "abs"
                )
            if on_backward is not None:
                on_backward(result._replace(rel_residual=result.abs_residual))
            return _first_order(tf.cast(result.z * scale, z.dtype), z)

        return tf.identity(z), grad

    return attach(z_out)


@tf.custom_gradient
def _first_order(u, anchor):
    """u, whose own gradient is refused.

    u depends on θ and the inputs through z* and J_f(z*), but the backward
    solve is computed unrecorded, so an outer tape would see a constant and
    return plausible, wrong second derivatives. `anchor` (f(z*), which the
    tapes did record) ties u to θ and the inputs, so that any gradient of u
    reaches this function and is refused.
    """

    def grad(_):
        raise ValueError(
            'DEQLayer(gradient="implicit") gives first-order gradients only; '
            "a gradient of its gradient (a Hessian-vector product, a "
            "gradient penalty on the inputs) is not computed. Use "
            'gradient="unrolled" (backpropagation through the iterations, '
            'exact for that computation) or gradient="phantom" (exact '
            "derivatives of its damped steps from a fixed z*)."
        )

    return tf.identity(u), grad


def phantom(
    f: Callable[[tf.Tensor], tf.Tensor],
    z_star: tf.Tensor,
    steps: int = 1,
    tau: float = 1.0,
) -> tf.Tensor:
    """Returns `steps` damped steps z ← τ f(z) + (1 − τ) z from z*.

    Backpropagation runs through these steps only (no linear solve), which
    approximates the implicit gradient; with `steps=1, tau=1` this is
    Jacobian-free backpropagation.

    Args:
        f: maps `[B, d]` to `[B, d]`.
        z_star: `[B, d]` fixed point, with no gradient of its own.
        steps: number of steps. Defaults to `1`.
        tau: damping in (0, 1]. Defaults to `1.0`.

    Returns:
        The state after the steps, `[B, d]`.

    Reference:
        Geng et al., "On Training Implicit Models", NeurIPS 2021; Fung et al.,
        "JFB: Jacobian-Free Backpropagation for Implicit Networks", AAAI 2022.
    """
    z = z_star
    for _ in range(steps):
        fz = f(z)
        z = fz if tau == 1.0 else tau * fz + (1.0 - tau) * z
    return z


def unrolled(
    f: Callable[[tf.Tensor], tf.Tensor], z0: tf.Tensor, steps: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Applies f `steps` times from z0, differentiably through every step.

    Memory grows with `steps`: this is for pretraining and for checking the
    other gradients, not for long solves.

    Args:
        f: maps `[B, d]` to `[B, d]`.
        z0: `[B, d]` initial state.
        steps: number of applications of f (at least 1).

    Returns:
        `(z_steps, z_{steps-1})`: the last state and the one before it (so
        that ‖z_steps − z_{steps−1}‖ is the residual of the latter).
    """
    previous = z = z0
    for _ in range(steps):
        previous, z = z, f(z)
    return z, previous
