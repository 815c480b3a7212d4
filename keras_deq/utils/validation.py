"""Argument checks whose messages name the argument, the value and the rule."""

import numbers


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value}"
        )
    return int(value)


def _check_number(name: str, value, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {rule}. Received: {name}={value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    value = _check_number(name, value, "a number > 0")
    if not value > 0:
        raise ValueError(
            f"`{name}` must be a number > 0. Received: {name}={value}"
        )
    return value


def check_nonnegative(name: str, value) -> float:
    value = _check_number(name, value, "a finite number >= 0")
    if not 0 <= value < float("inf"):
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={value}"
        )
    return value


def check_range(
    name: str, value, low: float, high: float, low_open: bool = False
) -> float:
    """Checks low <= value <= high (low < value when `low_open`)."""
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    value = _check_number(name, value, f"a number in {interval}")
    if value > high or value < low or (low_open and value == low):
        raise ValueError(
            f"`{name}` must be in {interval}. Received: {name}={value}"
        )
    return value


def check_choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {list(allowed)}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return value
