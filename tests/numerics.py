"""Independent numerical references shared by the tests."""

import numpy as np


def central_differences(value_fn, variables, eps=1e-6):
    """∂value/∂v for each variable, by central differences, entry by entry.

    `value_fn()` returns a float computed from the current variable values;
    each variable is restored after its entries have been bumped.
    """
    grads = []
    for var in variables:
        value = var.numpy()
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            for sign in (1, -1):
                bumped = value.copy()
                bumped[index] += sign * eps
                var.assign(bumped)
                grad[index] += sign * value_fn() / (2 * eps)
        var.assign(value)
        grads.append(grad)
    return grads
