r"""Trains a small DEQ classifier on generated spirals and reports its NFE.

Runs offline in about a minute on two CPU cores:

    python examples/quickstart.py
    python examples/quickstart.py --solver=anderson --epochs=5

The model is `Dense → DEQLayer(Cell) → Dense`: the DEQ layer returns the
fixed point z* = Cell(z*, x) of a one-layer cell, found by a root solver in
the forward pass and differentiated implicitly in the backward pass. The
script prints the held-out accuracy and the mean number of cell evaluations
(NFE) the solver needed per sample.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_deq  # noqa: E402

try:
    from examples import common  # noqa: E402
except ImportError:  # run as a script: examples/ itself is on sys.path
    import common  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags; defined only when run as a script, so that the
    examples can be imported together."""
    flags.DEFINE_integer("epochs", 20, "Training epochs.")
    flags.DEFINE_integer("batch_size", 64, "Batch size.")
    flags.DEFINE_integer("num_samples", 4000, "Generated samples.")
    flags.DEFINE_integer("hidden", 64, "Width of the DEQ state.")
    flags.DEFINE_enum(
        "solver", "broyden", keras_deq.solvers.names(), "Forward solver."
    )
    flags.DEFINE_integer("max_iter", 20, "Forward solver iterations.")
    flags.DEFINE_float("tol", 1e-3, "Forward relative tolerance.")
    flags.DEFINE_float("learning_rate", 1e-2, "Adam's initial learning rate.")
    flags.DEFINE_float("jac_weight", 0.0, "Jacobian penalty strength γ.")
    flags.DEFINE_integer("seed", 0, "Random seed.")


@keras.saving.register_keras_serializable(package="keras_deq_examples")
class Cell(keras.layers.Layer):
    """z ← tanh(W z + b + x): one weight-tied layer, the input injected."""

    def build(self, z_shape, x_shape):
        self.dense = keras.layers.Dense(
            z_shape[-1],
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.05),
            name="dense",
            dtype=self.dtype_policy,
        )
        self.dense.build(z_shape)

    def call(self, z, x, training=None):
        return keras.ops.tanh(self.dense(z) + x)


def make_spirals(num_samples, num_classes=3, noise=0.15, seed=0):
    """Interleaved 2-D spirals, one per class: not linearly separable."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_samples)
    radius = rng.uniform(0.1, 1.0, num_samples)
    angle = 2.5 * radius + 2 * np.pi * labels / num_classes
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    points += noise * radius[:, None] * rng.normal(size=points.shape)
    return points.astype("float32"), labels.astype("int32")


def build_model(hidden, solver, max_iter, tol, jac_weight=0.0, num_classes=3):
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(hidden, name="encoder")]
    )
    model.add(
        keras_deq.DEQLayer(
            Cell(),
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            jac_weight=jac_weight,
            name="deq",
        )
    )
    model.add(keras.layers.Dense(num_classes, name="head"))
    return model


def run(
    epochs=20,
    batch_size=64,
    num_samples=4000,
    hidden=64,
    solver="broyden",
    max_iter=20,
    tol=1e-3,
    learning_rate=1e-2,
    jac_weight=0.0,
    seed=0,
    verbose=2,
):
    """Trains and evaluates; returns a dict of the final numbers."""
    keras.utils.set_random_seed(seed)
    x, y = make_spirals(num_samples, seed=seed)
    split = int(0.8 * num_samples)
    model = build_model(hidden, solver, max_iter, tol, jac_weight)
    steps = epochs * -(-split // batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(learning_rate, steps)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x[:split],
        y[:split],
        validation_data=(x[split:], y[split:]),
        batch_size=batch_size,
        epochs=epochs,
        verbose=verbose,
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    return {
        "val_accuracy": logs["val_accuracy"],
        "train_forward_nfe": logs["deq_forward_nfe"],
        "val_forward_nfe": logs["val_deq_forward_nfe"],
        "val_forward_residual": logs["val_deq_forward_residual"],
        "backward_nfe": logs["deq_backward_nfe"],
        "model": model,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    result = run(
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        num_samples=FLAGS.num_samples,
        hidden=FLAGS.hidden,
        solver=FLAGS.solver,
        max_iter=FLAGS.max_iter,
        tol=FLAGS.tol,
        learning_rate=FLAGS.learning_rate,
        jac_weight=FLAGS.jac_weight,
        seed=FLAGS.seed,
    )
    print(
        f"held-out accuracy {result['val_accuracy']:.3f} | forward NFE "
        f"{result['train_forward_nfe']:.2f} (train) "
        f"{result['val_forward_nfe']:.2f} (held out, residual "
        f"{result['val_forward_residual']:.1e}) | backward NFE "
        f"{result['backward_nfe']:.2f}"
    )


if __name__ == "__main__":
    define_flags()
    common.run(main)
