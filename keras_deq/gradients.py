"""Backward passes through a fixed point, and the registry of gradient kinds.

The functions `implicit`, `phantom` and `unrolled` take `f`, mapping a
`[B, d]` state to `[B, d]` (the DEQ block with its input injection bound),
and return the DEQ output with the gradient of their kind attached.
Gradients reach the variables f reads and any tensor f closes over, such as
the injected input.

`DEQLayer(gradient=name)` looks its kind up here. Every kind has one
signature, `kind(problem) -> (z, forward)`:

- `problem` is a `Problem`: the block `f` and first iterate `z0` of one
  `DEQLayer` call, per sample, a `solve()` that runs the layer's forward
  solver (unrecorded) when the kind wants z*, and the layer's settings;
- `z` is the `[B, d]` output, carrying the kind's gradient;
- `forward` is a `SolverResult` for the layer's statistics and its Jacobian
  penalty: `z` the equilibrium without gradient, `nstep` and
  `rel_residual` per solved row.

`register(name, kind)` adds a kind, which `DEQLayer` then accepts by name
(and saves by name: register it before loading a model that uses it).
"""

from collections.abc import Callable
from typing import NamedTuple

from keras import ops

from keras_deq import backend as _backend
from keras_deq import jacobian
from keras_deq.backend import Tensor
from keras_deq.solvers import LowRankInverse
from keras_deq.solvers import SolverResult
from keras_deq.solvers import _loop
from keras_deq.utils.numerics import norm
from keras_deq.utils.registry import Registry


class Problem(NamedTuple):
    """What a gradient kind gets from one `DEQLayer` call.

    Attributes:
        f: the block, mapping a `[B, d]` state to `[B, d]`, one row per
            sample (with the block's per-solve noise held fixed).
        z0: `[B, d]` first iterate (the block's initial state, or a warm
            start), without gradient.
        solve: `solve()` runs the layer's forward solver from `z0`
            (unrecorded, with the layer's solver, iterations, tolerance and
            `sample_axes`) and returns its `SolverResult`, `z` per sample
            as `[B, d]`. Call it at most once.
        max_iter: the layer's forward iterations (for a kind that iterates
            itself, e.g. the unrolled steps).
        backward_solver: the layer's backward solver, options bound:
            `backward_solver(g, u0, max_iter, tol, stop_mode)`.
        backward_max_iter: most iterations of a backward solve.
        backward_tol: tolerance of a backward solve, relative to ‖∂ℓ/∂z*‖.
        phantom_steps: the layer's `phantom_steps`.
        phantom_tau: the layer's `phantom_tau`.
        on_backward: called with the `SolverResult` of a backward solve to
            record the backward statistics, or `None` (not recorded).
        to_rows: maps a `[B, d]` per-sample vector to the rows the forward
            solved (identity unless `sample_axes` > 1), as `solve()`'s
            `inverse` expects them.
        from_rows: the inverse map of `to_rows`.

    Examples:

        A kind reads the layer's settings from the `Problem`, here the
        implicit gradient with the layer's backward solver and budget:

        ```python
        def my_implicit(problem):
            forward = problem.solve()
            z = keras_deq.gradients.implicit(
                problem.f,
                forward.z,
                problem.backward_solver,
                problem.backward_max_iter,
                problem.backward_tol,
            )
            return z, forward
        ```
    """

    f: Callable[[Tensor], Tensor]
    z0: Tensor
    solve: Callable[[], SolverResult]
    max_iter: int
    backward_solver: Callable[..., SolverResult]
    backward_max_iter: int
    backward_tol: float
    phantom_steps: int
    phantom_tau: float
    on_backward: Callable[[SolverResult], None] | None
    to_rows: Callable[[Tensor], Tensor] = lambda v: v  # noqa: E731
    from_rows: Callable[[Tensor], Tensor] = lambda v: v  # noqa: E731


Kind = Callable[[Problem], tuple[Tensor, SolverResult]]


def _implicit_kind(
    problem: Problem, initial=None
) -> tuple[Tensor, SolverResult]:
    """The implicit backward from z*; `initial` maps the forward's result
    to the backward's first-iterate function (see `implicit`)."""
    forward = problem.solve()
    z = implicit(
        problem.f,
        forward.z,
        problem.backward_solver,
        problem.backward_max_iter,
        problem.backward_tol,
        problem.on_backward,
        initial=None if initial is None else initial(forward),
    )
    return z, forward


def _reuse_kind(problem: Problem) -> tuple[Tensor, SolverResult]:
    def estimate(forward):
        inverse = forward.inverse
        if not isinstance(inverse, LowRankInverse):
            raise ValueError(
                'DEQLayer(gradient="reuse") starts its backward from the '
                "forward solver's inverse-Jacobian estimate, which only "
                'solver="broyden" keeps. Use solver="broyden", or another '
                f"gradient. Received: a forward result with inverse={inverse!r}"
            )
        return lambda g: problem.from_rows(
            inverse.transpose_matvec(problem.to_rows(g))
        )

    return _implicit_kind(problem, estimate)


def _phantom_kind(problem: Problem) -> tuple[Tensor, SolverResult]:
    forward = problem.solve()
    z = phantom(
        problem.f, forward.z, problem.phantom_steps, problem.phantom_tau
    )
    return z, forward


def _unrolled_kind(problem: Problem) -> tuple[Tensor, SolverResult]:
    z, previous = unrolled(problem.f, problem.z0, problem.max_iter)
    abs_res, rel_res = _loop.residuals(previous, z)
    nstep = ops.full(ops.shape(rel_res), problem.max_iter, "int32")
    forward = SolverResult(ops.stop_gradient(z), nstep, abs_res, rel_res)
    return z, forward


class _Entry(NamedTuple):
    kind: Kind
    backward_statistics: bool


_REGISTRY = Registry(
    "gradient kind",
    "keras_deq.gradients.register",
    {
        "implicit": _Entry(_implicit_kind, True),
        "phantom": _Entry(_phantom_kind, False),
        "reuse": _Entry(_reuse_kind, True),
        "unrolled": _Entry(_unrolled_kind, False),
    },
)


def get(name: str) -> Kind:
    """Returns the gradient kind registered under `name`.

    Args:
        name: `"implicit"`, `"reuse"`, `"phantom"`, `"unrolled"` or a name
            given to `register`.

    Returns:
        The kind, a function `Problem -> (z, forward SolverResult)`.

    Examples:

        >>> callable(get("implicit"))
        True
    """
    return _REGISTRY.get(name, "gradient").kind


def reports_backward(name: str) -> bool:
    """Whether kind `name` records backward statistics (`on_backward`)."""
    return _REGISTRY.get(name, "gradient").backward_statistics


def check(argument: str, name: str) -> str:
    """Checks that `name` is a registered kind; the error names `argument`."""
    _REGISTRY.get(name, argument)
    return name


def register(
    name: str, kind: Kind, *, backward_statistics: bool = False
) -> None:
    """Makes `kind` available to `get` and `DEQLayer(gradient=name)`.

    Args:
        name: the new name; it must not be taken already.
        kind: a function `Problem -> (z, forward)`: `z` the `[B, d]` output
            carrying the gradient, `forward` a `SolverResult` whose `z` is
            the equilibrium without gradient (see the module docstring).
        backward_statistics: whether the kind reports backward solves
            through `problem.on_backward`; a `DEQLayer` using it then tracks
            the `backward_nfe` and `backward_residual` metrics. Defaults to
            `False`.

    Examples:

        ```python
        def damped_phantom(problem):
            forward = problem.solve()
            z = keras_deq.gradients.phantom(problem.f, forward.z, 3, 0.5)
            return z, forward

        keras_deq.gradients.register("damped_phantom", damped_phantom)
        layer = keras_deq.DEQLayer(block, gradient="damped_phantom")
        ```
    """
    if not callable(kind):
        raise TypeError(f"`kind` must be callable. Received: kind={kind!r}")
    _REGISTRY.add(name, _Entry(kind, bool(backward_statistics)))


def names() -> list[str]:
    """The registered gradient kinds.

    Examples:

        >>> {"implicit", "phantom", "reuse", "unrolled"} <= set(names())
        True
    """
    return _REGISTRY.names()


def implicit(
    f: Callable[[Tensor], Tensor],
    z_star: Tensor,
    solver: Callable[..., SolverResult],
    max_iter: int,
    tol: float,
    on_backward: Callable[[SolverResult], None] | None = None,
    initial: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
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
        max_iter: most vector-Jacobian products in the backward solve, or 0.
        tol: residual relative to ‖g‖ at which a sample's backward solve
            stops.
        on_backward: called with the backward `SolverResult` (for metrics).
        initial: maps the (unit-norm) incoming gradient to the backward
            solve's first iterate: an estimate of (I − J_f)⁻ᵀ g such as the
            forward's `LowRankInverse.transpose_matvec`. Defaults to `None`
            (g itself). With `max_iter=0` the estimate is the answer: no
            vector-Jacobian product is taken and nothing is reported.

    Returns:
        f(z*), `[B, d]`.

    Examples:

        For f(z) = z/2 + x, z* = 2x and dz*/dx = 1 / (1 − 1/2) = 2:

        >>> from keras_deq.solvers import fixed_point
        >>> x = tf.constant([[1.0]])
        >>> f = lambda z: 0.5 * z + x
        >>> z_star = fixed_point(f, tf.zeros([1, 1]), 60, 1e-7).z  # no tape
        >>> with tf.GradientTape() as tape:
        ...     tape.watch(x)
        ...     g = lambda z: 0.5 * z + x  # f, recorded this time
        ...     z = implicit(g, z_star, fixed_point, 60, 1e-7)
        >>> round(float(tape.gradient(z, x)[0, 0]), 4)
        2.0

    References:
        Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019, §3.1.
        Ramzi et al., "SHINE: SHaring the INverse Estimate from the forward
        pass for bi-level optimization and implicit models", ICLR 2022
        (the `initial` estimate).
    """
    z_out, vjp = jacobian.linearize(f, z_star)

    def backward(vjp, g):
        g = ops.cast(g, z_star.dtype)
        scale = norm(g, keepdims=True)
        g_unit = ops.divide_no_nan(g, scale)
        u0 = g_unit if initial is None else initial(g_unit)
        if max_iter == 0:
            return u0 * scale
        result = solver(lambda u: vjp(u) + g_unit, u0, max_iter, tol, "abs")
        if on_backward is not None:
            on_backward(result._replace(rel_residual=result.abs_residual))
        return result.z * scale

    return _backend.attach_backward(z_out, vjp, backward)


def phantom(
    f: Callable[[Tensor], Tensor],
    z_star: Tensor,
    steps: int = 1,
    tau: float = 1.0,
) -> Tensor:
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

    Examples:

        One undamped step from z* of f(z) = z/2 + x keeps only ∂f/∂x = 1 of the
        exact dz*/dx = 2:

        >>> x = tf.constant([[1.0]])
        >>> z_star = tf.constant([[2.0]])
        >>> with tf.GradientTape() as tape:
        ...     tape.watch(x)
        ...     z = phantom(lambda z: 0.5 * z + x, z_star)
        >>> float(z[0, 0]), float(tape.gradient(z, x)[0, 0])
        (2.0, 1.0)

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
    f: Callable[[Tensor], Tensor], z0: Tensor, steps: int
) -> tuple[Tensor, Tensor]:
    """Applies f `steps` times from z0, differentiably through every step.

    Memory grows with `steps`: this is for pretraining, short unrolls (the
    `MDEQClassifier` default, 7 steps) and checking the other gradients,
    not for long solves.

    Args:
        f: maps `[B, d]` to `[B, d]`.
        z0: `[B, d]` initial state.
        steps: number of applications of f (at least 1).

    Returns:
        `(z_steps, z_{steps-1})`: the last state and the one before it (so
        that ‖z_steps − z_{steps−1}‖ is the residual of the latter).

    Inside a traced function the steps run in one loop (a `tf.while_loop`,
    a `lax.fori_loop`), so f is traced once rather than `steps` times: on
    the MDEQ (7 steps) the first training step, which traces, takes a
    fraction of the time it takes with the steps written out.

    Examples:

        Three steps of f(z) = z/2 + x from 0 give 1, 1.5, 1.75, and
        dz₃/dx = 1 + 1/2 + 1/4:

        >>> x = tf.constant([[1.0]])
        >>> with tf.GradientTape() as tape:
        ...     tape.watch(x)
        ...     z, before = unrolled(lambda z: 0.5 * z + x, tf.zeros([1, 1]), 3)
        >>> dz_dx = tape.gradient(z, x)
        >>> float(z[0, 0]), float(before[0, 0]), float(dz_dx[0, 0])
        (1.75, 1.5, 1.75)
    """
    previous, z = _backend.repeat(
        lambda state: (state[1], f(state[1])), (z0, z0), steps
    )
    return z, previous
