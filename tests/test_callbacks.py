"""γ/p schedules, adaptive γ and the spectral-radius monitor in real fits."""

import glob

import keras
import numpy as np
import pytest

import keras_deq
from keras_deq.callbacks import AdaptiveJacobian
from keras_deq.callbacks import JacobianSchedule
from keras_deq.callbacks import SpectralRadiusMonitor
from tests.any_backend import BACKEND
from tests.any_backend import LinearCell
from tests.any_backend import TanhCell

# On JAX a layer records no statistics inside `fit` (its NFE, residuals and
# penalty are not logged), so AdaptiveJacobian steers by the NFE of the
# training steps on TensorFlow only, and by a probe batch on both.
tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="needs the layer's statistics in fit"
)

D = 8


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, D)).astype("float32"),
        rng.normal(size=(n, 1)).astype("float32"),
    )


def model_with(*deq_layers):
    inputs = keras.Input((D,))
    outputs = [layer(inputs) for layer in deq_layers]
    merged = outputs[0] if len(outputs) == 1 else keras.layers.Add()(outputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(merged))
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


class Recorder(keras.callbacks.Callback):
    """Reads a layer's γ and p back during each batch and each epoch."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.batches = []
        self.epochs = []

    def _read(self):
        # Reading `self.model` brings the trainer's state back into the
        # variables mid-epoch on JAX (Keras' callbacks do the same).
        assert self.model is not None
        return (
            float(self.layer.jac_weight.numpy()),
            float(self.layer.jac_freq.numpy()),
        )

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(self._read())

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(self._read())


def test_schedule_over_epochs_with_stop_epoch():
    layer = keras_deq.DEQLayer(
        LinearCell(trainable_a=False), jac_weight=0.0, name="deq"
    )
    model = model_with(layer)
    recorder = Recorder(layer)
    x, y = data(1024)
    history = model.fit(
        x,
        y,
        batch_size=512,
        epochs=6,
        verbose=0,
        callbacks=[
            JacobianSchedule(1.0, 2.0, epochs=4, stop_epoch=5),
            recorder,
        ],
    ).history
    expected = [1.0, 1.25, 1.5, 1.75, 2.0, 0.0]
    np.testing.assert_allclose([w for w, _ in recorder.epochs], expected)
    np.testing.assert_allclose(history["deq_jac_weight"], expected)
    if BACKEND != "tensorflow":
        return  # the penalty is logged on TensorFlow only
    # The compiled step used each epoch's γ: penalty / γ = ‖A‖²_F / d.
    a = layer.block.a.numpy()
    exact = np.sum(a**2) / D
    penalty = np.array(history["deq_jac_loss"])
    np.testing.assert_allclose(penalty[:5] / expected[:5], exact, rtol=0.1)
    assert np.isnan(penalty[5])  # penalty off: not measured, not 0


def test_a_schedule_trains_as_the_same_values_set_by_hand():
    """Each epoch's γ reaches the compiled step: training under the
    schedule gives the weights of training epoch by epoch with γ set
    before each."""
    x, y = data(64)

    def build():
        keras.utils.set_random_seed(0)
        layer = keras_deq.DEQLayer(
            TanhCell(units=D), jac_weight=0.0, jac_freq=1.0, name="deq"
        )
        model = model_with(layer)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model, layer

    scheduled, _ = build()
    schedule = JacobianSchedule(0.0, 20.0, epochs=2)
    scheduled.fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[schedule],
    )
    by_hand, layer = build()
    for epoch, weight in enumerate([0.0, 10.0, 20.0]):
        layer.jac_weight.assign(weight)
        by_hand.fit(
            x,
            y,
            batch_size=32,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=False,
            verbose=0,
        )
    unpenalized, _ = build()
    unpenalized.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    w = layer.block.w.name
    got = {v.name: v.numpy() for v in scheduled.weights}
    for want in by_hand.weights:
        np.testing.assert_allclose(got[want.name], want.numpy(), atol=1e-5)
    # And γ mattered: without it the block's W trains elsewhere.
    plain = {v.name: v.numpy() for v in unpenalized.weights}
    assert np.abs(plain[w] - got[w]).max() > 1e-3


def test_schedule_over_steps_ramps_gamma_and_p():
    layer = keras_deq.DEQLayer(TanhCell(units=D), jac_weight=5.0, name="deq")
    model = model_with(layer)
    recorder = Recorder(layer)
    x, y = data(64)
    schedule = JacobianSchedule(
        0.0, 1.0, steps=8, freq_start=0.5, freq_end=1.0, layers=["deq"]
    )
    model.fit(
        x, y, batch_size=16, epochs=3, verbose=0, callbacks=[schedule, recorder]
    )
    steps = np.arange(12)
    np.testing.assert_allclose(
        [w for w, _ in recorder.batches], np.minimum(steps / 8, 1.0)
    )
    np.testing.assert_allclose(
        [p for _, p in recorder.batches], 0.5 + 0.5 * np.minimum(steps / 8, 1)
    )


def test_schedule_targets_only_named_layers():
    first = keras_deq.DEQLayer(TanhCell(units=D), jac_weight=0.1, name="one")
    second = keras_deq.DEQLayer(TanhCell(units=D), jac_weight=0.1, name="two")
    model = model_with(first, second)
    x, y = data()
    model.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[JacobianSchedule(3.0, 3.0, epochs=1, layers=["two"])],
    )
    np.testing.assert_allclose(first.jac_weight.numpy(), 0.1)
    np.testing.assert_allclose(second.jac_weight.numpy(), 3.0)


@pytest.mark.parametrize("probe", [False, True])
@pytest.mark.parametrize(
    "target, expected",
    [
        # NFE is always max_iter = 10 (tol never reached): γ rises by 1.5
        # per epoch until max_weight.
        (2.0, [0.15, 0.225, 0.3, 0.3]),
        # Far below the target: γ falls by 1.5 per epoch until min_weight.
        (40.0, [0.1 / 1.5, 0.1 / 2.25, 0.04, 0.04]),
    ],
)
def test_adaptive_gamma_follows_the_forward_nfe(target, expected, probe):
    """By the training steps' NFE (TensorFlow), or a probe's (any)."""
    if not probe and BACKEND != "tensorflow":
        pytest.skip("the layer logs no NFE inside fit on this backend")
    layer = keras_deq.DEQLayer(
        TanhCell(units=D), max_iter=10, tol=1e-12, jac_weight=0.1, name="deq"
    )
    model = model_with(layer)
    x, y = data()
    if probe:
        assert probe_nfe(model, layer, x[:16]) == 10.0
    recorder = Recorder(layer)
    adaptive = AdaptiveJacobian(
        target,
        factor=1.5,
        min_weight=0.04,
        max_weight=0.3,
        probe=x[:16] if probe else None,
    )
    history = model.fit(
        x, y, epochs=4, verbose=0, callbacks=[adaptive, recorder]
    ).history
    np.testing.assert_allclose([w for w, _ in recorder.epochs], expected)
    np.testing.assert_allclose(history["deq_jac_weight"], expected)
    if not probe:
        assert np.all(np.array(history["deq_forward_nfe"]) > 9.5)


def probe_nfe(model, layer, probe):
    """The forward NFE of one training-mode call on `probe`, eagerly."""
    layer.forward_nfe.reset_state()
    model(probe, training=True)
    return float(layer.forward_nfe.result())


@tensorflow_only
@pytest.mark.parametrize(
    "start, target, expected",
    [
        # Below the target γ never rises: from 0 (penalty off) it stays 0.
        (0.0, 40.0, [0.0, 0.0]),
        (0.01, 40.0, [0.01, 0.01]),
        # Above the target, from 0 the first raise sets min_weight.
        (0.0, 2.0, [0.04, 0.06]),
        # Raises stop at max_weight, cuts at min_weight.
        (0.25, 2.0, [0.3, 0.3]),
        (0.05, 40.0, [0.04, 0.04]),
    ],
)
def test_adaptive_gamma_moves_only_with_the_nfe(start, target, expected):
    layer = keras_deq.DEQLayer(
        TanhCell(units=D), max_iter=10, tol=1e-12, jac_weight=start, name="deq"
    )
    model = model_with(layer)
    recorder = Recorder(layer)
    adaptive = AdaptiveJacobian(
        target, factor=1.5, min_weight=0.04, max_weight=0.3
    )
    x, y = data()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[adaptive, recorder])
    np.testing.assert_allclose([w for w, _ in recorder.epochs], expected)


@tensorflow_only
def test_adaptive_gamma_holds_inside_the_band_and_updates_by_batches():
    # A contraction with ρ ≈ 0.3 converges in a few steps at tol 1e-3.
    layer = keras_deq.DEQLayer(
        TanhCell(units=D, w_norm=0.3), jac_weight=0.2, name="deq"
    )
    model = model_with(layer)
    x, y = data()
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    nfe = history["deq_forward_nfe"][0]
    recorder = Recorder(layer)
    # Target just above the NFE, inside the margin: γ must not move.
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[AdaptiveJacobian(nfe + 0.5, margin=1.0), recorder],
    )
    np.testing.assert_allclose([w for w, _ in recorder.epochs], 0.2)
    # Every 2 batches (4 per epoch), target below the NFE: 2 raises/epoch.
    recorder = Recorder(layer)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[
            AdaptiveJacobian(1.0, factor=2.0, update_every=2),
            recorder,
        ],
    )
    np.testing.assert_allclose(
        [w for w, _ in recorder.batches], [0.2, 0.4, 0.4, 0.8]
    )


def test_a_probe_steers_by_the_nfe_it_measures():
    # A contraction with ρ ≈ 0.3 converges in a few steps at tol 1e-3.
    layer = keras_deq.DEQLayer(
        TanhCell(units=D, w_norm=0.3), jac_weight=0.2, name="deq"
    )
    model = model_with(layer)
    x, y = data()
    probe = x[:16]
    nfe = probe_nfe(model, layer, probe)
    assert 2 <= nfe < 10
    recorder = Recorder(layer)
    # Just above the NFE, inside the margin: γ holds.
    model.fit(
        x,
        y,
        epochs=2,
        verbose=0,
        callbacks=[
            AdaptiveJacobian(nfe + 0.5, margin=1.0, probe=probe),
            recorder,
        ],
    )
    np.testing.assert_allclose([w for w, _ in recorder.epochs], 0.2)
    # Just below it: γ rises once per epoch.
    recorder = Recorder(layer)
    model.fit(
        x,
        y,
        epochs=2,
        verbose=0,
        callbacks=[
            AdaptiveJacobian(nfe - 0.5, factor=2.0, probe=probe),
            recorder,
        ],
    )
    np.testing.assert_allclose([w for w, _ in recorder.epochs], [0.4, 0.8])


def test_spectral_radius_monitor_logs_to_history_and_tensorboard(tmp_path):
    layer = keras_deq.DEQLayer(LinearCell(trainable_a=False), name="deq")
    model = model_with(layer)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(D, D)))
    eig = np.r_[0.7, np.linspace(-0.5, 0.5, D - 1)]
    layer.block.a.assign((q * eig) @ q.T)
    x, y = data()
    monitor = SpectralRadiusMonitor(x[:16], every=2, num_iters=60)
    board = keras.callbacks.TensorBoard(str(tmp_path))
    history = model.fit(
        x, y, epochs=4, verbose=0, callbacks=[monitor, board]
    ).history
    np.testing.assert_allclose(history["deq_spectral_radius"], 0.7, rtol=1e-4)
    assert len(history["deq_spectral_radius"]) == 2  # epochs 2 and 4
    import tensorflow as tf  # reads TensorBoard's event files

    values = []
    for path in glob.glob(str(tmp_path / "train" / "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "epoch_deq_spectral_radius":
                    values.append(tf.make_ndarray(value.tensor))
    np.testing.assert_allclose(values, 0.7, rtol=1e-4)
    assert len(values) == 2


def test_callback_errors():
    with pytest.raises(ValueError, match="exactly one of `steps` and `epochs`"):
        JacobianSchedule(1.0, 2.0)
    with pytest.raises(ValueError, match="exactly one of `steps` and `epochs`"):
        JacobianSchedule(1.0, 2.0, steps=3, epochs=3)
    with pytest.raises(ValueError, match="start.*>= 0.*-1"):
        JacobianSchedule(-1, 2.0, epochs=3)
    with pytest.raises(ValueError, match="freq_end.*1.5"):
        JacobianSchedule(1, 2, epochs=3, freq_start=0.5, freq_end=1.5)
    with pytest.raises(TypeError, match="layers"):
        JacobianSchedule(1, 2, epochs=3, layers="deq")
    with pytest.raises(ValueError, match="factor"):
        AdaptiveJacobian(5, factor=1.0, probe=np.zeros((1, D)))
    with pytest.raises(ValueError, match="max_weight"):
        AdaptiveJacobian(5, min_weight=1.0, max_weight=0.5, probe=np.zeros(1))
    if BACKEND != "tensorflow":
        with pytest.raises(ValueError, match=r"keras#21639.*probe=None"):
            AdaptiveJacobian(5)

    x, y = data()
    layer = keras_deq.DEQLayer(TanhCell(units=D), name="deq", jac_freq=0.0)
    model = model_with(layer)
    with pytest.raises(ValueError, match=r"No DEQLayer named \['other'\]"):
        model.fit(
            x,
            y,
            verbose=0,
            callbacks=[JacobianSchedule(1, 2, epochs=1, layers=["other"])],
        )
    if BACKEND == "tensorflow":
        with pytest.raises(ValueError, match="jac_freq is 0"):
            model.fit(x, y, verbose=0, callbacks=[AdaptiveJacobian(5)])
    plain = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="contains no keras_deq.DEQLayer"):
        plain.fit(x, y, verbose=0, callbacks=[JacobianSchedule(1, 2, epochs=1)])


def test_spectral_radius_monitor_needs_layer_inputs():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.deq = keras_deq.DEQLayer(TanhCell(units=D))
            self.head = keras.layers.Dense(1)

        def call(self, x):
            return self.head(self.deq(x))

    model = Subclassed()
    model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    model(x)
    with pytest.raises(ValueError, match="functional or Sequential"):
        model.fit(x, y, verbose=0, callbacks=[SpectralRadiusMonitor(x)])


def test_unrolled_pretraining_trains_as_an_unrolled_layer_then_switches():
    """The first steps equal training a `gradient="unrolled"` layer with
    `max_iter=iters`; the switch follows the optimizer step, so a second
    `fit` resumes in the right phase and then runs the layer as built."""
    x, y = data(48)

    def build(**deq_kwargs):
        keras.utils.set_random_seed(0)
        layer = keras_deq.DEQLayer(TanhCell(units=D), name="deq", **deq_kwargs)
        return model_with(layer), layer

    reference, _ = build(gradient="unrolled", max_iter=2)
    reference.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    model, deq = build(max_iter=10, tol=1e-12)
    seen = []
    configs = []

    def on_batch_end(batch, logs):
        assert record.model is not None  # the state, mid-epoch on JAX
        training = {"gradient": deq.gradient, "max_iter": deq.max_iter}
        training.update(deq.training_overrides)
        seen.append((training["gradient"], training["max_iter"]))
        config = deq.get_config()
        configs.append((config["gradient"], config["max_iter"]))

    record = keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)
    pretraining = keras_deq.callbacks.UnrolledPretraining(4, 2)
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[pretraining, record],
    ).history
    assert seen == [("unrolled", 2)] * 3
    assert configs == [("implicit", 10)] * 3  # checkpoints: as built
    if BACKEND == "tensorflow":
        assert history["deq_forward_nfe"] == [2.0]
    for got, want in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    # Outside fit the layer is as built again.
    assert (deq.gradient, deq.max_iter) == ("implicit", 10)

    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[pretraining, record],
    )
    assert seen[3:] == [("unrolled", 2)] + [("implicit", 10)] * 2
    assert (deq.gradient, deq.max_iter) == ("implicit", 10)


def test_pretraining_leaves_validation_evaluate_and_predict_as_built():
    """Only the train function runs unrolled; the others solve for z*."""
    x, y = data(48)
    keras.utils.set_random_seed(0)
    layer = keras_deq.DEQLayer(
        TanhCell(units=D, w_norm=0.9), max_iter=30, tol=1e-6, name="deq"
    )
    model = model_with(layer)
    pretraining = keras_deq.callbacks.UnrolledPretraining(100, 1)
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        validation_data=(x, y),
        callbacks=[pretraining],
    ).history
    if BACKEND == "tensorflow":
        assert history["deq_forward_nfe"] == [1.0, 1.0]
        assert min(history["val_deq_forward_nfe"]) > 3  # a real solve
    # Predictions equal those of the same weights in a layer that never
    # saw the callback.
    keras.utils.set_random_seed(0)
    fresh = model_with(
        keras_deq.DEQLayer(
            TanhCell(units=D, w_norm=0.9), max_iter=30, tol=1e-6, name="deq"
        )
    )
    fresh.set_weights(model.get_weights())
    np.testing.assert_allclose(
        model.predict(x, verbose=0), fresh.predict(x, verbose=0), atol=1e-6
    )
    if BACKEND == "tensorflow":
        logs = model.evaluate(x, y, verbose=0, return_dict=True)
        assert logs["deq_forward_nfe"] > 3


def test_config_saves_the_current_gamma_and_p():
    layer = keras_deq.DEQLayer(
        TanhCell(units=D), jac_weight=0.1, jac_freq=0.5, name="deq"
    )
    model = model_with(layer)
    x, y = data()
    model.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[JacobianSchedule(2.0, 2.0, epochs=1, freq_start=0.25)],
    )
    config = layer.get_config()
    assert (config["jac_weight"], config["jac_freq"]) == (2.0, 0.25)
    assert keras_deq.DEQLayer.from_config(config).get_config()[
        "jac_weight"
    ] == pytest.approx(2.0)
