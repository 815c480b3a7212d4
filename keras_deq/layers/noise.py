"""The protocol of layers that need one random draw per DEQ solve."""

import contextlib
from typing import Any
from typing import Protocol
from typing import runtime_checkable


@runtime_checkable
class PerSolveNoise(Protocol):
    """A layer whose randomness is drawn once per `DEQLayer` call.

    A block must be the same function at every solver iteration, or it has
    no fixed point: a random layer inside it (dropout, a noise injection, a
    stochastic depth) has to hold one draw for all the evaluations of a
    solve. A layer anywhere inside a `DEQLayer`'s block that has these two
    methods gets that treatment. In a training call the `DEQLayer` calls
    `draw_noise` once and evaluates the block -- every forward iteration,
    the evaluation at z* that the backward differentiates and the Jacobian
    penalty -- inside `fixed_noise` with that draw. Outside a `DEQLayer`
    (or at inference) the layer does whatever its `call` does.

    The draw is a separate step from the context (rather than one method
    drawing and holding) because it has to be a tensor the `DEQLayer` can
    hand to its compiled forward solve as an argument: a draw captured
    from the Python context would be frozen into the traced function.

    `keras_deq.layers.VariationalDropout` implements it.

    Examples:

        ```python
        @keras.saving.register_keras_serializable()
        class GaussianNoise(keras.layers.Layer):
            def __init__(self, stddev, **kwargs):
                super().__init__(**kwargs)
                self.stddev = stddev
                self.seed_generator = keras.random.SeedGenerator()
                self._noise = None

            def build(self, shape):
                self.units = shape[-1]

            def draw_noise(self, batch_size):
                return keras.random.normal(
                    (batch_size, self.units), stddev=self.stddev,
                    seed=self.seed_generator,
                )

            @contextlib.contextmanager
            def fixed_noise(self, noise):
                previous, self._noise = self._noise, noise
                try:
                    yield
                finally:
                    self._noise = previous

            def call(self, inputs, training=None):
                if not training:
                    return inputs
                if self._noise is None:
                    return inputs + self.draw_noise(keras.ops.shape(inputs)[0])
                return inputs + self._noise
        ```
    """

    def draw_noise(self, batch_size: Any) -> Any:
        """One draw for a batch of `batch_size` (a scalar tensor).

        Returns a tensor or a nest of tensors, or `None` when the layer
        has no randomness (a dropout rate of 0, say).
        """

    def fixed_noise(self, noise: Any) -> contextlib.AbstractContextManager:
        """A context in which every call of the layer uses `noise`."""


def noisy_layers(layer) -> list:
    """The layers in `layer` (itself included) that implement the protocol."""
    return [
        sub
        for sub in layer._flatten_layers(include_self=True)
        if isinstance(sub, PerSolveNoise)
    ]
