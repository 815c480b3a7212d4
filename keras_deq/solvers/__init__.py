"""Fixed-point solvers on `[B, d]` states, each in a `keras.ops.while_loop`.

Written with `keras.ops`, they run on TensorFlow and on JAX.

Every solver has the signature `solver(f, z0, max_iter, tol, stop_mode="rel",
**options)` and returns a `SolverResult` with per-sample statistics. `get`
looks one up by name; `register` adds a new one.
"""

import inspect
from collections.abc import Callable

from keras_deq.solvers._loop import SolverResult
from keras_deq.solvers.anderson import anderson
from keras_deq.solvers.broyden import LowRankInverse
from keras_deq.solvers.broyden import broyden
from keras_deq.solvers.fixed_point import fixed_point
from keras_deq.utils.registry import Registry

_REGISTRY = Registry(
    "solver",
    "keras_deq.solvers.register",
    {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point},
)


def get(name: str, argument: str = "solver") -> Callable[..., SolverResult]:
    """Returns the solver registered under `name`.

    Args:
        name: `"broyden"`, `"anderson"`, `"fixed_point"` or a name given to
            `register`.
        argument: the argument that gave `name`, for the error. Defaults
            to `"solver"`.

    Returns:
        The solver function.

    Examples:

        >>> get("anderson").__name__
        'anderson'
    """
    return _REGISTRY.get(name, argument)


def register(name: str, solver: Callable[..., SolverResult]) -> None:
    """Makes `solver` available to `get` and `DEQLayer` under `name`.

    Args:
        name: the new name; it must not be taken already.
        solver: a function `(f, z0, max_iter, tol, stop_mode) -> SolverResult`.

    Examples:

        ```python
        def damped(f, z0, max_iter, tol, stop_mode="rel"):
            return keras_deq.solvers.fixed_point(
                f, z0, max_iter, tol, stop_mode, damping=0.5
            )


        keras_deq.solvers.register("damped", damped)
        layer = keras_deq.DEQLayer(block, solver="damped")
        ```
    """
    if not callable(solver):
        raise TypeError(f"`solver` must be callable. Received: {solver!r}")
    _REGISTRY.add(name, solver)


# The arguments every solver takes; the others are its options.
_COMMON = ("f", "z0", "max_iter", "tol", "stop_mode")


def check_options(argument: str, name: str, options: dict | None) -> dict:
    """Checks `options` against the keyword arguments of solver `name`.

    Args:
        argument: the name of the argument being checked, for the message.
        name: a registered solver name.
        options: a dict of keyword arguments, or `None` (no options).

    Returns:
        A new dict of the options (empty for `None`).

    Raises:
        TypeError: `options` is not a dict, or names an argument the solver
            does not take.
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(
            f"`{argument}` must be a dict of keyword arguments of the "
            f"{name!r} solver. Received: {argument}={options!r}"
        )
    params = inspect.signature(get(name)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    allowed = [p for p in params if p not in _COMMON]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"`{argument}` has arguments the {name!r} solver does not take: "
            f"{unknown}. Its options are {allowed}. "
            f"Received: {argument}={options!r}"
        )
    return dict(options)


def names() -> list[str]:
    """The registered solver names.

    Examples:

        >>> {"anderson", "broyden", "fixed_point"} <= set(names())
        True
    """
    return _REGISTRY.names()


__all__ = [
    "LowRankInverse",
    "SolverResult",
    "anderson",
    "broyden",
    "check_options",
    "fixed_point",
    "get",
    "names",
    "register",
]
