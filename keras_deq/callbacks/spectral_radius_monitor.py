"""Logs ρ(J_f(z*)) at the equilibrium during training."""

from collections.abc import Sequence

import keras
import numpy as np

from keras_deq import backend as _backend
from keras_deq.callbacks.base import _DEQCallback
from keras_deq.utils import validation


class SpectralRadiusMonitor(_DEQCallback):
    """Logs the mean ρ(J_f(z*)) on a held-out batch every few epochs.

    For each DEQLayer it solves for z* on `x` (a batch of *model* inputs)
    and runs `keras_deq.jacobian.spectral_radius` there, writing the mean
    over the batch to the epoch logs as `{layer name}_spectral_radius`.
    Place it before `keras.callbacks.TensorBoard` in the callbacks list so
    that TensorBoard records it (as `epoch_{layer name}_spectral_radius`).

    The model must be functional or `Sequential` (the callback needs each
    DEQLayer's input for `x`).

    Args:
        x: a batch of model inputs (array, tensor or nest of them).
        every: epochs between measurements. Defaults to `1`.
        num_iters: power-method iterations. Defaults to `50`.
        layers: names of the DEQLayers to watch. Defaults to all of them.

    Examples:

        ```python
        monitor = keras_deq.callbacks.SpectralRadiusMonitor(x_val[:64], every=5)
        history = model.fit(x, y, epochs=20, callbacks=[monitor])
        ```
    """

    def __init__(
        self,
        x,
        *,
        every: int = 1,
        num_iters: int = 50,
        layers: Sequence[str] | None = None,
    ):
        super().__init__(layers)
        self.x = keras.tree.map_structure(keras.ops.convert_to_tensor, x)
        self.every = validation.check_int("every", every, 1)
        self.num_iters = validation.check_int("num_iters", num_iters, 2)
        self._functions = {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._functions = {}
        for layer in self.targets():
            try:
                layer_input = layer.input
                inputs = self.model.inputs
            except (AttributeError, ValueError):
                raise ValueError(
                    "SpectralRadiusMonitor needs a functional or Sequential "
                    f"model to find the input of DEQLayer {layer.name!r}; "
                    f"{self.model.name!r} does not expose it. Call "
                    "`layer.spectral_radius(layer_input)` yourself instead."
                ) from None
            encoder = keras.Model(inputs, layer_input)

            def measure(x, layer=layer, encoder=encoder):
                return layer.spectral_radius(
                    encoder(x, training=False), self.num_iters
                )

            self._functions[layer.name] = _backend.function(measure)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or logs is None:
            return
        for layer in self.targets():
            radius = self._functions[layer.name](self.x)
            logs[f"{layer.name}_spectral_radius"] = float(
                np.mean(keras.ops.convert_to_numpy(radius))
            )
