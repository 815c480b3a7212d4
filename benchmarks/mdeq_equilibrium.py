r"""Which training makes the digits MDEQ an equilibrium model: a lever table.

    python -m benchmarks.mdeq_equilibrium --levers=unrolled,implicit_penalty
    python -m benchmarks.mdeq_equilibrium --seeds=0,1,2 --levers=all

Trains `MDEQClassifier(10, widths=(16, 32, 64, 128))` on scikit-learn's
digits with the digits recipe (Adam 1e-3, batch 64, `--epochs`
epochs), one run per lever and seed, then measures it with
`keras_deq.diagnostics.equilibrium_report` on the 400 held-out images:
accuracy, median residual, the fraction of samples within tol and the NFE
at 1× and 4× the trained budget, and the agreement of the predictions
reached from `--starts` random first iterates (σ = 1) with the default
start, and the fraction within 1e-2. Levers (model arguments; all but
`defaults` start from the model's former defaults, `BEFORE`):

- `unrolled`: the former defaults (7 unrolled steps, γ 0.5, p 0.05);
- `implicit` / `phantom`: that gradient (`gradient="phantom"`: one
  Jacobian-free step from z*) in place of the unrolled one;
- `penalty`: γ 1, p 1 (`penalty05`: γ 0.5, `penalty4`: γ 4);
- `random`: every training solve starts from N(0, 1) noise around the
  zero first iterate (`random_start=1.0`);
- `correction`: the fixed-point correction loss, λ 1 over 3 iterates;
- `_12`: 12 forward iterations instead of 7;
- `defaults`: the model's defaults as they are now (`defaults_10`: with
  10 forward iterations; `defaults_phantom5`: with 5 phantom steps;
  `defaults_implicit`, `defaults_reuse`: with that gradient;
  `defaults_anderson`: with Anderson's solver; `defaults_states5`: the
  correction over 5 iterates; `defaults_spectral`: without weight
  normalization, the block's kernels bounded to spectral norm 1;
  `defaults_spectral_12`: the same with 12 forward iterations;
  `defaults_gamma4`: with the penalty at γ 4;
  `defaults_unrolled_implicit`: the implicit gradient after 44 unrolled
  steps; `defaults_spectral05`: the spectral bound at 0.5;
  `defaults_fusion_norm`: without the block's branch GroupNorm, and
  `defaults_fusion_norm_spectral`: that with the spectral bound);
- `previous`: the defaults before 2026-12-06 (one phantom step, λ 1;
  `previous_12`, `previous_20`: with 12 or 20 forward iterations,
  `previous_correction3`: with λ 3; `correction3_nopenalty`,
  `correction5_nopenalty`: with λ 3 or 5 and no penalty).

Prints one row per run and writes them to `--output` (JSON); `--plot`
draws accuracy and residual against the test-time iterations.
`--step_times=N` only times the levers' training steps, alternating:

    python -m benchmarks.mdeq_equilibrium --levers=unrolled,defaults \
        --step_times=20
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import json  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import timing  # noqa: E402
from benchmarks.digits import WIDTHS  # noqa: E402
from benchmarks.digits import digits_images  # noqa: E402
from keras_deq import diagnostics  # noqa: E402
from keras_deq.callbacks import UnrolledPretraining  # noqa: E402
from keras_deq.models import MDEQClassifier  # noqa: E402

# The model's defaults before they were made an equilibrium model.
BEFORE = {
    "gradient": "unrolled",
    "jac_weight": 0.5,
    "jac_freq": 0.05,
    "correction_weight": 0.0,
    "random_start": None,
}
PENALTY = {"jac_weight": 1.0, "jac_freq": 1.0}
# The defaults from the first equilibrium round until 2026-12-06: one
# phantom step and λ = 1; the defaults since are 3 steps and λ = 3.
PREVIOUS = {"phantom_steps": 1, "correction_weight": 1.0}
PHANTOM = {**BEFORE, "gradient": "phantom", "phantom_steps": 1}
LEVERS = {
    "unrolled": BEFORE,
    "implicit": {**BEFORE, "gradient": "implicit"},
    "implicit_penalty": {**BEFORE, "gradient": "implicit", **PENALTY},
    "phantom_penalty": {**PHANTOM, **PENALTY},
    "implicit_penalty_random": {
        **BEFORE,
        "gradient": "implicit",
        **PENALTY,
        "random_start": 1.0,
    },
    "unrolled_random": {**BEFORE, "random_start": 1.0},
    "phantom_penalty_random": {**PHANTOM, **PENALTY, "random_start": 1.0},
    "phantom_penalty4_random": {
        **PHANTOM,
        "jac_weight": 4.0,
        "jac_freq": 1.0,
        "random_start": 1.0,
    },
    "phantom_penalty_random_12": {
        **PHANTOM,
        **PENALTY,
        "random_start": 1.0,
        "max_iter": 12,
    },
    "phantom_correction_random": {
        **PHANTOM,
        "jac_weight": 0.0,
        "correction_weight": 1.0,
        "random_start": 1.0,
    },
    "phantom_penalty05_correction_random": {
        **PHANTOM,
        "jac_weight": 0.5,
        "jac_freq": 1.0,
        "correction_weight": 1.0,
        "random_start": 1.0,
    },
    "phantom_penalty_correction_random": {
        **PHANTOM,
        **PENALTY,
        "correction_weight": 1.0,
        "random_start": 1.0,
    },
    # The model's defaults as they are now.
    "defaults": {},
    # The defaults with 10 forward iterations; with 5 phantom steps.
    "defaults_10": {"max_iter": 10},
    "defaults_phantom5": {"phantom_steps": 5},
    # The defaults with the implicit gradient, or the one that reuses the
    # forward Broyden solve's inverse-Jacobian estimate.
    "defaults_implicit": {"gradient": "implicit"},
    "defaults_reuse": {"gradient": "reuse"},
    # The defaults with Anderson's solver; with the correction over 5
    # early iterates instead of 3.
    "defaults_anderson": {"solver": "anderson"},
    "defaults_states5": {"correction_states": 5},
    # The defaults with the block's kernels bounded to spectral norm 1
    # (`MDEQClassifier(spectral_norm=1.0)`; measured first with
    # `keras_deq.layers.apply_spectral_norm`, which gives the same
    # weights), which needs the plain convolutions, not weight
    # normalization.
    "defaults_spectral": {"weight_norm": False, "spectral_norm": 1.0},
    # The defaults with a 4x stronger Jacobian penalty (γ 4), against the
    # slow convergence that leaves 7 iterations short of the fixed point.
    "defaults_gamma4": {"jac_weight": 4.0},
    # A short unrolled phase (the first 2 of the 8 epochs, 44 steps), then
    # the implicit gradient (`keras_deq.callbacks.UnrolledPretraining`).
    "defaults_unrolled_implicit": {
        "gradient": "implicit",
        "pretraining_steps": 44,
    },
    # The spectral bound at 0.5: the block's convolutions are followed by
    # GroupNorms, which undo their scale, except conv2, whose output is
    # added to the injection before GN2; a tighter bound halves how much
    # of the state reaches it.
    "defaults_spectral05": {"weight_norm": False, "spectral_norm": 0.5},
    # The defaults without the GroupNorm after each branch's residual sum
    # (GN3): the state is normalized once per resolution, after the fusion.
    "defaults_fusion_norm": {"branch_norm": False},
    # The same with the spectral bound, whose kernels the GroupNorms of the
    # block leave without a Lipschitz bound.
    "defaults_fusion_norm_spectral": {
        "branch_norm": False,
        "weight_norm": False,
        "spectral_norm": 1.0,
    },
    # The spectral bound with 12 forward iterations, about the steps its solve
    # takes to the tolerance at 4x the budget.
    "defaults_spectral_12": {
        "weight_norm": False,
        "spectral_norm": 1.0,
        "max_iter": 12,
    },
    # The defaults before 2026-12-06's change (one phantom step, λ = 1),
    # alone, with 12 or 20 forward iterations and with λ = 3.
    "previous": PREVIOUS,
    "previous_12": {**PREVIOUS, "max_iter": 12},
    "previous_20": {**PREVIOUS, "max_iter": 20},
    "previous_correction3": {**PREVIOUS, "correction_weight": 3.0},
    # The correction alone: no penalty, λ = 3 (or 5), one phantom step.
    "correction3_nopenalty": {
        **PREVIOUS,
        "correction_weight": 3.0,
        "jac_weight": 0.0,
    },
    "correction5_nopenalty": {
        **PREVIOUS,
        "correction_weight": 5.0,
        "jac_weight": 0.0,
    },
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
_STEP_TIMES = flags.DEFINE_integer(
    "step_times",
    0,
    "If > 0: only time training steps of each lever, this many rounds "
    "(one step per lever per round, alternating, after a traced warm-up); "
    "prints the median seconds per step and its ratio to the first lever.",
)


def _compiled(lever, seed):
    """The lever's compiled model and its training callbacks."""
    keras.utils.set_random_seed(seed)
    kwargs = dict(LEVERS[lever])
    pretraining = kwargs.pop("pretraining_steps", None)
    model = MDEQClassifier(10, widths=WIDTHS, seed=seed, **kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = (
        [] if pretraining is None else [UnrolledPretraining(pretraining)]
    )
    return model, callbacks


def step_times(levers, seed, rounds):
    """Median seconds of one training step (batch 64) per lever.

    Alternates the levers step by step, so that a load that comes and goes
    on the machine reaches every lever alike.
    """
    (x, y), _ = digits_images()
    x, y = x[:64], y[:64]
    models = {lever: _compiled(lever, seed)[0] for lever in levers}
    for model in models.values():  # traces the train function
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
    times = {lever: [] for lever in levers}
    for _ in range(rounds):
        for lever, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[lever].append(time.perf_counter() - start)
    return {lever: timing.summary(t) for lever, t in times.items()}


def train(lever, seed, epochs, budgets, starts):
    """One run: the trained model's equilibrium report and its time."""
    model_kwargs = LEVERS[lever]
    (x, y), (x_test, y_test) = digits_images()
    model, callbacks = _compiled(lever, seed)
    start = time.perf_counter()
    history = model.fit(
        x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=callbacks
    )
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
        "random_start": model.deq.random_start,
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
    if _STEP_TIMES.value:
        times = step_times(levers, int(_SEEDS.value[0]), _STEP_TIMES.value)
        first = times[levers[0]]["median"]
        for lever, t in times.items():
            print(
                f"{lever:36s} {t['median']:.3f} s/step "
                f"({t['min']:.3f}-{t['max']:.3f}), "
                f"{t['median'] / first:.2f}x {levers[0]}"
            )
        with open(_OUTPUT.value, "w") as f:
            json.dump({"step_times": times}, f, indent=1)
        return
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
