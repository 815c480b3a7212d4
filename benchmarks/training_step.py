r"""Time of one training step through a DEQLayer, per gradient mode.

Loss = mean(z*²); forward solves take a fixed `--iters` evaluations (a
tolerance that never triggers), the implicit backward `--iters`
vector-Jacobian products, the phantom gradient one step and the unrolled
gradient backpropagates through `--iters` iterations. Each mode is timed
with the Jacobian penalty off and on (p = 1, M = 1, so every step computes
it), and the table gives the ratio on / off.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 \
      python -m benchmarks.training_step --cells=mlp,conv --iters=12

Reports the time of the first step (tracing, and XLA compilation under
`--jit_compile`) on its own, then the median step time over `--repeats`
after `--warmup` untimed steps and each mode's ratio to the unrolled step;
writes the raw numbers to `--output` (JSON).
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import cells  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks.cells import MODES  # noqa: E402
from benchmarks.steps import step_function  # noqa: E402

_CELLS = flags.DEFINE_list("cells", ["mlp", "conv"], "Cells to measure.")
_MODES = flags.DEFINE_list("modes", list(MODES), "Gradient modes.")
_JACOBIAN = flags.DEFINE_list(
    "jacobian", ["off", "on"], "Jacobian penalty settings to time: off, on."
)
_SOLVER = flags.DEFINE_string("solver", "broyden", "Forward/backward solver.")
_ITERS = flags.DEFINE_integer("iters", 12, "Forward (and backward) iterations.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Override each cell's batch size."
)
_JIT = flags.DEFINE_bool("jit_compile", False, "Compile the step with XLA.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed warm-up steps.")
_OUTPUT = flags.DEFINE_string(
    "output", "training_step.json", "Where to write the JSON results."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for value in _JACOBIAN.value:
        if value not in ("off", "on"):
            raise app.UsageError(
                f"--jacobian takes off and/or on. Got {_JACOBIAN.value}"
            )
    results = []
    for name in _CELLS.value:
        cell, x = cells.make(name, _BATCH_SIZE.value)
        for mode in _MODES.value:
            for jac in _JACOBIAN.value:
                step = step_function(
                    cell,
                    x,
                    mode,
                    _SOLVER.value,
                    _ITERS.value,
                    _JIT.value,
                    jacobian=jac == "on",
                )
                start = time.perf_counter()
                step().numpy()  # traces (and compiles, under XLA)
                first_call = time.perf_counter() - start
                seconds = timing.measure(
                    lambda step=step: step().numpy(),
                    _REPEATS.value,
                    _WARMUP.value,
                )
                results.append(
                    {
                        "cell": name,
                        "mode": mode,
                        "jacobian": jac == "on",
                        "solver": _SOLVER.value,
                        "iters": _ITERS.value,
                        "jit_compile": _JIT.value,
                        "batch_size": int(x.shape[0]),
                        "step_seconds": seconds,
                        "first_call_seconds": first_call,
                    }
                )
    median = {
        (r["cell"], r["mode"], r["jacobian"]): r["step_seconds"]["median"]
        for r in results
    }
    for r in results:
        unrolled = median.get((r["cell"], "unrolled", r["jacobian"]))
        off = median.get((r["cell"], r["mode"], False))
        here = r["step_seconds"]["median"]
        r["ratio_to_unrolled"] = here / unrolled if unrolled else None
        r["ratio_to_penalty_off"] = here / off if off else None

    def ratio(value):
        return "-" if value is None else f"{value:.2f}"

    timing.print_table(
        [
            "cell",
            "mode",
            "penalty",
            "step ms",
            "min-max ms",
            "/ unrolled",
            "/ off",
            "first call s",
        ],
        [
            [
                r["cell"],
                r["mode"],
                "on" if r["jacobian"] else "off",
                f"{1e3 * r['step_seconds']['median']:.1f}",
                timing.ms_range(r["step_seconds"]),
                ratio(r["ratio_to_unrolled"]),
                ratio(r["ratio_to_penalty_off"]) if r["jacobian"] else "-",
                f"{r['first_call_seconds']:.1f}",
            ]
            for r in results
        ],
    )
    timing.write_json(_OUTPUT.value, results)


if __name__ == "__main__":
    app.run(main)
