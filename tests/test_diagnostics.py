"""The test-time budget: `override_inference` on a layer and on models."""

import keras
import numpy as np
import pytest

import keras_deq
from tests.any_backend import BACKEND
from tests.any_backend import LinearCell
from tests.any_backend import to_numpy

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="needs TensorFlow"
)

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
    # (On JAX a layer records its statistics in eager calls only.)
    if BACKEND == "tensorflow":
        assert to_numpy(layer.forward_nfe.result()) == 3

    keras_deq.diagnostics.override_inference(model, max_iter=300)
    assert layer.inference_overrides == {"max_iter": 300}
    np.testing.assert_allclose(model.predict(x, verbose=0), exact, atol=1e-5)
    mse = model.evaluate(x, exact, verbose=0, return_dict=True)["loss"]
    assert mse < 1e-9 < short_mse
    layer.forward_nfe.reset_state()
    np.testing.assert_allclose(to_numpy(layer(x)), exact, atol=1e-5)
    assert 3 < to_numpy(layer.forward_nfe.result()) < 300  # tol reached
    # Training keeps the trained budget, and the config does not change.
    model.fit(x, exact, epochs=1, batch_size=8, verbose=0)
    if BACKEND == "tensorflow":
        assert to_numpy(layer.forward_nfe.result()) == 3
    layer.forward_nfe.reset_state()
    layer(x, training=True)
    assert to_numpy(layer.forward_nfe.result()) == 3
    assert layer.get_config()["max_iter"] == 3

    # A looser tolerance stops earlier: each sample within tol of z*.
    keras_deq.diagnostics.override_inference(model, max_iter=300, tol=1e-2)
    loose = model.predict(x, verbose=0)
    rel = np.linalg.norm(loose - exact, axis=-1) / np.linalg.norm(exact, -1)
    assert np.all(rel < 0.2) and np.any(rel > 1e-4)

    keras_deq.diagnostics.override_inference(model)  # cleared
    assert layer.inference_overrides == {}
    np.testing.assert_allclose(model.predict(x, verbose=0), short, atol=1e-6)


@tensorflow_only
def test_export_writes_the_budget_set_when_it_runs(tmp_path):
    import tensorflow as tf

    model, layer = linear_model(max_iter=3, tol=1e-7)
    x = inputs()
    keras_deq.diagnostics.override_inference(model, max_iter=300)
    model.export(tmp_path / "served", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(
        served.serve(x).numpy(), closed_form(layer, x), atol=1e-5
    )


def test_a_model_sets_its_budget_in_one_call():
    from keras_deq.models import DEQTransformerLM

    model = DEQTransformerLM(
        12, hidden_dim=8, num_heads=2, intermediate_dim=8, seed=0
    )
    ids = np.random.default_rng(0).integers(0, 12, (2, 5))
    before = to_numpy(model.next_token_logits(ids))  # traced at max_iter 12
    model.override_inference(max_iter=1)
    assert model.deq.inference_overrides == {"max_iter": 1}
    one_step = to_numpy(model.next_token_logits(ids))
    assert np.abs(one_step - before).max() > 1e-6
    np.testing.assert_allclose(
        model.predict(ids, verbose=0)[:, -1], one_step, atol=1e-5
    )
    model.override_inference()
    np.testing.assert_allclose(
        to_numpy(model.next_token_logits(ids)), before, atol=1e-6
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


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class BistableCell(keras.layers.Layer):
    """f(z, x) = tanh(3z + x / 10): attracting fixed points near ±1 per
    coordinate (0 repels), so where a solve ends depends on where it
    starts."""

    def call(self, z, x, training=None):
        return keras.ops.tanh(3.0 * z + 0.1 * x)


def sign_classifier(block, **layer_kwargs):
    """DEQ of a one-unit state, then logits (z, −z): the class is z's sign."""
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras_deq.DEQLayer(block, name="deq", **layer_kwargs),
            keras.layers.Dense(
                2,
                use_bias=False,
                kernel_initializer=keras.initializers.Constant([[1.0, -1.0]]),
            ),
        ]
    )
    return model


def test_report_follows_plain_iteration_in_closed_form():
    # ‖A‖ = 0.9 and a tolerance no solve reaches: M evaluations of f from
    # z0 = 0 end at z_{M−1}, and the layer outputs f(z_{M−1}) = z_M =
    # x (I − A^M) (I − A)⁻¹, whose residual f(z) − z = x A^M is computed
    # here in float64.
    model, layer = linear_model(max_iter=4, tol=1e-12)
    x = inputs(n=20)
    exact = closed_form(layer, x)
    a = layer.block.a.numpy().astype(np.float64)
    report = keras_deq.diagnostics.equilibrium_report(
        model,
        x,
        exact,
        metric="mean_squared_error",
        budgets=(1, 2, 4),
        num_starts=2,
        batch_size=8,
    )
    assert report["max_iter"] == 4 and report["layer"] == "deq"
    metrics = []
    for row, steps in zip(report["rows"], (4, 8, 16), strict=True):
        assert row["max_iter"] == steps and row["nfe"] == steps
        power = np.linalg.matrix_power(a, steps)
        z = x @ (np.eye(D) - power) @ np.linalg.inv(np.eye(D) - a)
        fz = z @ a + x
        rel = np.linalg.norm(fz - z, axis=-1) / np.linalg.norm(fz, axis=-1)
        np.testing.assert_allclose(row["residual_median"], np.median(rel), 1e-4)
        np.testing.assert_allclose(row["residual_max"], rel.max(), 1e-4)
        np.testing.assert_allclose(
            row["metric"], np.mean((z - exact) ** 2), rtol=1e-3
        )
        assert row["within_tol"] == 0.0
        metrics.append(row["metric"])
    assert metrics == sorted(metrics, reverse=True)  # more steps, closer
    # A contraction has one fixed point: every start reaches it.
    assert report["path"]["agreement"] == 1.0
    assert report["path"]["max_iter"] == 16
    # The overrides are the layer's own again.
    assert layer.inference_overrides == {}


def test_path_independence_of_a_contraction_scores_one():
    block = LinearCell(norm=0.5, seed=1)
    model = sign_classifier(block, solver="fixed_point", tol=1e-7, max_iter=60)
    x = np.random.default_rng(2).normal(size=(64, 1)).astype("float32")
    report = keras_deq.diagnostics.equilibrium_report(
        model, x, num_starts=3, random_start=2.0, budgets=(1,)
    )
    assert report["path"]["agreement"] == 1.0
    assert report["path"]["distance_max"] < 1e-5
    assert report["rows"][0]["within_tol"] == 1.0


def test_two_attracting_fixed_points_score_below_one():
    model = sign_classifier(
        BistableCell(), solver="fixed_point", tol=1e-6, max_iter=60
    )
    x = np.random.default_rng(3).normal(size=(200, 1)).astype("float32")
    report = keras_deq.diagnostics.equilibrium_report(
        model, x, num_starts=3, random_start=1.0, budgets=(1,)
    )
    # Every solve converges, to the attractor on its start's side: from
    # z0 = 0 that of x's sign, from N(0, 1) starts often the other one.
    assert report["rows"][0]["within_tol"] == 1.0
    assert 0.2 < report["path"]["agreement"] < 0.9
    assert report["path"]["distance_max"] > 1.5  # from near 1 to near −1


def test_plot_and_monitor(tmp_path):
    model, layer = linear_model(max_iter=3, tol=1e-7)
    x = inputs(n=16)
    exact = closed_form(layer, x)
    report = keras_deq.diagnostics.equilibrium_report(
        model, x, exact, metric="mean_squared_error", budgets=(1, 4)
    )
    path = tmp_path / "report.png"
    keras_deq.diagnostics.plot_report({"linear": report}, str(path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    monitor = keras_deq.diagnostics.EquilibriumMonitor(
        x, exact, metric="mean_squared_error", every=2, budget=4
    )
    history = model.fit(
        x, exact, epochs=2, batch_size=8, verbose=0, callbacks=[monitor]
    ).history
    assert history["deq_path_agreement"] == [1.0]
    np.testing.assert_allclose(
        history["deq_metric_at_4x"], [report["rows"][1]["metric"]], rtol=1e-5
    )


def test_training_from_random_first_iterates():
    # One unrolled step from z0: the output is f(z0) = z0 A + x, so the
    # first iterate can be read back as (output − x) A⁻¹.
    layer = keras_deq.DEQLayer(
        LinearCell(norm=0.5, seed=2), gradient="unrolled", max_iter=1, seed=7
    )
    x = inputs(n=2000)
    layer(x[:1])
    a_inv = np.linalg.inv(layer.block.a.numpy())
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), x, atol=1e-6)
    layer.override_training(random_start=0.5)
    first = (to_numpy(layer(x, training=True)) - x) @ a_inv
    second = (to_numpy(layer(x, training=True)) - x) @ a_inv
    assert abs(first.std() - 0.5) < 0.02 and abs(first.mean()) < 0.02
    assert not np.allclose(first, second)  # a fresh draw per call
    # Inference keeps the default start.
    np.testing.assert_allclose(to_numpy(layer(x)), x, atol=1e-6)
    with pytest.raises(ValueError, match="random_start"):
        layer.override_training(random_start=0.0)


def test_random_start_as_a_layer_argument():
    # The same check as above, with the noise a constructor argument
    # (saved in the config); override_training takes precedence.
    layer = keras_deq.DEQLayer(
        LinearCell(norm=0.5, seed=2),
        gradient="unrolled",
        max_iter=1,
        random_start=2.0,
        seed=7,
    )
    x = inputs(n=2000)
    layer(x[:1])
    a_inv = np.linalg.inv(layer.block.a.numpy())
    first = (to_numpy(layer(x, training=True)) - x) @ a_inv
    assert abs(first.std() - 2.0) < 0.08 and abs(first.mean()) < 0.08
    np.testing.assert_allclose(to_numpy(layer(x)), x, atol=1e-6)
    layer.override_training(random_start=0.5)
    first = (to_numpy(layer(x, training=True)) - x) @ a_inv
    assert abs(first.std() - 0.5) < 0.02
    clone = keras_deq.DEQLayer.from_config(layer.get_config())
    assert clone.random_start == 2.0
    with pytest.raises(ValueError, match=r"`random_start`.*-1"):
        keras_deq.DEQLayer(LinearCell(), random_start=-1.0)
