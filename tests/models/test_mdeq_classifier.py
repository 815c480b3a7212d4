"""MDEQClassifier: structure, serialization, export, pretraining switch."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq.callbacks import AdaptiveJacobian
from keras_deq.models import MDEQClassifier

SMALL = dict(widths=(8, 16), expansion=1, num_groups=4, seed=0)


def images(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, 3)).astype("float32")


def check_table4_solver(deq):
    assert (deq.solver, deq.max_iter, deq.tol) == ("broyden", 7, 1e-3)
    assert (deq.backward_max_iter, deq.backward_tol) == (8, 1e-4)
    wn = [
        layer
        for layer in deq.block._flatten_layers()
        if isinstance(layer, keras_deq.layers.WeightNormalization)
    ]
    # Two per branch; fusion: 10 strided convs down, 6 1×1 convs up.
    assert len(wn) == 4 * 2 + 10 + 6


def init_stddev(deq):
    """The sample standard deviation of the block's first conv kernel."""
    conv = deq.block.branches[0][0].layer
    return float(np.std(conv.kernel.numpy()))


def test_default_model_has_four_resolutions_and_its_documented_defaults():
    model = MDEQClassifier(10, seed=0)
    deq = model.deq
    shapes = [tuple(t.shape) for t in deq.output]
    assert shapes == [
        (None, 32, 32, 28),
        (None, 16, 16, 56),
        (None, 8, 8, 112),
        (None, 4, 4, 224),
    ]
    assert model.output.shape == (None, 10)
    check_table4_solver(deq)
    # The departures from Table 4 (see the class docstring).
    assert deq.gradient == "phantom" and deq.phantom_steps == 3
    assert float(deq.jac_weight.numpy()) == 1.0
    assert float(deq.jac_freq.numpy()) == 1.0
    assert (deq.correction_weight, deq.correction_states) == (3.0, 3)
    assert deq.random_start == 1.0
    dropouts = keras_deq.layers.noise.noisy_layers(deq.block)
    assert len(dropouts) == 4 and all(d.rate == 0.0 for d in dropouts)
    assert deq.block.branches[0][0].layer.filters == 2 * 28
    assert abs(init_stddev(deq) - 0.05) < 0.005


def test_paper_configuration_is_table4():
    model = MDEQClassifier(10, seed=0, **MDEQClassifier.PAPER_CIFAR10)
    deq = model.deq
    check_table4_solver(deq)
    assert deq.gradient == "implicit"
    assert float(deq.jac_weight.numpy()) == 0.5
    np.testing.assert_allclose(deq.jac_freq.numpy(), 0.05)
    assert deq.correction_weight == 0.0 and deq.random_start is None
    dropouts = keras_deq.layers.noise.noisy_layers(deq.block)
    assert len(dropouts) == 4 and all(d.rate == 0.25 for d in dropouts)
    assert abs(init_stddev(deq) - 0.01) < 0.001
    # 6,911,392 parameters: widths 28/56/112/224 with expansion 5.
    assert model.count_params() == 6_911_392


def test_forward_output_is_a_fixed_point_of_the_block():
    # The paper's initialisation, where f is a contraction (test below).
    model = MDEQClassifier(3, max_iter=60, tol=1e-5, init_stddev=0.01, **SMALL)
    x = images()
    deq = model.deq
    injections = keras.Model(model.input, deq.input)(x)
    z = deq(injections)
    fz = deq.block(z, injections)
    for a, b in zip(z, fz, strict=True):
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < 1e-4, rel


def test_keras_file_and_saved_model_give_identical_predictions(tmp_path):
    model = MDEQClassifier(3, **SMALL)
    x = images(5)
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / "mdeq.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MDEQClassifier)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, atol=1e-5
    )
    model.export(str(tmp_path / "export"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(reloaded.serve(x).numpy(), expected, atol=1e-5)


# Two MDEQ traces (unrolled, then implicit): ~25 s. The callback itself is
# checked against an unrolled layer in tests/test_callbacks.py.
@pytest.mark.large
def test_unrolled_pretraining_switches_after_the_given_steps():
    model = MDEQClassifier(3, gradient="implicit", **SMALL)
    deq = model.deq
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(
            (deq.gradient, deq.max_iter)
        )
    )
    x, y = images(12), np.arange(12) % 3
    history = model.fit(
        x,
        y,
        batch_size=4,
        epochs=2,
        verbose=0,
        callbacks=[keras_deq.callbacks.UnrolledPretraining(4, 2), record],
    ).history
    assert seen == [("unrolled", 2)] * 4 + [("implicit", 7)] * 2
    assert (deq.gradient, deq.max_iter) == ("implicit", 7)
    # Epoch 1 ran 3 unrolled steps of 2 iterations.
    assert history["deq_forward_nfe"][0] == 2.0
    assert np.all(np.isfinite(history["loss"]))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(widths=(8, 14)), "divisible by `num_groups`=4"),
        (dict(widths=()), "non-empty sequence"),
        (dict(widths=(8, 16), input_shape=(31, 32, 3)), "divisible by 2"),
        (dict(num_classes=1), "num_classes"),
    ],
)
def test_bad_configuration(kwargs, pattern):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        MDEQClassifier(**kwargs)


@pytest.mark.large
@pytest.mark.parametrize("init_stddev, bound", [(0.01, 0.9), (0.05, 1.1)])
def test_spectral_radius_at_initialisation(init_stddev, bound):
    """Injection before GN₂ and zero-scale fusion norms: at the paper's
    N(0, 0.01²) f is a contraction, ρ(J_f) < 0.9; at the default
    N(0, 0.05²) ρ is near 1. With 50 power iterations, on seeds 0-2:
    0.81-0.85 and 0.95-1.05 on these images (100 iterations: within
    0.02 of those)."""
    model = MDEQClassifier(
        10,
        widths=(8, 16, 32, 64),
        expansion=1,
        init_stddev=init_stddev,
        seed=0,
    )
    deq = model.deq
    injections = keras.Model(model.input, deq.input)(images(4))
    radius = deq.spectral_radius(injections, num_iters=50).numpy()
    assert np.all(radius < bound), radius
    if init_stddev == 0.05:
        assert np.all(radius > 0.9), radius


def test_spectral_radius_monitor_runs_the_power_method_in_a_graph():
    """`SpectralRadiusMonitor` traces the power method; the MDEQ's
    multi-resolution state used to lose its static shape there (a while
    loop error). The graph value equals the eager estimate."""
    model = MDEQClassifier(10, input_shape=(8, 8, 3), **SMALL)
    x = images(2, size=8)
    monitor = keras_deq.callbacks.SpectralRadiusMonitor(x, num_iters=20)
    monitor.set_model(model)
    monitor.on_train_begin()
    logs = {}
    monitor.on_epoch_end(0, logs)
    deq = model.deq
    eager = deq.spectral_radius(
        keras.Model(model.input, deq.input)(x), num_iters=20
    )
    np.testing.assert_allclose(
        logs["deq_spectral_radius"], np.mean(eager), rtol=1e-5
    )
    assert 0 < logs["deq_spectral_radius"] < 2


def test_phantom_gradient_settings_reach_the_layer_and_the_config():
    model = MDEQClassifier(
        10, gradient="phantom", phantom_steps=3, phantom_tau=0.8, **SMALL
    )
    deq = model.deq
    assert (deq.gradient, deq.phantom_steps, deq.phantom_tau) == (
        "phantom",
        3,
        0.8,
    )
    again = MDEQClassifier.from_config(model.get_config()).deq
    assert (again.phantom_steps, again.phantom_tau) == (3, 0.8)
    with pytest.raises(ValueError, match="phantom_tau"):
        MDEQClassifier(10, phantom_tau=1.5, **SMALL)


@pytest.mark.parametrize("shape", [(3, 8, 8, 12), (2, 5, 12), (2, 4, 6, 2, 12)])
def test_group_norm_equals_keras_and_a_numpy_reference(shape):
    from keras_deq.layers import GroupNorm

    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=shape)).astype("float32")
    ours = GroupNorm(3, epsilon=1e-5)
    theirs = keras.layers.GroupNormalization(3, epsilon=1e-5)
    for layer in (ours, theirs):
        layer.build(shape)
    gamma = rng.normal(size=12).astype("float32")
    beta = rng.normal(size=12).astype("float32")
    for layer in (ours, theirs):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    grouped = x.astype(np.float64).reshape(shape[0], -1, 3, 4)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = grouped.var(axis=(1, 3), keepdims=True)
    reference = ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(shape)
    reference = reference * gamma + beta
    np.testing.assert_allclose(ours(x).numpy(), reference, atol=1e-5)
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), atol=1e-5)

    def input_gradient(layer):
        x_t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x_t)
            y = layer(x_t)
            loss = tf.reduce_sum(y * tf.sin(y))
        return tape.gradient(loss, [x_t, layer.gamma, layer.beta])

    for a, b in zip(input_gradient(ours), input_gradient(theirs), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_group_norm_on_another_axis_is_keras_own():
    from keras_deq.layers import GroupNorm

    x = np.random.default_rng(1).normal(size=(2, 6, 4, 4)).astype("float32")
    ours = GroupNorm(3, axis=1)
    theirs = keras.layers.GroupNormalization(3, axis=1)
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), atol=1e-6)


def test_an_ensemble_of_two_models_logs_and_steers_each_layer():
    # Unrolled at 3 and 9 steps, the forward NFE is exactly max_iter.
    small = dict(
        SMALL,
        widths=(8,),
        input_shape=(4, 4, 3),
        tol=1e-12,
        gradient="unrolled",
        jac_weight=0.5,
    )
    first = MDEQClassifier(3, max_iter=3, **small)
    second = MDEQClassifier(3, max_iter=9, **small)
    assert (first.deq.name, second.deq.name) == ("deq", "deq_1")
    named = MDEQClassifier(3, deq_name="teacher_deq", **small)
    assert named.deq.name == "teacher_deq"
    assert named.get_config()["deq_name"] == "teacher_deq"

    inputs = keras.Input((4, 4, 3))
    logits = keras.layers.Average()([first(inputs), second(inputs)])
    ensemble = keras.Model(inputs, logits)
    ensemble.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = images(n=8, size=4)
    y = np.arange(8) % 3
    adaptive = AdaptiveJacobian(target_nfe=5.0, factor=2.0, margin=1.0)
    history = ensemble.fit(
        x, y, batch_size=4, epochs=1, verbose=0, callbacks=[adaptive]
    ).history
    assert history["deq_forward_nfe"] == [3.0]
    assert history["deq_1_forward_nfe"] == [9.0]
    # Each γ moved by its own layer's NFE: 3 < 5 − 1 halves 0.5, 9 > 5
    # doubles it.
    assert float(first.deq.jac_weight.numpy()) == pytest.approx(0.25)
    assert float(second.deq.jac_weight.numpy()) == pytest.approx(1.0)


def test_callbacks_refuse_two_deq_layers_of_one_name():
    small = dict(SMALL, widths=(8,), input_shape=(4, 4, 3))
    first = MDEQClassifier(3, deq_name="deq", **small)
    second = MDEQClassifier(3, deq_name="deq", **small)
    inputs = keras.Input((4, 4, 3))
    ensemble = keras.Model(
        inputs, keras.layers.Average()([first(inputs), second(inputs)])
    )
    adaptive = AdaptiveJacobian(target_nfe=5.0)
    adaptive.set_model(ensemble)
    with pytest.raises(ValueError, match=r"several DEQLayers named \['deq'\]"):
        adaptive.on_train_begin()
