"""The training step the step-time and memory benchmarks both measure."""

import keras
import tensorflow as tf

import keras_deq

MODES = {
    "implicit": dict(gradient="implicit"),
    "phantom": dict(gradient="phantom", phantom_steps=1),
    "unrolled": dict(gradient="unrolled"),
}


def step_function(
    cell, x, mode, solver, iters, jit, jacobian=False, solver_options=None
):
    layer = keras_deq.DEQLayer(
        cell,
        solver=solver,
        solver_options=solver_options,
        max_iter=iters,
        tol=1e-30,
        backward_max_iter=iters,
        backward_tol=1e-30,
        jac_weight=1.0 if jacobian else 0.0,
        jac_freq=1.0,
        jac_samples=1,
        **MODES[mode],
    )
    layer.build(x.shape)
    optimizer = keras.optimizers.SGD(1e-6)
    optimizer.build(layer.trainable_variables)

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x, training=True)))
            loss += tf.add_n(layer.losses)
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply(grads, layer.trainable_variables)
        return loss

    return step
