r"""Forward NFE and task loss against the Jacobian penalty strength γ.

The paper's central claim at CPU scale: training with a larger γ makes the
learned f easier to solve. For each γ this trains

- the 1-D synthetic DEQ of `examples/synthetic_1d.py` (Table 4, column 1,
  fewer epochs), and
- a small convolutional DEQ on generated oriented-bar images
  (`examples/generated_images.py`, `--image_classes` orientations): a
  strided stem to 16×16×16, one `DEQLayer` over a residual conv block with
  GroupNorm (the benchmark conv cell's structure), global pooling and a
  linear head, trained with Adam (cosine-decayed from 1e-3, gradient norm
  clipped at 1) and the penalty on every step (p = 1),

then counts the Broyden steps each needs at inference to reach relative
residual 1e-3 (cap `--cap`, 50), per held-out sample, and reports them with
the median spectral radius of J_f at the equilibria, the held-out task loss
(MSE for 1-D, cross-entropy for images) and, for images, the held-out
accuracy. Every (task, γ) is trained once per seed in `--seeds` (the seed
picks the generated data and the initialisation); the table shows the mean
over seeds, the JSON every run.

    python -m benchmarks.nfe_vs_jacobian --gammas=0,1,4,10 --seeds=0,1

Writes `--output` (JSON) and `--plot` (PNG).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_deq  # noqa: E402
from benchmarks import timing  # noqa: E402
from examples import plotting  # noqa: E402
from examples import synthetic_1d  # noqa: E402
from examples.generated_images import oriented_bars  # noqa: E402

_GAMMAS = flags.DEFINE_list("gammas", ["0", "1", "4", "10"], "Values of γ.")
_TASKS = flags.DEFINE_list("tasks", ["1d", "images"], "Tasks to run.")
_EPOCHS_1D = flags.DEFINE_integer("epochs_1d", 20, "Epochs of the 1-D task.")
_EPOCHS_IMAGES = flags.DEFINE_integer("epochs_images", 8, "Image epochs.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1500, "Generated images.")
_IMAGE_CLASSES = flags.DEFINE_integer(
    "image_classes", 4, "Bar orientations to tell apart (2 to 10)."
)
_CAP = flags.DEFINE_integer("cap", 50, "Most Broyden steps at inference.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Random seeds, one run each.")
_OUTPUT = flags.DEFINE_string("output", "nfe_vs_jacobian.json", "JSON.")
_PLOT = flags.DEFINE_string("plot", "nfe_vs_jacobian.png", "PNG ('' none).")

TOL = 1e-3
FIELDS = ("nfe", "residual", "spectral_radius", "loss", "accuracy")


@keras.saving.register_keras_serializable(package="keras_deq_benchmarks")
class SmallConvBlock(keras.layers.Layer):
    """f(z, x) = GN₃(ReLU(z + GN₂(conv₂(ReLU(GN₁(conv₁(z))))) + x))."""

    def __init__(self, channels=16, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.convs = [
            keras.layers.Conv2D(
                channels,
                3,
                padding="same",
                use_bias=False,
                kernel_initializer=init,
            )
            for _ in range(2)
        ]
        self.norms = [keras.layers.GroupNormalization(4) for _ in range(3)]

    def build(self, z_shape, x_shape):
        for layer in self.convs + self.norms:
            layer.build(z_shape)

    def call(self, z, x, training=None):
        h = tf.nn.relu(self.norms[0](self.convs[0](z)))
        h = self.norms[1](self.convs[1](h))
        return self.norms[2](tf.nn.relu(z + h + x))

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


def image_model(gamma, seed, num_classes=10):
    keras.utils.set_random_seed(seed)
    images = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same")(images)
    x = keras.layers.GroupNormalization(4)(x)
    deq = keras_deq.DEQLayer(
        SmallConvBlock(16),
        max_iter=12,
        tol=TOL,
        jac_weight=gamma,
        jac_freq=1.0,
        seed=seed,
        name="deq",
    )
    z = deq(x)
    pooled = keras.layers.GlobalAveragePooling2D()(z)
    logits = keras.layers.Dense(num_classes)(pooled)
    return keras.Model(images, logits)


def inference_stats(block, x, cap):
    """Broyden steps to relative residual 1e-3 from z = 0 (mean over the
    samples of `x`), the residual reached, and the median over (at most 64
    of) them of ρ(J_f(z*)), the power method's estimate."""
    layer = keras_deq.DEQLayer(block, max_iter=cap, tol=TOL)
    layer.build(tf.TensorShape(x.shape))
    layer(x)
    radius = layer.spectral_radius(x[:64]).numpy()
    return {
        "nfe": float(layer.forward_nfe.result()),
        "residual": float(np.mean(layer.forward_residual.result())),
        "spectral_radius": float(np.median(radius)),
    }


def run_1d(gamma, epochs, cap, seed):
    x, y = synthetic_1d.make_data(seed)
    n = synthetic_1d.NUM_TRAIN
    model, _, stats = synthetic_1d.train_one(
        gamma, ((x[:n], y[:n]), (x[n:], y[n:])), epochs=epochs, seed=seed
    )
    inference = inference_stats(
        model.get_layer("deq").block, tf.constant(x[n:]), cap
    )
    return {"loss": stats["val_mse"], **inference}


def run_images(gamma, epochs, num_images, num_classes, cap, seed):
    x, y = oriented_bars(num_images, num_classes=num_classes, seed=seed)
    split = int(0.8 * num_images)
    batch_size = 32
    model = image_model(gamma, seed, num_classes)
    steps = epochs * -(-split // batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(1e-3, steps), clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(
        x[:split], y[:split], batch_size=batch_size, epochs=epochs, verbose=0
    )
    deq = model.get_layer("deq")
    injection = keras.Model(model.input, deq.input)(x[split:])
    inference = inference_stats(deq.block, injection, cap)
    logits = model.predict(x[split:], verbose=0)
    loss = float(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            y[split:], logits
        )
    )
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == y[split:]))
    return {"loss": loss, "accuracy": accuracy, **inference}


def summarize(results):
    """Mean over seeds of each (task, γ), in the order they were run."""
    keys = list(dict.fromkeys((r["task"], r["gamma"]) for r in results))
    rows = []
    for task, gamma in keys:
        runs = [r for r in results if (r["task"], r["gamma"]) == (task, gamma)]
        row = {"task": task, "gamma": gamma, "seeds": len(runs)}
        for field in FIELDS:
            values = [r[field] for r in runs if r.get(field) is not None]
            row[field] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows


def plot(summary, path):
    plt = plotting.pyplot()

    tasks = list(dict.fromkeys(r["task"] for r in summary))
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [r for r in summary if r["task"] == task]
        gammas = [r["gamma"] for r in rows]
        ax.plot(gammas, [r["nfe"] for r in rows], "o-", color="C0")
        ax.set_xlabel("γ")
        ax.set_ylabel("Broyden steps to 1e-3", color="C0")
        twin = ax.twinx()
        twin.plot(gammas, [r["loss"] for r in rows], "s--", color="C1")
        twin.set_ylabel("held-out loss", color="C1")
        ax.set_title(f"{task} (mean of {rows[0]['seeds']} seeds)")
    plotting.save(fig, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for task in _TASKS.value:
        if task not in ("1d", "images"):
            raise app.UsageError(f"--tasks takes 1d and images. Got {task}")
    if not 2 <= _IMAGE_CLASSES.value <= 10:
        raise app.UsageError(
            f"--image_classes takes 2 to 10. Got {_IMAGE_CLASSES.value}"
        )
    try:
        seeds = [int(s) for s in _SEEDS.value]
        gammas = [float(g) for g in _GAMMAS.value]
    except ValueError as error:
        raise app.UsageError(
            f"--seeds takes integers and --gammas numbers: {error}"
        ) from None
    if not seeds or not gammas:
        raise app.UsageError("--seeds and --gammas need one value or more.")
    results = []
    for task in _TASKS.value:
        for gamma in gammas:
            for seed in seeds:
                if task == "1d":
                    r = run_1d(gamma, _EPOCHS_1D.value, _CAP.value, seed)
                    r["accuracy"] = None
                else:
                    r = run_images(
                        gamma,
                        _EPOCHS_IMAGES.value,
                        _NUM_IMAGES.value,
                        _IMAGE_CLASSES.value,
                        _CAP.value,
                        seed,
                    )
                results.append(
                    {
                        "task": task,
                        "gamma": gamma,
                        "seed": seed,
                        "cap": _CAP.value,
                        **r,
                    }
                )
    summary = summarize(results)
    timing.print_table(
        [
            "task",
            "γ",
            "Broyden steps",
            "residual",
            "ρ(J)",
            "held-out loss",
            "accuracy",
        ],
        [
            [
                r["task"],
                f"{r['gamma']:g}",
                f"{r['nfe']:.2f}",
                f"{r['residual']:.1e}",
                f"{r['spectral_radius']:.3f}",
                f"{r['loss']:.4f}",
                "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
            ]
            for r in summary
        ],
    )
    timing.write_json(_OUTPUT.value, results)
    if _PLOT.value:
        plot(summary, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
