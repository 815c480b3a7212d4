r"""What each backward trades: step time against gradient accuracy.

    export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736
    python -m benchmarks.backward_tradeoff --cells=conv,transformer

On each cell of `benchmarks/cells.py` (loss mean(z*²), a forward of exactly
`--iters` evaluations), for each backward of `--configs`:

- `implicit-anderson`, `implicit-broyden`: the implicit backward with the
  forward's solver, `--iters` iterations;
- `reuse0`, `reuse2`, `reuse4`: Broyden's forward, the backward started from
  its inverse estimate and refined by 0, 2 or 4 iterations;
- `phantom`: one phantom step from Broyden's z*.

It reports the median training-step time (the step of
`benchmarks/training_step.py`, after warm-ups), and the cosine similarity
and relative error ‖g − g_ref‖ / ‖g_ref‖ of the parameter gradient (all
variables of the cell, concatenated) against the implicit gradient of the
same forward with the backward solved tightly (Broyden, `--reference_iters`
iterations, tolerance 1e-8; its residual is printed). The gradients are
those of mean(z* ⊙ R) for a fixed Gaussian R: the step's mean(z*²) is no
test of a backward on these cells, whose last operation is a normalization
(scale-invariant, so ∂ℓ/∂z* = 2z*/n has a zero vector-Jacobian product and
every backward, phantom included, gives the same gradient). Step times are also
given relative to one evaluation of f in the same run. Writes everything to
`--output` (JSON).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import cells  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.cells import make_layer  # noqa: E402
from benchmarks.steps import gradient_function  # noqa: E402
from benchmarks.steps import step_function  # noqa: E402

# (forward solver, benchmarks.steps mode) per configuration.
CONFIGS = {
    "implicit-anderson": ("anderson", "implicit"),
    "implicit-broyden": ("broyden", "implicit"),
    "reuse0": ("broyden", "reuse0"),
    "reuse2": ("broyden", "reuse2"),
    "reuse4": ("broyden", "reuse4"),
    "phantom": ("broyden", "phantom"),
}

_CELLS = flags.DEFINE_list("cells", ["conv", "transformer"], "Cells.")
_CONFIGS = flags.DEFINE_list("configs", list(CONFIGS), "Backwards to compare.")
_ITERS = flags.DEFINE_integer("iters", 12, "Forward (and backward) iterations.")
_REFERENCE_ITERS = flags.DEFINE_integer(
    "reference_iters", 60, "Backward iterations of the reference gradient."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Override each cell's batch size."
)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per config.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed warm-up steps.")
_OUTPUT = flags.DEFINE_string(
    "output", "backward_tradeoff.json", "Where to write the JSON results."
)


def flat(grads):
    return np.concatenate([np.ravel(g.numpy()) for g in grads])


def compare(grads, reference):
    cosine = (
        grads @ reference / (np.linalg.norm(grads) * np.linalg.norm(reference))
    )
    error = np.linalg.norm(grads - reference) / np.linalg.norm(reference)
    return float(cosine), float(error)


def measure_cell(name):
    cell, x = cells.make(name, _BATCH_SIZE.value)
    f = tf.function(lambda: cell(tf.zeros_like(x), x))
    f_seconds = timing.measure(lambda: f().numpy(), _REPEATS.value, 3)
    weights = tf.constant(
        np.random.default_rng(7).normal(size=x.shape), x.dtype
    )
    references = {}
    rows = []
    for label in _CONFIGS.value:
        solver, mode = CONFIGS[label]
        if solver not in references:
            layer = make_layer(
                cell,
                x,
                "implicit",
                solver,
                _ITERS.value,
                backward_solver="broyden",
                backward_max_iter=_REFERENCE_ITERS.value,
                backward_tol=1e-8,
            )
            references[solver] = flat(gradient_function(layer, x, weights)())
            residual = float(layer.backward_residual.result())
            print(
                f"{name}: reference ({solver} forward) backward residual "
                f"{residual:.1e}"
            )
        layer = make_layer(cell, x, mode, solver, _ITERS.value)
        cosine, error = compare(
            flat(gradient_function(layer, x, weights)()), references[solver]
        )
        step = step_function(cell, x, mode, solver, _ITERS.value, False)
        seconds = timing.measure(
            lambda step=step: step().numpy(), _REPEATS.value, _WARMUP.value
        )
        rows.append(
            {
                "cell": name,
                "config": label,
                "solver": solver,
                "mode": mode,
                "step_seconds": seconds,
                "step_over_f": seconds["median"] / f_seconds["median"],
                "cosine": cosine,
                "relative_error": error,
            }
        )
        print(
            f"{name} {label}: step {1e3 * seconds['median']:.0f} ms, "
            f"cosine {cosine:.5f}, error {error:.2e}",
            flush=True,
        )
    return {"cell": name, "f_seconds": f_seconds, "configs": rows}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_CONFIGS.value) - set(CONFIGS))
    if unknown:
        raise app.UsageError(
            f"--configs takes {list(CONFIGS)}. Unknown: {unknown}"
        )
    results = [measure_cell(name) for name in _CELLS.value]
    table = []
    for result in results:
        for row in result["configs"]:
            table.append(
                [
                    row["cell"],
                    row["config"],
                    f"{1e3 * row['step_seconds']['median']:.0f} "
                    f"({timing.ms_range(row['step_seconds'])})",
                    f"{row['step_over_f']:.1f}",
                    f"{row['cosine']:.5f}",
                    f"{row['relative_error']:.2e}",
                ]
            )
    timing.print_table(
        ["cell", "backward", "step ms (range)", "step / f", "cosine", "error"],
        table,
    )
    timing.write_json(_OUTPUT.value, {"iters": _ITERS.value, "cells": results})


if __name__ == "__main__":
    app.run(main)
