"""The test-time budget: `override_inference` on a layer and on models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq.models import DEQTransformerLM
from tests.blocks import LinearCell

D = 6


def linear_model(**layer_kwargs):
    """Identity → DEQLayer(z A + x): z* = x (I − A)⁻¹ in closed form."""
    layer = keras_deq.DEQLayer(
        LinearCell(norm=0.9, seed=3),
        solver="fixed_point",
        name="deq",
        **layer_kwargs,
    )
    model = keras.Sequential([keras.Input((D,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    return model, layer


def closed_form(layer, x):
    a = layer.block.a.numpy()
    return x @ np.linalg.inv(np.eye(D) - a)


def inputs(n=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, D)).astype("float32")


def test_the_budget_reaches_predict_evaluate_and_calls_traced_before():
    # ‖A‖ = 0.9: 3 plain steps are far from z*, 300 reach it.
    model, layer = linear_model(max_iter=3, tol=1e-7)
    x = inputs()
    exact = closed_form(layer, x)
    short = model.predict(x, verbose=0)  # traces predict with 3 steps
    assert np.abs(short - exact).max() > 0.1
    short_mse = model.evaluate(x, exact, verbose=0, return_dict=True)["loss"]
    assert layer.forward_nfe.result().numpy() == 3

    keras_deq.diagnostics.override_inference(model, max_iter=300)
    assert layer.inference_overrides == {"max_iter": 300}
    np.testing.assert_allclose(model.predict(x, verbose=0), exact, atol=1e-5)
    mse = model.evaluate(x, exact, verbose=0, return_dict=True)["loss"]
    assert mse < 1e-9 < short_mse
    np.testing.assert_allclose(layer(x).numpy(), exact, atol=1e-5)
    # Training keeps the trained budget, and the config does not change.
    model.fit(x, exact, epochs=1, batch_size=8, verbose=0)
    assert layer.forward_nfe.result().numpy() == 3
    assert layer.get_config()["max_iter"] == 3

    # A looser tolerance stops earlier: each sample within tol of z*.
    keras_deq.diagnostics.override_inference(model, max_iter=300, tol=1e-2)
    loose = model.predict(x, verbose=0)
    rel = np.linalg.norm(loose - exact, axis=-1) / np.linalg.norm(exact, -1)
    assert np.all(rel < 0.2) and np.any(rel > 1e-4)

    keras_deq.diagnostics.override_inference(model)  # cleared
    assert layer.inference_overrides == {}
    np.testing.assert_allclose(model.predict(x, verbose=0), short, atol=1e-6)


def test_export_writes_the_budget_set_when_it_runs(tmp_path):
    model, layer = linear_model(max_iter=3, tol=1e-7)
    x = inputs()
    keras_deq.diagnostics.override_inference(model, max_iter=300)
    model.export(tmp_path / "served", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(
        served.serve(x).numpy(), closed_form(layer, x), atol=1e-5
    )


def test_a_model_sets_its_budget_in_one_call():
    model = DEQTransformerLM(
        12, hidden_dim=8, num_heads=2, intermediate_dim=8, seed=0
    )
    ids = np.random.default_rng(0).integers(0, 12, (2, 5))
    before = model.next_token_logits(ids).numpy()  # traced at max_iter 12
    model.override_inference(max_iter=1)
    assert model.deq.inference_overrides == {"max_iter": 1}
    one_step = model.next_token_logits(ids).numpy()
    assert np.abs(one_step - before).max() > 1e-6
    np.testing.assert_allclose(
        model.predict(ids, verbose=0)[:, -1], one_step, atol=1e-5
    )
    model.override_inference()
    np.testing.assert_allclose(
        model.next_token_logits(ids).numpy(), before, atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
    ],
)
def test_bad_budgets_raise(kwargs, pattern):
    _, layer = linear_model()
    with pytest.raises((ValueError, TypeError), match=pattern):
        layer.override_inference(**kwargs)
