"""The training step the step-time and memory benchmarks both measure."""

import keras
import tensorflow as tf

import keras_deq

# Per mode, the DEQLayer arguments over the step's own. The reuse modes
# start the backward from the forward Broyden's estimate and refine it
# with 0, 2 or 4 iterations.
MODES = {
    "implicit": dict(gradient="implicit"),
    "reuse0": dict(gradient="reuse", backward_max_iter=0),
    "reuse2": dict(gradient="reuse", backward_max_iter=2),
    "reuse4": dict(gradient="reuse", backward_max_iter=4),
    "phantom": dict(gradient="phantom", phantom_steps=1),
    "unrolled": dict(gradient="unrolled"),
}


def make_layer(
    cell, x, mode, solver, iters, jacobian=False, solver_options=None, **extra
):
    """The benchmarks' DEQLayer: exactly `iters` forward evaluations (a
    tolerance that never triggers), and as many backward iterations unless
    the mode or `extra` says otherwise."""
    settings = dict(
        solver=solver,
        solver_options=solver_options,
        max_iter=iters,
        tol=1e-30,
        backward_max_iter=iters,
        backward_tol=1e-30,
        jac_weight=1.0 if jacobian else 0.0,
        jac_freq=1.0,
        jac_samples=1,
    )
    layer = keras_deq.DEQLayer(cell, **{**settings, **MODES[mode], **extra})
    layer.build(x.shape)
    return layer


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
