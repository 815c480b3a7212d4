"""How a trained DEQ behaves as an equilibrium model, and its test-time budget.

An equilibrium model's output is the fixed point of its block: given more
solver iterations at test time its metric should hold or improve and its
residual fall, and it should reach the same fixed point from any first
iterate (path independence). `equilibrium_report` measures both for a
trained model, `plot_report` draws it, `EquilibriumMonitor` logs it during
`fit`, and `override_inference` sets the test-time budget.

Reference:
    Anil et al., "Path Independent Equilibrium Models Can Better Exploit
    Test-Time Computation", NeurIPS 2022.
"""

import logging
from collections.abc import Callable
from collections.abc import Sequence

import keras
import numpy as np

from keras_deq.callbacks import find_deq_layers
from keras_deq.layers.deq_layer import DEQLayer


def override_inference(
    model: keras.layers.Layer,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    random_start: float | None = None,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> list[DEQLayer]:
    """Sets the test-time budget of a model's DEQLayers in one call.

    Calls `DEQLayer.override_inference` with these settings on every
    DEQLayer of `model` (or those named in `layers`) and drops the model's
    traced `predict` and `evaluate` functions, so that the next `predict`,
    `evaluate` or `export` runs with them. No settings clears the
    overrides. Training is not affected.

    Args:
        model: a Keras model (or layer) containing DEQLayers.
        max_iter: forward iterations at test time. Defaults to `None` (each
            layer's own).
        tol: forward tolerance at test time. Defaults to `None` (each
            layer's own).
        random_start: σ of Gaussian noise added to the first iterate.
            Defaults to `None` (no noise).
        seed: int seed of that noise. Defaults to `0`.
        layers: names of the DEQLayers to set. Defaults to all of them.

    Returns:
        The DEQLayers that were set.

    Examples:

        ```python
        trained = model.evaluate(x, y, return_dict=True)
        keras_deq.diagnostics.override_inference(model, max_iter=4 * 7)
        longer = model.evaluate(x, y, return_dict=True)
        keras_deq.diagnostics.override_inference(model)  # back as trained
        ```
    """
    targets = find_deq_layers(model, layers)
    for layer in targets:
        layer.override_inference(
            max_iter=max_iter, tol=tol, random_start=random_start, seed=seed
        )
    _drop_traced(model)
    return targets


def _drop_traced(model):
    for name in ("predict_function", "test_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def equilibrium_report(
    model: keras.Model,
    x,
    y=None,
    *,
    metric: str | keras.metrics.Metric | Callable | None = None,
    budgets: Sequence[float] = (1, 2, 4, 8),
    num_starts: int = 3,
    random_start: float = 1.0,
    batch_size: int = 64,
    layer: str | None = None,
    seed: int = 0,
) -> dict:
    """Metric, residuals and NFE against the test-time budget; path checks.

    For each multiple m of `budgets` the DEQLayer solves with m times its
    own `max_iter` (its `tol` unchanged): the report gives the model's
    `metric` on `(x, y)`, the distribution of the per-sample relative
    residual ‖f(z) − z‖ / ‖f(z)‖ of the returned state (computed here from
    one more evaluation of the block, not taken from the solver), the
    fractions of samples within `tol` and within 1e-2, and the mean NFE.
    Then, at the largest budget, it solves again from `num_starts` first
    iterates with N(0, `random_start`²) noise added and compares with the
    default start: the relative distance of the states and the agreement
    of the model's outputs (the arg-max for outputs with more than one
    unit, else agreement to 1%). A path-independent model scores 1.

    The layer's own test-time overrides are restored at the end.

    Args:
        model: a built model with one DEQLayer (or name it in `layer`),
            called on one input (the DEQLayer's input must be a function
            of `model.inputs`).
        x: inputs, a NumPy array (or what `model.predict` takes).
        y: targets for `metric`. Defaults to `None` (no metric).
        metric: a Keras metric name or object (such as
            `"sparse_categorical_accuracy"`), or a function `(y, y_pred)`
            whose mean is the score. Defaults to `None`.
        budgets: multiples of the layer's `max_iter`. Defaults to
            `(1, 2, 4, 8)`.
        num_starts: random first iterates for the path check, `0` skips
            it. Defaults to `3`.
        random_start: σ of their noise. Defaults to `1.0`.
        batch_size: batch size of the solves. Defaults to `64`.
        layer: name of the DEQLayer. Defaults to `None` (the only one).
        seed: int seed of the random starts. Defaults to `0`.

    Returns:
        A dict (JSON-ready): `layer`, `max_iter`, `tol`, `rows` (one per
        budget: `multiple`, `max_iter`, `metric`, `nfe`,
        `residual_median`, `residual_p90`, `residual_max`,
        `within_tol`, `within_1e-2`), and `path` (`max_iter`, `random_start`,
        `num_starts`, `distance_median`, `distance_max`, `agreement`) or
        `None`.

    Examples:

        ```python
        report = keras_deq.diagnostics.equilibrium_report(
            model, x_test, y_test, metric="sparse_categorical_accuracy")
        [(row["max_iter"], row["metric"]) for row in report["rows"]]
        report["path"]["agreement"]  # 1.0 for a path-independent model
        ```
    """
    deq = _the_layer(model, layer)
    if not budgets or any(b <= 0 for b in budgets):
        raise ValueError(
            "`budgets` must be positive multiples of max_iter. Received: "
            f"budgets={budgets!r}"
        )
    if not isinstance(num_starts, int) or num_starts < 0:
        raise ValueError(
            "`num_starts` must be an int >= 0. Received: "
            f"num_starts={num_starts!r}"
        )
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    injection = keras.Model(inputs, deq.input)(x, training=False)
    previous = deq.inference_overrides
    trained = deq.max_iter
    rows = []
    # Every budget and start is a new trace by design; TensorFlow would
    # warn about retracing at each.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        for multiple in budgets:
            max_iter = max(1, int(round(multiple * trained)))
            deq.override_inference(max_iter=max_iter)
            _drop_traced(model)
            deq.forward_nfe.reset_state()
            z, residual = _solve(deq, injection, batch_size)
            rows.append(
                {
                    "multiple": float(multiple),
                    "max_iter": max_iter,
                    "metric": _score(metric, model, x, y, batch_size),
                    "nfe": float(deq.forward_nfe.result()),
                    "residual_median": float(np.median(residual)),
                    "residual_p90": float(np.quantile(residual, 0.9)),
                    "residual_max": float(np.max(residual)),
                    "within_tol": float(np.mean(residual <= deq.tol)),
                    "within_1e-2": float(np.mean(residual <= 1e-2)),
                }
            )
        path = None
        if num_starts:
            max_iter = rows[-1]["max_iter"]
            deq.override_inference(max_iter=max_iter)
            _drop_traced(model)
            z0, _ = _solve(deq, injection, batch_size)
            out0 = model.predict(x, batch_size=batch_size, verbose=0)
            distances, agreements = [], []
            for k in range(num_starts):
                deq.override_inference(
                    max_iter=max_iter, random_start=random_start, seed=seed + k
                )
                _drop_traced(model)
                zk, _ = _solve(deq, injection, batch_size)
                outk = model.predict(x, batch_size=batch_size, verbose=0)
                distances.append(_distance(zk, z0))
                agreements.append(_agreement(outk, out0))
            distances = np.concatenate(distances)
            path = {
                "max_iter": max_iter,
                "random_start": float(random_start),
                "num_starts": num_starts,
                "distance_median": float(np.median(distances)),
                "distance_max": float(np.max(distances)),
                "agreement": float(np.mean(agreements)),
            }
    finally:
        tf_logger.setLevel(level)
        deq._inference_overrides = previous
        _drop_traced(model)
    return {
        "layer": deq.name,
        "max_iter": trained,
        "tol": deq.tol,
        "rows": rows,
        "path": path,
    }


def plot_report(report: dict, path: str, title: str | None = None) -> None:
    """Draws a report's metric and residual against the test-time budget.

    Writes a PNG with two panels against the forward iterations: the metric
    (when the report has one) and the median and 90th-percentile residual
    (log scale, with the tolerance). Needs matplotlib (the `examples`
    extra).

    Args:
        report: what `equilibrium_report` returned (or several, in a dict
            of label to report, drawn as one curve each).
        path: the PNG file to write.
        title: the figure's title. Defaults to `None`.

    Examples:

        ```python
        report = keras_deq.diagnostics.equilibrium_report(
            model, x_test, y_test, metric="sparse_categorical_accuracy"
        )
        keras_deq.diagnostics.plot_report(report, "equilibrium.png")
        ```
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plot_report needs matplotlib: pip install matplotlib (or "
            "keras-deq[examples])."
        ) from error
    reports = report if "rows" not in report else {None: report}
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, one in reports.items():
        iters = [row["max_iter"] for row in one["rows"]]
        if one["rows"][0]["metric"] is not None:
            left.plot(
                iters, [r["metric"] for r in one["rows"]], "o-", label=label
            )
        line = right.plot(
            iters,
            [r["residual_median"] for r in one["rows"]],
            "o-",
            label=label,
        )[0]
        right.plot(
            iters,
            [r["residual_p90"] for r in one["rows"]],
            "--",
            color=line.get_color(),
        )
        right.axhline(one["tol"], color="gray", linewidth=0.8)
    left.set(xlabel="forward iterations at test time", ylabel="metric")
    right.set(
        xlabel="forward iterations at test time",
        ylabel="relative residual (median, p90 dashed)",
        yscale="log",
    )
    if any(label is not None for label in reports):
        left.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


class EquilibriumMonitor(keras.callbacks.Callback):
    """Logs the path-independence score and the metric at a longer budget.

    Every `every` epochs it runs `equilibrium_report` on held-out `(x, y)`
    with one budget, `budget` times the layer's `max_iter`, and adds
    `{layer}_path_agreement` and `{layer}_metric_at_{budget}x` (with a
    metric) to the epoch logs, so they reach `History` and, when the
    `TensorBoard` callback comes after this one, TensorBoard.

    Args:
        x: held-out inputs.
        y: their targets. Defaults to `None`.
        metric: as in `equilibrium_report`. Defaults to `None`.
        every: epochs between reports. Defaults to `1`.
        budget: multiple of `max_iter`. Defaults to `4`.
        num_starts: random first iterates. Defaults to `2`.
        layer: name of the DEQLayer. Defaults to `None` (the only one).

    Examples:

        ```python
        monitor = keras_deq.diagnostics.EquilibriumMonitor(
            x_val, y_val, metric="sparse_categorical_accuracy", every=5)
        model.fit(x, y, epochs=20, callbacks=[monitor])
        ```
    """

    def __init__(
        self,
        x,
        y=None,
        *,
        metric=None,
        every: int = 1,
        budget: float = 4,
        num_starts: int = 2,
        layer: str | None = None,
    ):
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise ValueError(
                f"`every` must be an int >= 1. Received: every={every!r}"
            )
        if budget <= 0:
            raise ValueError(
                f"`budget` must be > 0. Received: budget={budget!r}"
            )
        self.x, self.y = x, y
        self.metric = metric
        self.every = every
        self.budget = budget
        self.num_starts = num_starts
        self.layer = layer

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or logs is None:
            return
        report = equilibrium_report(
            self.model,
            self.x,
            self.y,
            metric=self.metric,
            budgets=(self.budget,),
            num_starts=self.num_starts,
            layer=self.layer,
        )
        name = report["layer"]
        if report["path"] is not None:
            logs[f"{name}_path_agreement"] = report["path"]["agreement"]
        if report["rows"][0]["metric"] is not None:
            logs[f"{name}_metric_at_{self.budget:g}x"] = report["rows"][0][
                "metric"
            ]


def _the_layer(model, name):
    found = find_deq_layers(model, None if name is None else [name])
    if len(found) > 1:
        raise ValueError(
            f"The model {model.name!r} has {len(found)} DEQLayers "
            f"{[layer.name for layer in found]}: name one with `layer`."
        )
    return found[0]


def _solve(deq, injection, batch_size):
    """z* per batch and its relative residual, from one more f evaluation."""
    leaves = keras.tree.flatten(injection)
    count = int(leaves[0].shape[0])
    states, residuals = [], []
    for start in range(0, count, batch_size):
        part = keras.tree.map_structure(
            lambda t, s=start: t[s : s + batch_size], injection
        )
        z = deq(part, training=False)
        fz = deq._apply_block(z, part, False)
        flat_z = _flat(z)
        flat_fz = _flat(fz)
        states.append(flat_z)
        residuals.append(
            np.linalg.norm(flat_fz - flat_z, axis=-1)
            / (np.linalg.norm(flat_fz, axis=-1) + 1e-12)
        )
    return np.concatenate(states), np.concatenate(residuals)


def _flat(nest):
    leaves = [
        keras.ops.convert_to_numpy(t).astype(np.float64)
        for t in keras.tree.flatten(nest)
    ]
    return np.concatenate([t.reshape(t.shape[0], -1) for t in leaves], -1)


def _distance(z, reference):
    return np.linalg.norm(z - reference, axis=-1) / (
        np.linalg.norm(reference, axis=-1) + 1e-12
    )


def _agreement(out, reference):
    out, reference = np.asarray(out), np.asarray(reference)
    if out.ndim >= 2 and out.shape[-1] > 1:
        return float(np.mean(out.argmax(-1) == reference.argmax(-1)))
    close = np.abs(out - reference) <= 1e-2 * (np.abs(reference) + 1e-6)
    return float(np.mean(close))


def _score(metric, model, x, y, batch_size):
    if metric is None or y is None:
        return None
    prediction = model.predict(x, batch_size=batch_size, verbose=0)
    if isinstance(metric, str):
        metric = keras.metrics.get(metric)
    if isinstance(metric, keras.metrics.Metric):
        metric.reset_state()
        metric.update_state(y, prediction)
        return float(metric.result())
    return float(np.mean(keras.ops.convert_to_numpy(metric(y, prediction))))
