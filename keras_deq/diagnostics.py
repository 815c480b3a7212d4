"""How a trained DEQ behaves as an equilibrium model, and its test-time budget.

An equilibrium model's output is the fixed point of its block: more solver
iterations at test time should bring it closer, not change its answers.
"""

from collections.abc import Sequence

import keras

from keras_deq.callbacks import find_deq_layers
from keras_deq.layers.deq_layer import DEQLayer


def override_inference(
    model: keras.layers.Layer,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    layers: Sequence[str] | None = None,
) -> list[DEQLayer]:
    """Sets the test-time budget of a model's DEQLayers in one call.

    Calls `DEQLayer.override_inference(max_iter=..., tol=...)` on every
    DEQLayer of `model` (or those named in `layers`) and drops the model's
    traced `predict` and `evaluate` functions, so that the next `predict`,
    `evaluate` or `export` runs with the new budget. No settings clears the
    overrides. Training is not affected.

    Args:
        model: a Keras model (or layer) containing DEQLayers.
        max_iter: forward iterations at test time. Defaults to `None` (each
            layer's own).
        tol: forward tolerance at test time. Defaults to `None` (each
            layer's own).
        layers: names of the DEQLayers to set. Defaults to all of them.

    Returns:
        The DEQLayers that were set.

    Example:

    ```python
    trained = model.evaluate(x, y, return_dict=True)
    keras_deq.diagnostics.override_inference(model, max_iter=4 * 7)
    longer = model.evaluate(x, y, return_dict=True)
    keras_deq.diagnostics.override_inference(model)  # back as trained
    ```
    """
    targets = find_deq_layers(model, layers)
    for layer in targets:
        layer.override_inference(max_iter=max_iter, tol=tol)
    for name in ("predict_function", "test_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    return targets
