r"""MDEQClassifier on real images: scikit-learn's 8×8 handwritten digits.

    python -m benchmarks.mdeq_digits --seeds=0,1,2
    python -m benchmarks.mdeq_digits --model=explicit
    python -m benchmarks.mdeq_digits --model_kwargs='{"gradient": "phantom"}'

The digits (`sklearn.datasets.load_digits`, 1,797 images that ship with
scikit-learn) are resized bilinearly to 32×32 and repeated to 3 channels;
a fixed permutation gives 1,397 training and 400 held-out images. Each run
trains `MDEQClassifier(10, widths=(16, 32, 64, 128))` (plus
`--model_kwargs`) with Adam 1e-3, batch 64, for `--epochs` epochs, once
without the Jacobian penalty (γ = 0) and once with it on every step (γ = 1,
p = 1), and prints the held-out accuracy, the forward NFE and residual,
and the wall-clock split into the first epoch (which includes tracing) and
the rest (`--history` adds the held-out accuracy after every epoch). The
model's own cap of 7 iterations stops every solve before the tolerance
(1e-3), so the trained model is also evaluated with up to `--solve_cap`
iterations: the NFE the tolerance needs.
`--model=explicit` trains the baseline instead: a residual CNN
of the same widths (per stage a conv–GroupNorm–ReLU, then one residual
block), the same head (global average pooling, Dense) and the same
optimisation. Writes every run to `--output` (JSON).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import json  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks.digits import WIDTHS  # noqa: E402
from benchmarks.digits import digits_images  # noqa: E402
from keras_deq.models import MDEQClassifier  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "mdeq", ["mdeq", "explicit"], "Model.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, one run each.")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Epochs (22 steps each).")
_MODEL_KWARGS = flags.DEFINE_string(
    "model_kwargs", "{}", "JSON of further MDEQClassifier arguments."
)
_PENALTIES = flags.DEFINE_list(
    "penalties", ["off", "on"], "Runs without (off) and with (on) the penalty."
)
_HISTORY = flags.DEFINE_bool(
    "history",
    False,
    "Also evaluate the held-out images after every epoch (the times then "
    "include it).",
)
_SOLVE_CAP = flags.DEFINE_integer(
    "solve_cap",
    40,
    "After training, also evaluate with the forward solve allowed this "
    "many iterations, to count the NFE the tolerance needs (0 skips it).",
)
_OUTPUT = flags.DEFINE_string(
    "output", "mdeq_digits.json", "Where to write the JSON results."
)


def explicit_cnn(num_classes=10, widths=WIDTHS, num_groups=4):
    """The baseline: conv–GN–ReLU, then a residual block, per stage."""

    def conv_norm(h, width, strides=1):
        h = keras.layers.Conv2D(width, 3, strides, "same", use_bias=False)(h)
        return keras.layers.GroupNormalization(num_groups)(h)

    images = keras.Input((32, 32, 3))
    h = images
    for i, width in enumerate(widths):
        h = keras.layers.ReLU()(conv_norm(h, width, 1 if i == 0 else 2))
        r = conv_norm(keras.layers.ReLU()(conv_norm(h, width)), width)
        h = keras.layers.ReLU()(keras.layers.Add()([h, r]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(images, keras.layers.Dense(num_classes)(h))


class _EpochClock(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.ends = [time.perf_counter()]

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter())


def train(
    seed,
    penalty,
    epochs,
    model_kwargs,
    kind="mdeq",
    history=False,
    solve_cap=0,
):
    """One training run; its held-out metrics and wall-clock.

    `kind` is "mdeq" (`MDEQClassifier` with `model_kwargs`) or "explicit";
    `history` evaluates the held-out images after every epoch too.
    `solve_cap` > 0 evaluates the trained MDEQ once more with that many
    forward iterations allowed: the NFE the tolerance needs, where the
    model's own cap (7) stops every solve before it.
    """
    keras.utils.set_random_seed(seed)
    (x, y), (x_test, y_test) = digits_images()
    if kind == "explicit":
        model = explicit_cnn()
    else:
        kwargs = dict(model_kwargs)
        if penalty:
            kwargs.update(jac_weight=1.0, jac_freq=1.0)
        else:
            kwargs.update(jac_weight=0.0)
        model = MDEQClassifier(10, widths=WIDTHS, seed=seed, **kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    clock = _EpochClock()
    fitted = model.fit(
        x,
        y,
        batch_size=64,
        epochs=epochs,
        verbose=0,
        callbacks=[clock],
        validation_data=(x_test, y_test) if history else None,
    )
    seconds = clock.ends[-1] - clock.ends[0]
    logs = model.evaluate(
        x_test, y_test, batch_size=64, verbose=0, return_dict=True
    )
    capped = {}
    if solve_cap and kind == "mdeq":
        deq = model.deq
        own_cap, deq.max_iter = deq.max_iter, solve_cap
        model.test_function = None  # trace the evaluation again
        capped = model.evaluate(
            x_test, y_test, batch_size=64, verbose=0, return_dict=True
        )
        deq.max_iter = own_cap
        model.test_function = None
    # deq, deq_1, ...: the models of one process have their own names.
    name = model.deq.name if kind == "mdeq" else "deq"
    return {
        "seed": seed,
        "penalty": penalty,
        "held_out_accuracy": float(logs["accuracy"]),
        "forward_nfe": float(logs.get(f"{name}_forward_nfe", np.nan)),
        "forward_residual": float(logs.get(f"{name}_forward_residual", np.nan)),
        "solve_cap": solve_cap if capped else None,
        "capped_accuracy": float(capped.get("accuracy", np.nan)),
        "capped_forward_nfe": float(capped.get(f"{name}_forward_nfe", np.nan)),
        "capped_forward_residual": float(
            capped.get(f"{name}_forward_residual", np.nan)
        ),
        "train_seconds": seconds,
        "first_epoch_seconds": clock.ends[1] - clock.ends[0],
        "held_out_accuracy_per_epoch": [
            float(a) for a in fitted.history.get("val_accuracy", [])
        ],
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    model_kwargs = json.loads(_MODEL_KWARGS.value)
    if not isinstance(model_kwargs, dict):
        raise app.UsageError(
            f"--model_kwargs must be a JSON object. Received: {model_kwargs!r}"
        )
    unknown = sorted(set(_PENALTIES.value) - {"off", "on"})
    if unknown:
        raise app.UsageError(
            f"--penalties takes off and/or on. Unknown: {unknown}"
        )
    penalties = [p == "on" for p in _PENALTIES.value]
    if _MODEL.value == "explicit":
        penalties = [False]
    runs = []
    print("seed penalty  accuracy  NFE   residual  seconds (1st epoch)")
    for seed in [int(s) for s in _SEEDS.value]:
        for penalty in penalties:
            run = train(
                seed,
                penalty,
                _EPOCHS.value,
                model_kwargs,
                kind=_MODEL.value,
                history=_HISTORY.value,
                solve_cap=_SOLVE_CAP.value,
            )
            runs.append(run)
            print(
                f"{seed:4d} {str(penalty):7s}  {run['held_out_accuracy']:.4f}"
                f"  {run['forward_nfe']:4.2f}  {run['forward_residual']:.2e}"
                f"  {run['train_seconds']:6.1f} "
                f"({run['first_epoch_seconds']:.1f})"
            )
            if run["solve_cap"]:
                print(
                    f"     solve cap {run['solve_cap']}: accuracy "
                    f"{run['capped_accuracy']:.4f}, NFE "
                    f"{run['capped_forward_nfe']:.2f}, residual "
                    f"{run['capped_forward_residual']:.2e}"
                )
            if run["held_out_accuracy_per_epoch"]:
                print(
                    "     per epoch: "
                    + " ".join(
                        f"{a:.3f}" for a in run["held_out_accuracy_per_epoch"]
                    )
                )
    with open(_OUTPUT.value, "w") as f:
        json.dump(
            {"model": _MODEL.value, "model_kwargs": model_kwargs, "runs": runs},
            f,
            indent=2,
        )


if __name__ == "__main__":
    app.run(main)
