r"""Warm starts on a stream of slowly drifting inputs, against cold starts.

    export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736
    python -m benchmarks.warm_start --cells=mlp,conv

For each cell of `cells.py`, a `DEQLayer` (Broyden, `--max_iter`, tol
`--tol`) is first trained for `--train_steps` Adam steps to regress
tanh(x V) (V fixed, random) from its equilibrium through a Dense head, so
that the stream runs through a trained DEQ, not its initialisation. Then
`--steps` inputs x_{t+1} = x_t + `--drift` · N(0, 1) go through it twice:
cold (every solve from zeros) and warm (each solve from the previous
output, `layer(x, initial_state=z)`). Per step it records the forward NFE,
the time of the solve (median of `--repeats` calls, traced beforehand) and
‖z_warm − z_cold‖ / ‖z_cold‖, which both solves' tolerance bounds (each
stops within `tol` of the equilibrium, relative). Prints medians over the
stream and writes every step to `--output` (JSON).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import cells  # noqa: E402
from benchmarks import timing  # noqa: E402
from keras_deq.layers import DEQLayer  # noqa: E402

_CELLS = flags.DEFINE_list("cells", ["mlp", "conv"], "Cells of cells.py.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Overrides the cell's.")
_STEPS = flags.DEFINE_integer("steps", 50, "Inputs in the stream.")
_DRIFT = flags.DEFINE_float("drift", 0.01, "Noise added per stream step.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 50, "Adam steps first.")
_MAX_ITER = flags.DEFINE_integer("max_iter", 30, "Forward NFE threshold.")
_TOL = flags.DEFINE_float("tol", 1e-3, "Forward tolerance (relative).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per solve.")
_OUTPUT = flags.DEFINE_string(
    "output", "warm_start.json", "Where to write the JSON results."
)


def trained_layer(name):
    """A DEQLayer over the cell, trained briefly; and the cell's input."""
    cell, x = cells.make(name, _BATCH_SIZE.value)
    layer = DEQLayer(cell, max_iter=_MAX_ITER.value, tol=_TOL.value, seed=0)
    features = x.shape[-1]
    rng = np.random.default_rng(7)
    v = rng.normal(size=(features, features)) / np.sqrt(features)
    target = tf.tanh(tf.tensordot(x, tf.constant(v, tf.float32), 1))
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, keras.layers.Dense(features)(layer(inputs)))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(
        x, target, batch_size=x.shape[0], epochs=_TRAIN_STEPS.value, verbose=0
    )
    return layer, x


def stream(layer, x0):
    """Per-step NFE, seconds and output difference, cold and warm."""
    cold_fn = tf.function(lambda x: layer(x))
    warm_fn = tf.function(lambda x, z: layer(x, initial_state=z))
    rng = np.random.default_rng(11)
    x = x0
    z = cold_fn(x)
    warm_fn(x, z)  # traced before any timing
    steps = []
    for _ in range(_STEPS.value):
        x = x + _DRIFT.value * tf.constant(rng.normal(size=x.shape), tf.float32)
        record = {}
        for kind, fn in (
            ("cold", lambda x=x: cold_fn(x)),
            ("warm", lambda x=x, z=z: warm_fn(x, z)),
        ):
            layer.forward_nfe.reset_state()
            out = fn()
            record[f"{kind}_nfe"] = float(layer.forward_nfe.result())
            record[f"{kind}_seconds"] = timing.measure(
                lambda fn=fn: fn().numpy(), repeats=_REPEATS.value, warmup=0
            )["median"]
            record[kind] = out
        cold, warm = record.pop("cold"), record.pop("warm")
        record["relative_difference"] = float(
            tf.norm(warm - cold) / tf.norm(cold)
        )
        steps.append(record)
        z = warm
    return steps


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results, rows = [], []
    for name in _CELLS.value:
        layer, x = trained_layer(name)
        steps = stream(layer, x)

        def median(key, steps=steps):
            return float(np.median([s[key] for s in steps]))

        summary = {
            "cell": name,
            "batch_size": int(x.shape[0]),
            "cold_nfe": median("cold_nfe"),
            "warm_nfe": median("warm_nfe"),
            "cold_ms": 1e3 * median("cold_seconds"),
            "warm_ms": 1e3 * median("warm_seconds"),
            "max_relative_difference": max(
                s["relative_difference"] for s in steps
            ),
            "steps": steps,
        }
        results.append(summary)
        rows.append(
            (
                name,
                f"{summary['cold_nfe']:.1f}",
                f"{summary['warm_nfe']:.1f}",
                f"{summary['cold_ms']:.1f}",
                f"{summary['warm_ms']:.1f}",
                f"{summary['cold_ms'] / summary['warm_ms']:.2f}",
                f"{summary['max_relative_difference']:.1e}",
            )
        )
    timing.print_table(
        (
            "cell",
            "cold NFE",
            "warm NFE",
            "cold ms",
            "warm ms",
            "speed-up",
            "max ‖Δz‖/‖z‖",
        ),
        rows,
    )
    timing.write_json(_OUTPUT.value, results)


if __name__ == "__main__":
    app.run(main)
