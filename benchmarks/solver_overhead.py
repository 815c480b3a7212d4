r"""How much a forward solve costs beyond the evaluations of f it makes.

For each cell and solver, with a fixed number of iterations (a tolerance that
never triggers), measures one f call and one forward solve, and reports
solve / (NFE × f): 1.00 means the solver adds nothing to the f evaluations.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 \
      python -m benchmarks.solver_overhead --cells=mlp,conv --iters=12

Writes the raw numbers to `--output` (JSON). Each configuration is measured in
graph mode and with XLA; times are medians over `--repeats` after
`--warmup` untimed calls (which exclude tracing and compilation).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import cells  # noqa: E402
from benchmarks import timing  # noqa: E402
from keras_deq import solvers  # noqa: E402

_CELLS = flags.DEFINE_list("cells", ["mlp", "conv"], "Cells to measure.")
_SOLVERS = flags.DEFINE_list(
    "solvers", ["broyden", "anderson", "fixed_point"], "Solvers to measure."
)
_ITERS = flags.DEFINE_integer("iters", 12, "f evaluations per solve.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Override each cell's batch size."
)
_JIT = flags.DEFINE_list("jit_compile", ["false", "true"], "XLA settings.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed warm-up calls.")
_OUTPUT = flags.DEFINE_string(
    "output", "solver_overhead.json", "Where to write the JSON results."
)


def _compiled_solve(solver, f, iters, jit):
    # A tolerance no float32 solve reaches: every solve makes `iters` calls.
    return tf.function(lambda z0: solver(f, z0, iters, 1e-30), jit_compile=jit)


def measure_cell(name, solver_names, iters, jit, batch_size, repeats, warmup):
    cell, x = cells.make(name, batch_size)
    batch = x.shape[0]
    z = tf.random.normal(x.shape)

    def f_flat(z_flat):
        return tf.reshape(cell(tf.reshape(z_flat, x.shape), x), [batch, -1])

    z_flat = tf.reshape(z, [batch, -1])
    f_call = tf.function(f_flat, jit_compile=jit)
    f_time = timing.measure(lambda: f_call(z_flat).numpy(), repeats, warmup)
    rows = []
    zeros = tf.zeros_like(z_flat)
    for solver_name in solver_names:
        solve = _compiled_solve(solvers.get(solver_name), f_flat, iters, jit)
        nfe = int(tf.reduce_max(solve(zeros).nstep))
        solve_time = timing.measure(
            lambda solve=solve: solve(zeros).z.numpy(), repeats, warmup
        )
        rows.append(
            {
                "cell": name,
                "solver": solver_name,
                "jit_compile": jit,
                "batch_size": batch,
                "nfe": nfe,
                "f_seconds": f_time,
                "solve_seconds": solve_time,
                "ratio": solve_time["median"] / (nfe * f_time["median"]),
            }
        )
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = []
    for name in _CELLS.value:
        for jit in _JIT.value:
            results += measure_cell(
                name,
                _SOLVERS.value,
                _ITERS.value,
                jit.lower() == "true",
                _BATCH_SIZE.value,
                _REPEATS.value,
                _WARMUP.value,
            )
    timing.print_table(
        [
            "cell",
            "solver",
            "xla",
            "nfe",
            "f ms",
            "solve ms",
            "solve/(nfe*f)",
            "solve min-max ms",
        ],
        [
            [
                r["cell"],
                r["solver"],
                str(r["jit_compile"]),
                r["nfe"],
                f"{1e3 * r['f_seconds']['median']:.2f}",
                f"{1e3 * r['solve_seconds']['median']:.1f}",
                f"{r['ratio']:.2f}",
                timing.ms_range(r["solve_seconds"]),
            ]
            for r in results
        ],
    )
    timing.write_json(_OUTPUT.value, results)


if __name__ == "__main__":
    app.run(main)
