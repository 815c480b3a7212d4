r"""Which training makes the digits MDEQ an equilibrium model: a lever table.

    python -m benchmarks.mdeq_equilibrium --levers=unrolled,implicit_penalty
    python -m benchmarks.mdeq_equilibrium --seeds=0,1,2 --levers=all

Trains `MDEQClassifier(10, widths=(16, 32, 64, 128))` on scikit-learn's
digits with the recipe of `benchmarks/mdeq_digits.py` (Adam 1e-3, batch
64, `--epochs` epochs), one run per lever and seed, then measures it with
`keras_deq.diagnostics.equilibrium_report` on the 400 held-out images:
accuracy, median residual, the fraction of samples within tol and the NFE
at 1× and 4× the trained budget, and the agreement of the predictions
reached from `--starts` random first iterates (σ = 1) with the default
start. Levers (model arguments over the defaults, and a training override):

- `unrolled`: the defaults (7 unrolled steps, γ 0.5, p 0.05);
- `implicit`: `gradient="implicit"`;
- `implicit_penalty`: implicit, γ 1, p 1;
- `phantom_penalty`: `gradient="phantom"` (Jacobian-free), γ 1, p 1;
- `implicit_penalty_random`: implicit, γ 1, p 1, and every training solve
  starts from N(0, 1) noise around the first iterate;
- `unrolled_random`: the defaults with those random starts.

Prints one row per run and writes them to `--output` (JSON); `--plot`
draws accuracy and residual against the test-time iterations.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import json  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks.digits import WIDTHS  # noqa: E402
from benchmarks.digits import digits_images  # noqa: E402
from keras_deq import diagnostics  # noqa: E402
from keras_deq.models import MDEQClassifier  # noqa: E402

PENALTY = {"jac_weight": 1.0, "jac_freq": 1.0}
LEVERS = {
    "unrolled": ({}, None),
    "implicit": ({"gradient": "implicit"}, None),
    "implicit_penalty": ({"gradient": "implicit", **PENALTY}, None),
    "phantom_penalty": ({"gradient": "phantom", **PENALTY}, None),
    "implicit_penalty_random": ({"gradient": "implicit", **PENALTY}, 1.0),
    "unrolled_random": ({}, 1.0),
    "phantom_penalty_random": ({"gradient": "phantom", **PENALTY}, 1.0),
    "phantom_correction_random": (
        {"gradient": "phantom", "correction_weight": 1.0},
        1.0,
    ),
    "phantom_penalty_correction_random": (
        {"gradient": "phantom", "correction_weight": 1.0, **PENALTY},
        1.0,
    ),
    "phantom_penalty_random_12": (
        {"gradient": "phantom", "max_iter": 12, **PENALTY},
        1.0,
    ),
    "phantom_penalty4_random": (
        {"gradient": "phantom", "jac_weight": 4.0, "jac_freq": 1.0},
        1.0,
    ),
}

_LEVERS = flags.DEFINE_list(
    "levers", ["unrolled", "implicit_penalty"], f"Of {sorted(LEVERS)}, or all."
)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, one run per lever each.")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Epochs (22 steps each).")
_STARTS = flags.DEFINE_integer("starts", 2, "Random first iterates.")
_BUDGETS = flags.DEFINE_list("budgets", ["1", "4"], "Multiples of max_iter.")
_OUTPUT = flags.DEFINE_string(
    "output", "mdeq_equilibrium.json", "Where to write the JSON results."
)
_PLOT = flags.DEFINE_string("plot", None, "A PNG of the reports, if given.")


def train(lever, seed, epochs, budgets, starts):
    """One run: the trained model's equilibrium report and its time."""
    model_kwargs, random_start = LEVERS[lever]
    keras.utils.set_random_seed(seed)
    (x, y), (x_test, y_test) = digits_images()
    model = MDEQClassifier(10, widths=WIDTHS, seed=seed, **model_kwargs)
    if random_start is not None:
        model.deq.override_training(random_start=random_start)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    report = diagnostics.equilibrium_report(
        model,
        x_test,
        y_test,
        metric="sparse_categorical_accuracy",
        budgets=budgets,
        num_starts=starts,
    )
    return {
        "lever": lever,
        "seed": seed,
        "model_kwargs": model_kwargs,
        "random_start": random_start,
        "train_seconds": seconds,
        "train_forward_nfe": float(
            history.history[f"{model.deq.name}_forward_nfe"][-1]
        ),
        "report": report,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    levers = list(LEVERS) if _LEVERS.value == ["all"] else _LEVERS.value
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise app.UsageError(
            f"--levers takes {sorted(LEVERS)} or all. Unknown: {unknown}"
        )
    try:
        budgets = [float(b) for b in _BUDGETS.value]
    except ValueError:
        raise app.UsageError(
            f"--budgets takes numbers. Got {_BUDGETS.value}"
        ) from None
    runs = []
    print(
        "lever                    seed  acc@1x acc@4x  res@1x   res@4x  "
        "in-tol@4x  NFE@4x  path  seconds"
    )
    for seed in [int(s) for s in _SEEDS.value]:
        for lever in levers:
            run = train(lever, seed, _EPOCHS.value, budgets, _STARTS.value)
            runs.append(run)
            first, last = run["report"]["rows"][0], run["report"]["rows"][-1]
            path = run["report"]["path"]
            print(
                f"{lever:24s} {seed:4d}  {first['metric']:.4f} "
                f"{last['metric']:.4f}  {first['residual_median']:.2e} "
                f"{last['residual_median']:.2e}  {last['within_tol']:8.3f}"
                f"  {last['nfe']:6.2f}  "
                f"{path['agreement'] if path else float('nan'):.3f}"
                f"  {run['train_seconds']:7.1f}",
                flush=True,
            )
            with open(_OUTPUT.value, "w") as f:
                json.dump({"runs": runs}, f, indent=1)
    if _PLOT.value:
        diagnostics.plot_report(
            {f"{r['lever']} (seed {r['seed']})": r["report"] for r in runs},
            _PLOT.value,
            title="digits MDEQ: held-out accuracy and residual",
        )


if __name__ == "__main__":
    app.run(main)
