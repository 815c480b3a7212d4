"""A run resumed by `BackupAndRestore` ends where an uninterrupted one does."""

import keras
import numpy as np
import pytest

import keras_deq

D = 6


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class DropoutCell(keras.layers.Layer):
    """tanh(z W + x) with a variational dropout mask on z W."""

    def build(self, z_shape, x_shape):
        self.dense = keras.layers.Dense(
            D,
            kernel_initializer=keras.initializers.Orthogonal(0.5, seed=1),
            use_bias=False,
        )
        self.dropout = keras_deq.layers.VariationalDropout(0.3, seed=2)

    def call(self, z, x, training=None):
        return keras.ops.tanh(
            self.dropout(self.dense(z), training=training) + x
        )


def build(jac_freq):
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(
                D, kernel_initializer=keras.initializers.GlorotUniform(3)
            ),
            keras_deq.DEQLayer(
                DropoutCell(),
                jac_weight=0.5,
                jac_freq=jac_freq,
                random_start=0.5,
                seed=4,
            ),
            keras.layers.Dense(
                1, kernel_initializer=keras.initializers.GlorotUniform(5)
            ),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("jac_freq", [0.5, 1.0])
def test_resume_with_penalty_dropout_and_random_starts_is_bit_identical(
    jac_freq, tmp_path
):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, D)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    fit = dict(batch_size=8, epochs=4, shuffle=False, verbose=0)

    straight = build(jac_freq)
    straight.fit(x, y, **fit)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = build(jac_freq)
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(x, y, callbacks=[backup, Interrupt()], **fit)
    resumed = build(jac_freq)
    history = resumed.fit(x, y, callbacks=[backup], **fit).history
    assert len(history["loss"]) == 2  # epochs 3 and 4 only

    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)
    # The draws after the resume are the uninterrupted run's.
    deq, deq_straight = resumed.layers[1], straight.layers[1]
    for layer, reference in [
        (deq.jacobian_penalty, deq_straight.jacobian_penalty),
        (deq.block.dropout, deq_straight.block.dropout),
    ]:
        np.testing.assert_array_equal(
            layer.seed_generator.state.numpy(),
            reference.seed_generator.state.numpy(),
        )
    np.testing.assert_array_equal(
        deq._start_seed_generator.state.numpy(),
        deq_straight._start_seed_generator.state.numpy(),
    )
