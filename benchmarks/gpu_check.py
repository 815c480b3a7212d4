r"""Training steps of the paper's models on a GPU, with JAX, beside TorchDEQ.

For a machine that has JAX (with CUDA) and PyTorch but neither TensorFlow
nor Keras. From the repository root:

    python3 -m benchmarks.gpu_check            # the paper's sizes, < 5 min
    python3 -m benchmarks.gpu_check --tiny     # tiny sizes (CPU, the tests)

Keras, keras-hub and TorchDEQ, if they cannot be imported, are installed
from the wheels in `--wheels` (by default `benchmarks/wheels`, beside this
file; git ignores it) into `--site` with `pip --no-index --no-deps`. To
prepare them on a machine with network access, for the GPU machine's
Python (3.12 here), name what its image lacks (here: Keras, keras-hub,
namex, optree and TorchDEQ; add any other that an import error names):

    python3 -m pip download --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d benchmarks/wheels \
        keras==3.15.1 keras-hub==0.32.0 namex optree torchdeq==0.1.0

(keras-hub is installed without its dependencies: it asks for
tensorflow-text, which would bring TensorFlow; on import it needs regex
and tokenizers, which the image has.)

Rows, each in a process of its own (so that its peak memory is its own and
JAX and PyTorch never hold the GPU at once); SGD steps on a fixed
batch, `--warmup` untimed (the first compiles) then `--repeats` timed,
medians:

- `MDEQ`: `MDEQClassifier(10, **MDEQClassifier.PAPER_CIFAR10)`, the
  paper's CIFAR-10 model (Table 4: widths 28-224, implicit gradient,
  7 forward / 8 backward Broyden iterations), batch 96 of 32×32×3;
- `DEQ-Transformer`: `DEQTransformerLM` at width 700 (10 heads,
  feed-forward 48000), sequences of 150 tokens, batch 60, a vocabulary of
  `--vocab_size` (the paper's adaptive softmax over 267k words is not
  built here);
- `conv cell`, `transformer cell`: the cells of `benchmarks/cells.py`
  (those of `compare_torchdeq.py`) at batch 96 and 60: keras_deq on JAX
  and TorchDEQ with the same weights, the implicit gradient with
  Anderson's solver, `--iters` forward and backward iterations.

Each row reports the forward NFE (of one call outside the step), the step
time and the peak memory of the device (JAX's `peak_bytes_in_use`,
PyTorch's `max_memory_allocated`; none on a CPU). Prints one table and
writes `--output` (JSON).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.worker_loop import Worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "torchdeq_worker.py")

# Row: (what, paper sizes, tiny sizes).
ROWS = {
    "MDEQ": (
        "mdeq",
        {"batch": 96},
        {"batch": 4, "widths": [8, 16], "num_groups": 4, "expansion": 1},
    ),
    "DEQ-Transformer": (
        "lm",
        {"batch": 60, "length": 150, "hidden_dim": 700, "num_heads": 10},
        {
            "batch": 2,
            "length": 8,
            "hidden_dim": 16,
            "num_heads": 2,
            "intermediate_dim": 32,
        },
    ),
    "conv cell": ("cell:conv", {"batch": 96}, {"batch": 2}),
    "transformer cell": ("cell:transformer", {"batch": 60}, {"batch": 2}),
}


def parse(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes.")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="Comma-separated rows."
    )
    parser.add_argument("--iters", type=int, default=8, help="Cells' T.")
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--wheels", default=os.path.join(HERE, "wheels"), help="Wheel folder."
    )
    parser.add_argument(
        "--site",
        default=os.path.join(tempfile.gettempdir(), "keras_deq_gpu_site"),
        help="Where missing packages are installed.",
    )
    parser.add_argument(
        "--torch_python",
        default=sys.executable,
        help="Interpreter that has torch (TorchDEQ comes from --wheels).",
    )
    parser.add_argument("--output", default="gpu_check.json")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a child's row
    args = parser.parse_args(argv)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"--rows takes {list(ROWS)}. Unknown: {unknown}")
    for name in ("iters", "vocab_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (it compiles), got {args.warmup}")
    return args


def missing(modules, python=sys.executable, path=None):
    """The modules of `modules` that `python` cannot import."""
    code = (
        "import importlib.util, sys; print(','.join(m for m in sys.argv[1:] "
        "if importlib.util.find_spec(m) is None))"
    )
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(
            [path, env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
    done = subprocess.run(
        [python, "-c", code, *modules],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return [m for m in done.stdout.strip().split(",") if m]


def install(modules, args):
    """Installs the wheels in `--wheels` into `--site` if `modules` are
    missing; returns the path to add, or raises with what to do."""
    lacking = missing(modules, path=args.site)
    if not lacking:
        return args.site
    wheels = (
        sorted(
            os.path.join(args.wheels, f)
            for f in os.listdir(args.wheels)
            if f.endswith(".whl")
        )
        if os.path.isdir(args.wheels)
        else []
    )
    if not wheels:
        raise SystemExit(
            f"{', '.join(lacking)} cannot be imported and --wheels="
            f"{args.wheels} holds no wheels. Prepare them as this script's "
            "docstring says (`pip download ...`), or install the packages."
        )
    print(f"Installing {len(wheels)} wheels from {args.wheels} for {lacking}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            args.site,
            *wheels,
        ],
        check=True,
    )
    still = missing(modules, path=args.site)
    if still:
        raise SystemExit(f"The wheels in {args.wheels} lack {still}.")
    return args.site


def child(args, row, site):
    """Runs `row` in a new process; its one JSON line."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "PYTHONPATH": os.pathsep.join([ROOT, site]),
    }
    command = [sys.executable, "-m", "benchmarks.gpu_check", f"--row={row}"]
    for name in ("iters", "vocab_size", "warmup", "repeats", "site"):
        command.append(f"--{name}={getattr(args, name)}")
    if args.tiny:
        command.append("--tiny")
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT
    )
    if done.returncode:
        raise SystemExit(f"Row {row} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- In a row's process (JAX) -------------------------------------------


def _jax_row(args):
    import jax
    import keras
    import numpy as np
    from keras import ops

    from benchmarks import cells
    from benchmarks.jax_steps import TrainStep
    from keras_deq.models import DEQTransformerLM
    from keras_deq.models import MDEQClassifier

    name = args.row
    what, paper, tiny = ROWS[name]
    sizes = tiny if args.tiny else paper
    rng = np.random.default_rng(0)
    batch = sizes["batch"]
    extra = {}
    if what == "mdeq":
        options = {k: v for k, v in sizes.items() if k != "batch"}
        if "widths" in options:
            options["widths"] = tuple(options["widths"])
        model = MDEQClassifier(
            10, seed=0, **{**MDEQClassifier.PAPER_CIFAR10, **options}
        )
        inputs = ops.convert_to_tensor(
            rng.normal(size=(batch, 32, 32, 3)), "float32"
        )
        labels = ops.convert_to_tensor(rng.integers(0, 10, batch))
        deq = model.deq
    elif what == "lm":
        vocab = 50 if args.tiny else args.vocab_size
        options = {
            k: v for k, v in sizes.items() if k not in ("batch", "length")
        }
        model = DEQTransformerLM(vocab, seed=0, **options)
        inputs = ops.convert_to_tensor(
            rng.integers(0, vocab, (batch, sizes["length"])), "int32"
        )
        labels = ops.convert_to_tensor(
            rng.integers(0, vocab, (batch, sizes["length"])), "int32"
        )
        deq = model.deq
    else:
        cell, inputs = cells.make(what.split(":")[1], batch)
        model = deq = cells.make_layer(
            cell, inputs, "implicit", "anderson", args.iters
        )
        weights = ops.convert_to_tensor(
            rng.normal(size=inputs.shape), "float32"
        )
        path = os.path.join(
            tempfile.gettempdir(), f"gpu_check_{os.getpid()}_cell.npz"
        )
        z = rng.normal(size=inputs.shape).astype("float32")
        names = cells.weight_names(cell, cell.weights)
        np.savez(
            path,
            x=np.asarray(inputs),
            z=z,
            r=np.asarray(weights),
            **{
                f"w:{k}": np.asarray(v.value)
                for k, v in zip(names, cell.weights, strict=True)
            },
        )
        extra["arrays"] = path
    model(inputs)  # an eager call: builds, and records the forward NFE
    nfe = float(deq.forward_nfe.result())

    if what in ("mdeq", "lm"):

        def loss(logits):
            return ops.mean(
                keras.losses.sparse_categorical_crossentropy(
                    labels, logits, from_logits=True
                )
            )

    else:

        def loss(z):
            return ops.mean(z * weights)

    step = TrainStep(model, inputs, loss)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "row": name,
        "library": "keras_deq (JAX)",
        "device": str(jax.devices()[0]),
        "batch": batch,
        "nfe": nfe,
        "step_ms": 1e3 * statistics.median(seconds),
        "warmup_s": first,
        "peak_mb": None if peak is None else peak / 2**20,
        "parameters": int(
            sum(np.prod(v.shape) for v in model.trainable_variables)
        ),
        **extra,
    }


def _torchdeq_row(args, name, arrays):
    """TorchDEQ on a cell's weights, in the TorchDEQ worker process."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [args.site, os.environ.get("PYTHONPATH", "")]
        ),
    }
    worker = Worker([args.torch_python, WORKER], "TorchDEQ", env)
    try:
        versions = worker("versions")
        device = "cuda" if versions["gpu"] else "cpu"
        worker(
            "cell",
            name=ROWS[name][0].split(":")[1],
            arrays=arrays,
            iters=args.iters,
            device=device,
        )
        answer = worker(
            "time",
            what="step",
            solver="anderson",
            mode="implicit",
            iters=args.iters,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    finally:
        worker.close()
    return {
        "row": name,
        "library": f"TorchDEQ {versions['torchdeq']}",
        "device": versions["gpu"] or "cpu",
        "nfe": answer["nfe"],
        "step_ms": 1e3 * statistics.median(answer["seconds"]),
        "peak_mb": answer["peak_mb"],
    }


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.row:
        print(json.dumps(_jax_row(args)))
        return
    start = time.perf_counter()
    os.makedirs(args.site, exist_ok=True)
    site = install(["keras", "keras_hub"], args)
    torch_missing = missing(["torch"], python=args.torch_python)
    if not torch_missing and missing(
        ["torchdeq"], python=args.torch_python, path=site
    ):
        install(["torchdeq"], args)
    results = []
    for name in args.rows.split(","):
        row = child(args, name, site)
        results.append(row)
        print(f"{name}: keras_deq (JAX) {row['step_ms']:.1f} ms", flush=True)
        if "arrays" in row:
            if torch_missing:
                results.append({"row": name, "skipped": "torch is missing"})
            else:
                results.append(_torchdeq_row(args, name, row["arrays"]))
            os.remove(row.pop("arrays"))
    total = time.perf_counter() - start
    header = ["row", "library", "device", "batch", "NFE", "step ms", "peak MB"]
    lines = []
    for r in results:
        if "skipped" in r:
            lines.append([r["row"], "TorchDEQ", f"skipped: {r['skipped']}"])
            continue
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            [
                r["row"],
                r["library"],
                r["device"],
                str(r.get("batch", "")),
                f"{r['nfe']:.1f}",
                f"{r['step_ms']:.1f}",
                peak,
            ]
        )
    widths = [
        max(len(line[i]) for line in [header] + lines if i < len(line))
        for i in range(len(header))
    ]
    for line in [header] + lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)))
    print(
        f"medians of {args.repeats} steps after {args.warmup} "
        f"(compiling); whole run {total:.0f} s"
    )
    with open(args.output, "w") as fh:
        json.dump({"rows": results, "seconds": total, "tiny": args.tiny}, fh)


if __name__ == "__main__":
    main()
