r"""Peak memory of one training step against the number of solver iterations.

Each configuration runs in a fresh process: it builds the cell and a
compiled training step (loss = mean(z*²), as in `training_step.py`) and
traces it without running it, resets the kernel's peak-RSS counter
(`/proc/self/clear_refs`), takes the current RSS as the baseline, runs the
step once and reports the peak minus the baseline. (A second run would show
almost nothing: the allocators keep the first run's memory and reuse it.)
Implicit gradients should stay flat in `max_iter`; unrolled ones grow.

    python -m benchmarks.memory --cells=mlp,conv,transformer \
        --iters=6,12,24,48 --modes=implicit,unrolled
    python -m benchmarks.memory --cells=conv --modes=implicit \
        --broyden_memory=4 --output=memory_m4.json --plot=memory_m4.png

Writes `--output` (JSON) and, with matplotlib installed, `--plot` (PNG).
Linux only (it reads /proc).
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import timing  # noqa: E402
from examples import plotting  # noqa: E402

_CELLS = flags.DEFINE_list("cells", ["mlp", "conv", "transformer"], "Cells.")
_ITERS = flags.DEFINE_list("iters", ["6", "12", "24", "48"], "max_iter values.")
_MODES = flags.DEFINE_list("modes", ["implicit", "unrolled"], "Gradients.")
_SOLVER = flags.DEFINE_string("solver", "broyden", "Forward/backward solver.")
_MEMORY = flags.DEFINE_integer(
    "broyden_memory",
    None,
    "Broyden's `memory` option (rank-one pairs kept); unset keeps them all.",
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Override each cell's batch size."
)
_OUTPUT = flags.DEFINE_string("output", "memory.json", "JSON results.")
_PLOT = flags.DEFINE_string("plot", "memory.png", "PNG plot ('' for none).")
_CHILD = flags.DEFINE_string(
    "child", None, "Internal: measure one 'cell:mode:iters' and print JSON."
)


def _status_mb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_child(cell_name, mode, iters, solver, batch_size, memory):
    """Runs in the fresh process: the step's peak RSS above its baseline."""
    from benchmarks import cells
    from benchmarks import steps

    cell, x = cells.make(cell_name, batch_size)
    options = {"memory": memory} if memory and solver == "broyden" else None
    step = steps.step_function(
        cell, x, mode, solver, iters, False, solver_options=options
    )
    step.get_concrete_function()  # trace only: the graph is not memory
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
    baseline = _status_mb("VmRSS")
    step().numpy()
    peak = _status_mb("VmHWM")
    return {
        "cell": cell_name,
        "mode": mode,
        "iters": iters,
        "solver": solver,
        "broyden_memory": memory if options else None,
        "batch_size": int(x.shape[0]),
        "baseline_mb": baseline,
        "peak_mb": peak,
        "step_mb": peak - baseline,
    }


def run_child(cell, mode, iters):
    argv = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        f"--child={cell}:{mode}:{iters}",
        f"--solver={_SOLVER.value}",
    ]
    if _MEMORY.value:
        argv.append(f"--broyden_memory={_MEMORY.value}")
    if _BATCH_SIZE.value:
        argv.append(f"--batch_size={_BATCH_SIZE.value}")
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        check=False,
    )
    if done.returncode:
        raise RuntimeError(
            f"measuring {cell}/{mode}/{iters} failed:\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(results, path):
    try:
        plt = plotting.pyplot()
    except ImportError:
        print("matplotlib not installed: no plot")
        return

    cell_names = sorted({r["cell"] for r in results})
    fig, axes = plt.subplots(
        1, len(cell_names), figsize=(4.5 * len(cell_names), 3.5), squeeze=False
    )
    for ax, name in zip(axes[0], cell_names, strict=True):
        for mode in sorted({r["mode"] for r in results}):
            rows = [
                r for r in results if r["cell"] == name and r["mode"] == mode
            ]
            ax.plot(
                [r["iters"] for r in rows],
                [r["step_mb"] for r in rows],
                "o-",
                label=mode,
            )
        ax.set_title(f"{name} cell")
        ax.set_xlabel("max_iter")
        ax.set_ylabel("peak MB above baseline")
        ax.legend()
    plotting.save(fig, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CHILD.value:
        cell, mode, iters = _CHILD.value.split(":")
        result = measure_child(
            cell,
            mode,
            int(iters),
            _SOLVER.value,
            _BATCH_SIZE.value,
            _MEMORY.value,
        )
        print(json.dumps(result))
        return
    results = [
        run_child(cell, mode, int(iters))
        for cell in _CELLS.value
        for mode in _MODES.value
        for iters in _ITERS.value
    ]
    for r in results:
        first = next(
            q
            for q in results
            if q["cell"] == r["cell"] and q["mode"] == r["mode"]
        )
        r["ratio_to_first"] = r["step_mb"] / max(first["step_mb"], 1e-9)
    timing.print_table(
        ["cell", "mode", "max_iter", "step MB", "/ smallest max_iter"],
        [
            [
                r["cell"],
                r["mode"],
                str(r["iters"]),
                f"{r['step_mb']:.1f}",
                f"{r['ratio_to_first']:.2f}",
            ]
            for r in results
        ],
    )
    timing.write_json(_OUTPUT.value, results)
    if _PLOT.value:
        plot(results, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
