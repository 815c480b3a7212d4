"""The models pass every DEQLayer setting through and keep their config."""

import keras
import numpy as np
import pytest

from keras_deq import gradients
from keras_deq.models import DEQTransformerLM
from keras_deq.models import MDEQClassifier

NON_DEFAULT = dict(
    solver="anderson",
    max_iter=9,
    tol=1e-5,
    stop_mode="abs",
    backward_solver="broyden",
    backward_max_iter=11,
    backward_tol=1e-6,
    gradient="phantom",
    phantom_steps=3,
    phantom_tau=0.7,
    jac_weight=0.25,
    jac_freq=0.5,
    jac_samples=2,
    solver_options={"m": 4, "beta": 0.9},
    backward_solver_options={"memory": 5},
)


def mdeq(**kwargs):
    return MDEQClassifier(
        3, widths=(8, 16), expansion=1, num_groups=4, seed=0, **kwargs
    )


def lm(**kwargs):
    return DEQTransformerLM(
        20, hidden_dim=16, num_heads=2, intermediate_dim=24, seed=0, **kwargs
    )


CASES = {
    "mdeq": (mdeq, np.random.default_rng(0).normal(size=(2, 32, 32, 3))),
    "lm": (lm, np.random.default_rng(0).integers(0, 20, (2, 7))),
}


def deq_settings(model):
    config = model.deq.get_config()
    return {name: config[name] for name in NON_DEFAULT}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_model_with_non_default_deq_settings_round_trips(
    name, tmp_path
):
    build, inputs = CASES[name]
    model = build(dtype="float64", trainable=False, **NON_DEFAULT)
    deq = model.deq
    settings = deq_settings(model)
    assert settings == NON_DEFAULT  # 0.25 and 0.5 are exact in float32
    # A callback's change to γ is what the config saves.
    deq.jac_weight.assign(0.125)
    out = model.predict(inputs, verbose=0)
    assert deq.block.compute_dtype == "float64"
    assert all(w.dtype == "float64" for w in deq.block.weights)

    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.dtype_policy.name == "float64"
    assert loaded.deq.block.compute_dtype == "float64"
    assert not loaded.trainable
    assert deq_settings(loaded) == {**settings, "jac_weight": 0.125}
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(
        loaded.predict(inputs, verbose=0), out, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_gradient_object_round_trips_with_the_model(name, tmp_path):
    build, inputs = CASES[name]
    kind = gradients.Phantom(steps=2, tau=0.5)
    model = build(gradient=kind)
    assert model.deq.gradient is kind
    out = model.predict(inputs, verbose=0)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.deq.gradient == kind
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(
        loaded.predict(inputs, verbose=0), out, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_defaults_are_stated_once_and_reach_the_layer(name):
    build, _ = CASES[name]
    model = build()
    config = model.deq.get_config()
    defaults = type(model).DEQ_DEFAULTS
    for key, value in defaults.items():
        if value is not None:
            assert config[key] == pytest.approx(value), key
    assert model.get_config()["max_iter"] == defaults["max_iter"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_unknown_keyword_arguments_raise(name):
    build, _ = CASES[name]
    with pytest.raises((TypeError, ValueError), match=r"max_iters"):
        build(max_iters=5)


SEEDED = {
    "mdeq": lambda seed: MDEQClassifier(
        3, widths=(8, 16), expansion=1, num_groups=4, seed=seed
    ),
    "lm": lambda seed: DEQTransformerLM(
        20, hidden_dim=16, num_heads=2, intermediate_dim=24, seed=seed
    ),
}


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_a_seed_fixes_every_initial_weight(name):
    """The same `seed` builds the same model (the MDEQ's stem, injection
    convolutions and head used to be drawn unseeded); another seed draws
    every random weight anew."""
    build = SEEDED[name]
    first, again, other = build(3), build(3), build(4)
    for a, b, c in zip(
        first.weights, again.weights, other.weights, strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        if np.unique(a.numpy()).size > 1:  # drawn, not a constant
            assert not np.array_equal(a.numpy(), c.numpy()), a.path
