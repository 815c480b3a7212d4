"""Backward passes through a fixed point, and the gradient kinds that use them.

The functions `implicit`, `phantom` and `unrolled` take `f`, mapping a
`[B, d]` state to `[B, d]` (the DEQ block with its input injection bound),
and return the DEQ output with the gradient of their kind attached.
Gradients reach the variables f reads and any tensor f closes over, such as
the injected input.

A gradient kind is an object that owns its settings and is called once per
`DEQLayer` call, `kind(problem) -> (z, forward)`:

- `problem` is a `Problem`: the block `f` and first iterate `z0` of one
  `DEQLayer` call, per sample, a `solve()` that runs the layer's forward
  solver (unrecorded) when the kind wants z*, the forward solver and its
  budget;
- `z` is the `[B, d]` output, carrying the kind's gradient;
- `forward` is a `SolverResult` for the layer's statistics and its Jacobian
  penalty: `z` the equilibrium without gradient, `nstep` and
  `rel_residual` per solved row.

The built-in kinds are `Implicit`, `Reuse`, `Phantom` and `Unrolled`.
`DEQLayer(gradient=...)` takes one of them, or a name: `"implicit"`,
`"reuse"`, `"phantom"`, `"unrolled"` (built from the layer's `backward_*`
and `phantom_*` arguments) or one given to `register`.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import keras
from keras import ops

from keras_deq import backend as _backend
from keras_deq import jacobian
from keras_deq import solvers
from keras_deq.backend import Tensor
from keras_deq.solvers import LowRankInverse
from keras_deq.solvers import SolverResult
from keras_deq.solvers import _loop
from keras_deq.utils import validation
from keras_deq.utils.numerics import norm
from keras_deq.utils.registry import Registry


class Problem(NamedTuple):
    """What a gradient kind gets from one `DEQLayer` call.

    It holds the call, not settings of any kind: those are the kind's own.

    Attributes:
        f: the block, mapping a `[B, d]` state to `[B, d]`, one row per
            sample (with the block's per-solve noise held fixed).
        z0: `[B, d]` first iterate (the block's initial state, or a warm
            start), without gradient.
        solve: `solve()` runs the layer's forward solver from `z0`
            (unrecorded, with the layer's solver, iterations, tolerance and
            `sample_axes`) and returns its `SolverResult`, `z` per sample
            as `[B, d]`. Call it at most once.
        solver: the layer's forward solver, its options bound:
            `solver(g, z0, max_iter, tol, stop_mode)` (the default solver of
            a kind's own solves).
        max_iter: the call's forward iterations (the default budget of a
            kind that iterates itself, e.g. the unrolled steps).
        on_backward: called with the `SolverResult` of a backward solve to
            record the backward statistics, or `None` (not recorded).
        to_rows: maps a `[B, d]` per-sample vector to the rows the forward
            solved (identity unless `sample_axes` > 1), as `solve()`'s
            `inverse` expects them.
        from_rows: the inverse map of `to_rows`.

    Examples:

        A kind reads the call from the `Problem` and its settings from
        itself, here the implicit gradient with a budget of its own:

        ```python
        class ShortImplicit(keras_deq.gradients.GradientKind):
            backward_statistics = True

            def __call__(self, problem):
                forward = problem.solve()
                z = keras_deq.gradients.implicit(
                    problem.f, forward.z, problem.solver, 5, 1e-3,
                    problem.on_backward,
                )
                return z, forward
        ```
    """

    f: Callable[[Tensor], Tensor]
    z0: Tensor
    solve: Callable[[], SolverResult]
    solver: Callable[..., SolverResult]
    max_iter: int
    on_backward: Callable[[SolverResult], None] | None
    to_rows: Callable[[Tensor], Tensor] = lambda v: v  # noqa: E731
    from_rows: Callable[[Tensor], Tensor] = lambda v: v  # noqa: E731


class GradientKind:
    """A backward through the fixed point, with the settings it owns.

    Subclasses set their settings in `__init__`, return them from
    `get_config` (so that a `DEQLayer` using the kind saves it in its
    config; register the class with
    `keras.saving.register_keras_serializable` to load it), and implement
    `__call__(problem) -> (z, forward)` (see the module docstring).

    Attributes:
        backward_statistics: whether the kind reports backward solves
            through `problem.on_backward`; a `DEQLayer` using it then
            tracks the `backward_nfe` and `backward_residual` metrics.

    Examples:

        Three damped phantom steps, with their damping as the kind's own
        setting:

        ```python
        class DampedPhantom(keras_deq.gradients.GradientKind):
            def __init__(self, tau=0.5):
                self.tau = tau

            def __call__(self, problem):
                forward = problem.solve()
                z = keras_deq.gradients.phantom(
                    problem.f, forward.z, 3, self.tau
                )
                return z, forward

            def get_config(self):
                return {"tau": self.tau}

        layer = keras_deq.DEQLayer(block, gradient=DampedPhantom(0.8))
        ```
    """

    backward_statistics = False

    def __call__(self, problem: Problem) -> tuple[Tensor, SolverResult]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement __call__(problem)."
        )

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __eq__(self, other):
        return type(other) is type(self) and (
            other.get_config() == self.get_config()
        )

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({settings})"


@keras.saving.register_keras_serializable(package="keras_deq")
class Implicit(GradientKind):
    """The implicit function theorem's gradient: a linear solve at z*.

    See `implicit`. Memory is constant in the forward's iterations.

    Args:
        solver: solver of the backward's linear fixed point, a name of
            `keras_deq.solvers`. Defaults to `None` (the layer's forward
            solver, with its options).
        max_iter: most vector-Jacobian products, `0` or more (`0`: the
            incoming gradient itself, Jacobian-free backpropagation).
            Defaults to `None` (the call's forward `max_iter`).
        tol: tolerance on the residual relative to ‖∂ℓ/∂z*‖, per sample.
            Defaults to `1e-4`.
        solver_options: keyword arguments of `solver`. Defaults to `None`.

    Examples:

        >>> kind = Implicit(solver="anderson", max_iter=12)
        >>> kind.solver, kind.max_iter, kind.tol
        ('anderson', 12, 0.0001)
    """

    backward_statistics = True

    def __init__(
        self,
        solver: str | None = None,
        max_iter: int | None = None,
        tol: float = 1e-4,
        solver_options: dict | None = None,
    ):
        if solver is not None:
            solvers.get(solver, "solver")
            solvers.check_options("solver_options", solver, solver_options)
        elif solver_options is not None:
            raise ValueError(
                "`solver_options` needs a `solver` to apply to (without one "
                "the backward takes the forward's solver and options). "
                f"Received: solver=None, solver_options={solver_options!r}"
            )
        if max_iter is not None:
            validation.check_int("max_iter", max_iter, 0)
        self.solver = solver
        self.max_iter = max_iter
        self.tol = validation.check_positive("tol", tol)
        self.solver_options = (
            None if solver_options is None else dict(solver_options)
        )

    def __call__(self, problem: Problem) -> tuple[Tensor, SolverResult]:
        forward = problem.solve()
        z = implicit(
            problem.f,
            forward.z,
            self._solver(problem),
            problem.max_iter if self.max_iter is None else self.max_iter,
            self.tol,
            problem.on_backward,
            initial=self._initial(problem, forward),
        )
        return z, forward

    def _solver(self, problem):
        if self.solver is None:
            return problem.solver
        return functools.partial(
            solvers.get(self.solver), **(self.solver_options or {})
        )

    def _initial(self, problem, forward):
        """The backward's first iterate as a function of the unit-norm
        incoming gradient, or `None` (the gradient itself)."""
        return None

    def get_config(self) -> dict:
        return {
            "solver": self.solver,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "solver_options": self.solver_options,
        }


@keras.saving.register_keras_serializable(package="keras_deq")
class Reuse(Implicit):
    """The implicit gradient started from the forward Broyden solve's
    estimate of (I − J)⁻ᵀ (SHINE), refined by at most `max_iter`
    iterations (`0`: the estimate alone).

    It needs `solver="broyden"` in the layer, and keeps the forward's
    history until the backward. Arguments as `Implicit`.

    Examples:

        >>> Reuse(max_iter=0).max_iter  # the forward's estimate alone
        0
    """

    def _initial(self, problem, forward):
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


@keras.saving.register_keras_serializable(package="keras_deq")
class Phantom(GradientKind):
    """`steps` damped steps from z*, backpropagated (see `phantom`): no
    linear solve; with one undamped step, Jacobian-free backpropagation.

    Args:
        steps: number of steps, at least 1. Defaults to `1`.
        tau: damping τ in (0, 1]. Defaults to `1.0`.

    Examples:

        >>> Phantom(steps=3, tau=0.8)
        Phantom(steps=3, tau=0.8)
    """

    def __init__(self, steps: int = 1, tau: float = 1.0):
        self.steps = validation.check_int("steps", steps, 1)
        validation.check_range("tau", tau, 0, 1, low_open=True)
        self.tau = float(tau)

    def __call__(self, problem: Problem) -> tuple[Tensor, SolverResult]:
        forward = problem.solve()
        return phantom(problem.f, forward.z, self.steps, self.tau), forward

    def get_config(self) -> dict:
        return {"steps": self.steps, "tau": self.tau}


@keras.saving.register_keras_serializable(package="keras_deq")
class Unrolled(GradientKind):
    """Backpropagation through `steps` plain iterations from the first
    iterate (see `unrolled`); memory grows with `steps`.

    Args:
        steps: iterations, at least 1. Defaults to `None` (the call's
            forward `max_iter`).

    Examples:

        >>> Unrolled(steps=5).get_config()
        {'steps': 5}
    """

    def __init__(self, steps: int | None = None):
        if steps is not None:
            validation.check_int("steps", steps, 1)
        self.steps = steps

    def __call__(self, problem: Problem) -> tuple[Tensor, SolverResult]:
        steps = problem.max_iter if self.steps is None else self.steps
        z, previous = unrolled(problem.f, problem.z0, steps)
        abs_res, rel_res = _loop.residuals(previous, z)
        nstep = ops.full(ops.shape(rel_res), steps, "int32")
        forward = SolverResult(ops.stop_gradient(z), nstep, abs_res, rel_res)
        return z, forward

    def get_config(self) -> dict:
        return {"steps": self.steps}


class _Function(GradientKind):
    """A registered function `Problem -> (z, forward)` as a kind."""

    # Two registered functions are the same kind only if they are one.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, function, backward_statistics):
        self.function = function
        self.backward_statistics = backward_statistics

    def __repr__(self):
        return f"{type(self).__name__}({self.function!r})"

    def __call__(self, problem: Problem) -> tuple[Tensor, SolverResult]:
        return self.function(problem)


class LayerSettings(NamedTuple):
    """The `DEQLayer` arguments a kind named by a string is built from.

    Examples:

        >>> get("implicit", LayerSettings(backward_max_iter=4)).max_iter
        4
    """

    backward_solver: str | None = None
    backward_max_iter: int | None = None
    backward_tol: float = 1e-4
    backward_solver_options: dict | None = None
    phantom_steps: int = 1
    phantom_tau: float = 1.0


def _implicit_from(settings: LayerSettings, kind=Implicit) -> Implicit:
    return kind(
        settings.backward_solver,
        settings.backward_max_iter,
        settings.backward_tol,
        settings.backward_solver_options,
    )


# Name -> a function of the layer's settings that builds the kind.
_REGISTRY = Registry(
    "gradient kind",
    "keras_deq.gradients.register",
    {
        "implicit": _implicit_from,
        "phantom": lambda s: Phantom(s.phantom_steps, s.phantom_tau),
        "reuse": functools.partial(_implicit_from, kind=Reuse),
        "unrolled": lambda s: Unrolled(),
    },
)


def get(
    gradient,
    settings: LayerSettings | None = None,
    argument: str = "gradient",
) -> GradientKind:
    """The gradient kind that `gradient` names.

    Args:
        gradient: a `GradientKind` (returned as it is), its serialized
            config (a dict, as `DEQLayer.get_config` saves it), or a name:
            `"implicit"`, `"reuse"`, `"phantom"`, `"unrolled"` or one given
            to `register`.
        settings: the `LayerSettings` a named built-in kind is made with.
            Defaults to `None` (`LayerSettings()`, the layer's defaults).
        argument: the argument's name, for the error.

    Returns:
        The kind, `kind(problem) -> (z, forward SolverResult)`.

    Raises:
        ValueError: an unknown name, naming `argument`.

    Examples:

        >>> get("phantom", LayerSettings(phantom_steps=3))
        Phantom(steps=3, tau=1.0)
    """
    if isinstance(gradient, dict):
        gradient = keras.saving.deserialize_keras_object(gradient)
    if isinstance(gradient, GradientKind):
        return gradient
    if isinstance(gradient, str) or not callable(gradient):
        build = _REGISTRY.get(gradient, argument)
        return build(LayerSettings() if settings is None else settings)
    raise TypeError(
        f"`{argument}` must be a gradient kind's name or a "
        "keras_deq.gradients.GradientKind (register a function with "
        f"keras_deq.gradients.register). Received: {argument}={gradient!r}"
    )


def reports_backward(gradient) -> bool:
    """Whether `gradient` (a name or kind) records backward statistics."""
    return get(gradient).backward_statistics


def check(argument: str, gradient):
    """Checks `gradient` as `get` does (the error names `argument`); returns
    it as given, or as a `GradientKind` if it was a serialized one."""
    kind = get(gradient, argument=argument)
    return kind if isinstance(gradient, dict) else gradient


def serialize(gradient):
    """A name as it is; a kind as its Keras config."""
    if isinstance(gradient, str):
        return gradient
    return keras.saving.serialize_keras_object(gradient)


def register(name: str, kind, *, backward_statistics: bool = False) -> None:
    """Makes `kind` available to `get` and `DEQLayer(gradient=name)`.

    Args:
        name: the new name; it must not be taken already.
        kind: a `GradientKind`, or a function `Problem -> (z, forward)`:
            `z` the `[B, d]` output carrying the gradient, `forward` a
            `SolverResult` whose `z` is the equilibrium without gradient
            (see the module docstring).
        backward_statistics: for a function, whether it reports backward
            solves through `problem.on_backward`; a `DEQLayer` using it then
            tracks the `backward_nfe` and `backward_residual` metrics. A
            `GradientKind` says so itself. Defaults to `False`.

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
    if not isinstance(kind, GradientKind):
        if not callable(kind):
            raise TypeError(
                f"`kind` must be a GradientKind or callable. Received: "
                f"kind={kind!r}"
            )
        kind = _Function(kind, bool(backward_statistics))
    _REGISTRY.add(name, lambda settings: kind)


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
