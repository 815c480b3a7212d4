r"""keras_deq (on TensorFlow and on JAX) side by side with TorchDEQ: the
same cells, weights, inputs and iteration counts, timed alternately in one
run.

    python -m venv /opt/torchdeq
    /opt/torchdeq/bin/pip install torch==2.13.0 torchdeq==0.1.0
    export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736
    python -m benchmarks.compare_torchdeq \
      --torch_python=/opt/torchdeq/bin/python

TorchDEQ runs in its own interpreter (`--torch_python`; by default this
one), in a worker process (`benchmarks/torchdeq_worker.py`, which imports
torch, torchdeq and NumPy only) that this script drives over a pipe, so
torch stays out of the project's environment. keras_deq on JAX runs in a
second worker (`benchmarks/jax_worker.py`, this interpreter with
`KERAS_BACKEND=jax`; `--nojax` leaves it out), since a process has one
Keras backend. If that interpreter cannot
import torch and torchdeq, the script says how to install them and exits
with status 0 without timing anything.

For each cell of `benchmarks/cells.py` the worker gets the Keras cell's
weights, its input x, a test state z and the loss weights R. Before
timing, the script checks that both libraries do the same arithmetic, and
stops if they do not: f(z, x), the `--iters`-step fixed-point iterate from
0, and the parameter gradient of the unrolled step (backpropagation through
the same `--iters` plain steps) must agree to `--check_tol` (relative),
between TensorFlow and TorchDEQ and between TensorFlow and JAX.

Then every row is timed alternately, keras_deq on TensorFlow, TorchDEQ,
keras_deq on JAX (each compiled: `tf.function`, `jax.jit`), `--repeats`
calls after `--warmup` untimed ones, medians:

- one f;
- the Broyden and Anderson forward solves at inference (`DEQLayer`,
  `training=False`; TorchDEQ's `get_deq(...)` in `eval()` mode under
  `no_grad`), exactly `--iters` evaluations (tolerance 1e-30);
- training steps (loss mean(z* ⊙ R), SGD): implicit backward with the
  forward's solver (`--iters` forward and backward iterations; TorchDEQ
  `ift=True`), the one-step phantom gradient (TorchDEQ's default
  `grad=1`), and unrolled backpropagation through `--iters` plain steps
  (a loop of the torch cell);
- keras_deq's `gradient="reuse"` steps with 0, 2, 4 refinements, which
  TorchDEQ does not have: their ratio is to TorchDEQ's implicit Anderson
  step, the reference of the step-time target.

The ratio columns are keras_deq ÷ TorchDEQ on each backend (below 1:
keras_deq is faster). Writes everything to `--output` (JSON).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import cells  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.cells import make_layer  # noqa: E402
from benchmarks.steps import gradient_function  # noqa: E402
from benchmarks.steps import step_function  # noqa: E402
from benchmarks.worker_loop import Worker  # noqa: E402

WORKER = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "torchdeq_worker.py"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = (
    "python -m venv /opt/torchdeq && /opt/torchdeq/bin/pip install "
    "torch==2.13.0 torchdeq==0.1.0, then pass "
    "--torch_python=/opt/torchdeq/bin/python"
)

# label: (what, solver, mode); mode None for rows without a training step.
ROWS = {
    "one f": ("f", None, None),
    "Broyden solve": ("solve", "broyden", None),
    "Anderson solve": ("solve", "anderson", None),
    "step, implicit, Anderson": ("step", "anderson", "implicit"),
    "step, implicit, Broyden": ("step", "broyden", "implicit"),
    "step, phantom (1 step), Broyden": ("step", "broyden", "phantom"),
    "step, unrolled": ("step", "fixed_point", "unrolled"),
}
# keras_deq only, compared with TorchDEQ's implicit Anderson step.
REUSE_ROWS = {
    f"step, reuse {k}, Broyden": ("step", "broyden", f"reuse{k}")
    for k in (0, 2, 4)
}
REFERENCE_ROW = "step, implicit, Anderson"

_CELLS = flags.DEFINE_list("cells", ["conv", "transformer"], "Cells.")
_ITERS = flags.DEFINE_integer("iters", 12, "Forward (and backward) iterations.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Override each cell's batch size."
)
_REUSE = flags.DEFINE_bool("reuse", True, "Time the reuse steps too.")
_JAX = flags.DEFINE_bool("jax", True, "Time keras_deq on JAX too.")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python",
    sys.executable,
    "Interpreter that has torch and torchdeq installed.",
)
_CHECK_TOL = flags.DEFINE_float(
    "check_tol", 1e-3, "Largest relative difference the arithmetic check takes."
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 10, "Timed calls per row and library."
)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls before timing.")
_OUTPUT = flags.DEFINE_string(
    "output", "compare_torchdeq.json", "Where to write the JSON results."
)


def torchdeq_missing(python):
    """Why `python` cannot run TorchDEQ, or None if it can."""
    try:
        done = subprocess.run(
            [python, "-c", "import torch, torchdeq"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except OSError as error:
        return f"--torch_python={python} cannot be run ({error})"
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return (
            f"--torch_python={python} cannot import torch and torchdeq ({last})"
        )
    return None


def relative_difference(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def jax_worker():
    """keras_deq on JAX, in this interpreter under `KERAS_BACKEND=jax`."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    command = [sys.executable, "-m", "benchmarks.jax_worker"]
    return Worker(command, "JAX", env, cwd=ROOT)


def check_arithmetic(name, cell, x, z, r, workers, directory):
    """Sends the cell to the workers; per worker, the relative differences
    of f, the fixed-point iterate and the unrolled gradient from
    TensorFlow's."""
    iters = _ITERS.value
    path = os.path.join(directory, f"{name}.npz")
    np.savez(
        path,
        x=x.numpy(),
        z=z.numpy(),
        r=r.numpy(),
        **{
            f"w:{k}": v.numpy()
            for k, v in zip(
                cells.weight_names(cell, cell.weights),
                cell.weights,
                strict=True,
            )
        },
    )
    iterate = tf.zeros_like(x)
    for _ in range(iters):
        iterate = cell(iterate, x)
    layer = make_layer(cell, x, "unrolled", "fixed_point", iters)
    grads = gradient_function(layer, x, r)()
    ours = np.concatenate([np.ravel(g.numpy()) for g in grads])
    checks = {}
    for key, worker in workers.items():
        theirs = np.load(
            worker("cell", name=name, arrays=path, iters=iters)["path"]
        )
        reference = np.concatenate(
            [
                np.ravel(theirs[f"g:{k}"])
                for k in cells.weight_names(cell, layer.trainable_variables)
            ]
        )
        checks[key] = {
            "f": relative_difference(cell(z, x).numpy(), theirs["f"]),
            "fixed_point_iterate": relative_difference(
                iterate.numpy(), theirs["fixed_point"]
            ),
            "unrolled_gradient": relative_difference(ours, reference),
        }
    return checks


def keras_function(cell, x, r, what, solver, mode):
    """The keras_deq call to time, and its forward NFE."""
    iters = _ITERS.value
    if what == "f":
        z = tf.random.normal(x.shape, seed=5)
        f = tf.function(lambda: cell(z, x))
        return lambda: f().numpy(), 1
    if what == "solve":
        layer = make_layer(cell, x, "implicit", solver, iters)
        solve = tf.function(lambda: layer(x, training=False))
        solve()
        nfe = float(layer.forward_nfe.result())
        return lambda: solve().numpy(), nfe
    step = step_function(cell, x, mode, solver, iters, False, weights=r)
    return lambda: step().numpy(), iters


def print_check(name, checks):
    for key, check in checks.items():
        print(
            f"{name}: relative difference keras_deq (TensorFlow) vs {key}: f "
            f"{check['f']:.1e}, {_ITERS.value}-step iterate "
            f"{check['fixed_point_iterate']:.1e}, unrolled gradient "
            f"{check['unrolled_gradient']:.1e}",
            flush=True,
        )
        worst = max(check.values())
        if worst > _CHECK_TOL.value:
            raise SystemExit(
                f"{name}: keras_deq on TensorFlow and {key} compute different "
                f"things (relative difference {worst:.2e} > --check_tol="
                f"{_CHECK_TOL.value}); not timing it."
            )


def time_in(worker, what, solver, mode):
    answer = worker(
        "time",
        what=what,
        solver=solver,
        mode=mode,
        iters=_ITERS.value,
        warmup=_WARMUP.value,
        repeats=_REPEATS.value,
    )
    return timing.summary(answer["seconds"]), answer["nfe"]


def measure_cell(name, workers, directory):
    cell, x = cells.make(name, _BATCH_SIZE.value)
    rng = np.random.default_rng(7)
    r = tf.constant(rng.normal(size=x.shape), x.dtype)
    z = tf.constant(rng.normal(size=x.shape), x.dtype)
    checks = check_arithmetic(name, cell, x, z, r, workers, directory)
    print_check(name, checks)
    rows = []
    reuse = REUSE_ROWS if _REUSE.value else {}
    for label, (what, solver, mode) in {**ROWS, **reuse}.items():
        call, nfe = keras_function(cell, x, r, what, solver, mode)
        row = {
            "label": label,
            "keras_deq": timing.measure(call, _REPEATS.value, _WARMUP.value),
            "keras_deq_nfe": nfe,
        }
        if label in ROWS:
            row["torchdeq"], row["torchdeq_nfe"] = time_in(
                workers["TorchDEQ"], what, solver, mode
            )
        if "JAX" in workers:
            row["keras_deq_jax"], row["keras_deq_jax_nfe"] = time_in(
                workers["JAX"], what, solver, mode
            )
        rows.append(row)
        print(
            f"{name} {label}: "
            + ", ".join(
                f"{who} {1e3 * row[key]['median']:.1f} ms"
                for who, key in COLUMNS.items()
                if key in row
            ),
            flush=True,
        )
    reference = next(r for r in rows if r["label"] == REFERENCE_ROW)
    for row in rows:
        against = row.get("torchdeq", reference["torchdeq"])
        row["ratio"] = row["keras_deq"]["median"] / against["median"]
        if "keras_deq_jax" in row:
            row["ratio_jax"] = (
                row["keras_deq_jax"]["median"] / against["median"]
            )
        row["ratio_to"] = "same row" if "torchdeq" in row else REFERENCE_ROW
    return {
        "cell": name,
        "batch_size": int(x.shape[0]),
        "check": checks,
        "rows": rows,
    }


# Who, and where a row keeps their time.
COLUMNS = {
    "keras_deq TF": "keras_deq",
    "TorchDEQ": "torchdeq",
    "keras_deq JAX": "keras_deq_jax",
}


def table_rows(results):
    def ms(row, key):
        return f"{1e3 * row[key]['median']:.1f}" if key in row else "-"

    def ratio(row, key):
        if key not in row:
            return "-"
        return f"{row[key]:.2f}" + ("" if "torchdeq" in row else " *")

    return [
        [
            result["cell"],
            row["label"],
            *(ms(row, key) for key in COLUMNS.values()),
            ratio(row, "ratio"),
            ratio(row, "ratio_jax"),
        ]
        for result in results
        for row in result["rows"]
    ]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_CELLS.value) - set(cells.CELLS))
    if unknown:
        raise app.UsageError(
            f"--cells takes {sorted(cells.CELLS)}. Unknown: {unknown}"
        )
    missing = torchdeq_missing(_TORCH_PYTHON.value)
    if missing:
        print(f"Skipped: TorchDEQ is not available: {missing}.")
        print(f"To compare, {INSTALL}.")
        timing.write_json(_OUTPUT.value, {"skipped": missing})
        return
    workers = {
        "TorchDEQ": Worker([_TORCH_PYTHON.value, WORKER], "TorchDEQ", cwd=ROOT)
    }
    if _JAX.value:
        workers["JAX"] = jax_worker()
    try:
        versions = {key: worker("versions") for key, worker in workers.items()}
        with tempfile.TemporaryDirectory() as directory:
            results = [
                measure_cell(name, workers, directory) for name in _CELLS.value
            ]
    finally:
        for worker in workers.values():
            worker.close()
    torch_versions = versions["TorchDEQ"]
    print(
        f"T = {_ITERS.value}; medians of {_REPEATS.value} after "
        f"{_WARMUP.value} warm-ups; TorchDEQ {torch_versions['torchdeq']} on "
        f"torch {torch_versions['torch']} ({torch_versions['threads']} "
        "threads)"
        + (
            f"; JAX {versions['JAX']['jax']} ({versions['JAX']['device']})"
            if "JAX" in versions
            else ""
        )
        + "; ratio: keras_deq ÷ TorchDEQ, * ÷ TorchDEQ's implicit Anderson"
        " step"
    )
    timing.print_table(
        [
            "cell",
            "what",
            *(f"{who} ms" for who in COLUMNS),
            "TF ratio",
            "JAX ratio",
        ],
        table_rows(results),
    )
    timing.write_json(
        _OUTPUT.value,
        {
            "iters": _ITERS.value,
            "torch": torch_versions,
            "jax": versions.get("JAX"),
            "cells": results,
        },
    )


if __name__ == "__main__":
    app.run(main)
