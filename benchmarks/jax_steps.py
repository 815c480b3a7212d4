"""Compiled calls of a Keras layer or model on the JAX backend.

What Keras' JAX trainer does in `fit`, without its bookkeeping: the
layer's `stateless_call` under `jax.jit`, its variables passed in and
handed back, so that a benchmark times the step and nothing around it.
"""

import jax
import keras
from keras import ops


class TrainStep:
    """One SGD step on `loss(layer(inputs, training=True))` plus the
    layer's own losses (the Jacobian penalty, the correction), compiled.

    Calling it runs one step and returns the loss as a float (so the call
    waits for the device). The layer's variables stay in this object
    between steps; `sync()` writes them back to the layer.

    Args:
        layer: a built `keras.layers.Layer` or `keras.Model`.
        inputs: its inputs (a JAX array or a structure of them).
        loss: maps the layer's output to a scalar.
        learning_rate: SGD's. Defaults to `1e-6` (the weights barely move,
            so repeated steps do the same work).
    """

    def __init__(self, layer, inputs, loss, learning_rate=1e-6):
        self.layer = layer
        self.inputs = inputs
        self.optimizer = keras.optimizers.SGD(learning_rate)
        self.optimizer.build(layer.trainable_variables)

        def loss_of(trainable, non_trainable, inputs):
            out, non_trainable, losses = layer.stateless_call(
                trainable,
                non_trainable,
                inputs,
                training=True,
                return_losses=True,
            )
            value = loss(out)
            for extra in losses:
                value = value + ops.cast(extra, value.dtype)
            return value, non_trainable

        grad = jax.value_and_grad(loss_of, has_aux=True)

        def step(state, inputs):
            trainable, non_trainable, slots = state
            (value, non_trainable), grads = grad(
                trainable, non_trainable, inputs
            )
            trainable, slots = self.optimizer.stateless_apply(
                slots, grads, trainable
            )
            return value, (trainable, non_trainable, slots)

        self._step = jax.jit(step)
        self.state = (
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
            [v.value for v in self.optimizer.variables],
        )

    def __call__(self) -> float:
        value, self.state = self._step(self.state, self.inputs)
        return float(value)

    def sync(self) -> None:
        """Writes the stepped variables back into the layer."""
        trainable, non_trainable, _ = self.state
        for variable, value in zip(
            self.layer.trainable_variables, trainable, strict=True
        ):
            variable.assign(value)
        for variable, value in zip(
            self.layer.non_trainable_variables, non_trainable, strict=True
        ):
            variable.assign(value)


def inference(layer):
    """`layer(inputs, training=False)` compiled; returns the output, ready."""
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    call = jax.jit(
        lambda t, n, inputs: layer.stateless_call(t, n, inputs, training=False)[
            0
        ]
    )

    def run(inputs):
        return jax.block_until_ready(call(trainable, non_trainable, inputs))

    return run
