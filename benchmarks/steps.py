"""The training step the step-time and memory benchmarks both measure."""

import keras
import tensorflow as tf

from benchmarks.cells import make_layer


def loss_of(layer, x, weights=None):
    """mean(z*²), or mean(z* ⊙ weights), plus the layer's losses (the
    penalty when it is on)."""
    z = layer(x, training=True)
    loss = tf.reduce_mean(tf.square(z) if weights is None else z * weights)
    if layer.losses:
        loss += tf.add_n(layer.losses)
    return loss


def gradient_function(layer, x, weights=None, jit=False):
    """A compiled function returning the gradient of `loss_of` with respect
    to the layer's trainable variables."""

    @tf.function(jit_compile=jit)
    def gradient():
        with tf.GradientTape() as tape:
            loss = loss_of(layer, x, weights)
        return tape.gradient(loss, layer.trainable_variables)

    return gradient


def step_function(
    cell,
    x,
    mode,
    solver,
    iters,
    jit,
    jacobian=False,
    solver_options=None,
    weights=None,
):
    """A compiled SGD step on `loss_of(layer, x, weights)`."""
    layer = make_layer(cell, x, mode, solver, iters, jacobian, solver_options)
    optimizer = keras.optimizers.SGD(1e-6)
    optimizer.build(layer.trainable_variables)

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            loss = loss_of(layer, x, weights)
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply(grads, layer.trainable_variables)
        return loss

    return step
