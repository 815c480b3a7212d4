r"""Trains a multiscale DEQ (MDEQ) with Jacobian regularization on CIFAR-10.

The paper's CIFAR-10 run (Table 2: 93.1% with 6–7 NFEs; Table 4 column 3)
needs GPUs and the data set:

    python examples/cifar10_mdeq.py --data_dir=~/tensorflow_datasets \
        --model_dir=runs/cifar10 --export_dir=exported/cifar10
    # several GPUs on one machine: add --strategy=mirrored
    # several machines: set TF_CONFIG on each and add --strategy=multi_worker

A short trial on a CPU (2 logical devices, MirroredStrategy):

    python examples/cifar10_mdeq.py --data_dir=... --epochs=1 \
        --steps_per_epoch=20 --widths=8,16,32,64 --expansion=1 \
        --strategy=mirrored --cpu_devices=2

Defaults follow Table 4: widths 28/56/112/224, GroupNorm, variational
dropout 0.25, weight normalization, N(0, 0.01²) initialisation, the implicit
gradient, Broyden with 7 forward / 8 backward NFEs (ε 1e-3 / 1e-4), γ = 0.5
with p = 0.05, Adam 1e-3 with cosine decay, 200
epochs, global batch 96, random crops with 4-pixel padding and horizontal
flips.

This is `MDEQClassifier.PAPER_CIFAR10`, which departs from the model's own
defaults: those are tuned to make an equilibrium model on a small budget
(the phantom gradient instead of the implicit one, the penalty on every
step with γ = 1 instead of γ = 0.5 at p = 0.05, a fixed-point correction
loss, training solves from random first iterates, expansion 2, no dropout,
N(0, 0.05²) initialisation; `MDEQClassifier`'s docstring says why).
`build_model(**kwargs)` takes any of them (`gradient="phantom"`,
`correction_weight=3.0`, `random_start=1.0`, ...); the penalty's and the
block's also come as flags.

CIFAR-10 comes through TensorFlow Datasets from `--data_dir`; this
script never downloads (it says how to prepare the data if it is missing).
A killed run started again with the same `--model_dir` resumes from its
last epoch (`BackupAndRestore`); the best model is kept as
`model_dir/best.keras`, TensorBoard logs (with the DEQ statistics) go to
`model_dir/logs`, and `--export_dir` writes a SavedModel at the end.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_deq  # noqa: E402

try:
    from examples import common  # noqa: E402
except ImportError:  # run as a script: examples/ itself is on sys.path
    import common  # noqa: E402

FLAGS = flags.FLAGS

NUM_TRAIN, NUM_TEST = 50_000, 10_000
# Under runs/, which git ignores; each example has its own.
MODEL_DIR = "runs/cifar10_mdeq"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

MISSING_DATA = (
    "CIFAR-10 was not found in --data_dir={data_dir!r}, and this script does "
    "not download it. On a machine with internet access run\n"
    '    python -c "import tensorflow_datasets as tfds; '
    "tfds.builder('cifar10', data_dir='DIR').download_and_prepare()\"\n"
    "then copy DIR (it holds cifar10/3.0.2/) to this machine and pass "
    "--data_dir=DIR. ({reason})"
)


def define_flags():
    common.define_training_flags(
        epochs=200, batch_size=96, learning_rate=1e-3, model_dir=MODEL_DIR
    )
    # Model settings; unset, each keeps Table 4's value (build_model).
    flags.DEFINE_list("widths", None, "MDEQ widths, e.g. 28,56,112,224.")
    flags.DEFINE_integer("expansion", None, "Residual block width factor.")
    flags.DEFINE_float("dropout", None, "Variational dropout rate.")
    flags.DEFINE_integer("max_iter", None, "Forward NFE threshold.")
    flags.DEFINE_integer("backward_max_iter", None, "Backward NFE threshold.")
    flags.DEFINE_float("jac_weight", None, "Jacobian penalty strength γ.")
    flags.DEFINE_float("jac_freq", None, "Jacobian penalty frequency p.")
    flags.DEFINE_integer(
        "pretrain_steps", 0, "Unrolled-gradient warm-up steps (MDEQ-style)."
    )
    flags.DEFINE_integer("pretrain_iters", 4, "Unrolled iterations then.")


def load_split(data_dir, split):
    """(image uint8 [32, 32, 3], label) pairs of a CIFAR-10 split."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder("cifar10", data_dir=data_dir)
        return builder.as_dataset(split=split, as_supervised=True)
    except (AssertionError, FileNotFoundError, OSError) as error:
        reason = str(error).split(". ")[0] or type(error).__name__
        raise common.DataNotFoundError(
            MISSING_DATA.format(data_dir=data_dir, reason=reason)
        ) from None


def preprocess(image, label, training):
    image = tf.cast(image, tf.float32) / 255.0
    if training:
        image = tf.image.resize_with_crop_or_pad(image, 40, 40)
        image = tf.image.random_crop(image, [32, 32, 3])
        image = tf.image.random_flip_left_right(image)
    image = (image - MEAN) / STD
    return image, label


def make_dataset(data_dir, split, batch_size, training, seed=0):
    ds = load_split(data_dir, split)
    if training:
        ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(
        lambda x, y: preprocess(x, y, training),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return common.distribute_options(ds)


MODEL_FLAGS = (
    "expansion",
    "dropout",
    "max_iter",
    "backward_max_iter",
    "jac_weight",
    "jac_freq",
)


def build_model(seed=0, **model_kwargs):
    """The paper's MDEQ (`MDEQClassifier.PAPER_CIFAR10` over the model's
    defaults), with `model_kwargs` over both."""
    MDEQClassifier = keras_deq.models.MDEQClassifier
    kwargs = {**MDEQClassifier.PAPER_CIFAR10, **model_kwargs}
    return MDEQClassifier(10, seed=seed, **kwargs)


def run(
    data_dir,
    model_dir=MODEL_DIR,
    export_dir=None,
    epochs=200,
    batch_size=96,
    learning_rate=1e-3,
    steps_per_epoch=None,
    validation_steps=None,
    strategy="auto",
    cpu_devices=None,
    pretrain_steps=0,
    pretrain_iters=4,
    seed=0,
    verbose=1,
    callbacks=(),
    **model_kwargs,
):
    """Trains (or resumes) and evaluates; returns history, model, export."""
    strategy = common.make_strategy(strategy, cpu_devices)
    keras.utils.set_random_seed(seed)
    train = make_dataset(data_dir, "train", batch_size, True, seed)
    test = make_dataset(data_dir, "test", batch_size, False)
    steps = steps_per_epoch or -(-NUM_TRAIN // batch_size)
    with strategy.scope():
        model = build_model(seed=seed, **model_kwargs)
        model.compile(
            optimizer=keras.optimizers.Adam(
                keras.optimizers.schedules.CosineDecay(
                    learning_rate, epochs * steps
                )
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    history = common.fit(
        model,
        strategy,
        train,
        test,
        model_dir=model_dir,
        monitor="val_accuracy",
        mode="max",
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        pretrain_steps=pretrain_steps,
        pretrain_iters=pretrain_iters,
        callbacks=callbacks,
        verbose=verbose,
    )
    exported = common.export(model, strategy, export_dir)
    return {"history": history, "model": model, "export_dir": exported}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    model_kwargs = common.model_arguments(MODEL_FLAGS)
    if FLAGS.widths is not None:
        try:
            model_kwargs["widths"] = tuple(int(w) for w in FLAGS.widths)
        except ValueError:
            raise app.UsageError(
                "--widths must be integers, e.g. 28,56,112,224. "
                f"Got {FLAGS.widths}"
            ) from None
    result = run(
        FLAGS.data_dir,
        model_dir=FLAGS.model_dir,
        export_dir=FLAGS.export_dir,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        steps_per_epoch=FLAGS.steps_per_epoch,
        validation_steps=FLAGS.validation_steps,
        strategy=FLAGS.strategy,
        cpu_devices=FLAGS.cpu_devices,
        pretrain_steps=FLAGS.pretrain_steps,
        pretrain_iters=FLAGS.pretrain_iters,
        seed=FLAGS.seed,
        verbose=FLAGS.verbose,
        **model_kwargs,
    )
    logs = {k: v[-1] for k, v in result["history"].items()}
    print(
        f"test accuracy {logs.get('val_accuracy', float('nan')):.4f} | "
        f"forward NFE {logs['deq_forward_nfe']:.2f} (residual "
        f"{logs['deq_forward_residual']:.1e}) | backward NFE "
        f"{logs.get('deq_backward_nfe', float('nan')):.2f}"
    )
    if result["export_dir"]:
        print(f"SavedModel written to {result['export_dir']}")


if __name__ == "__main__":
    define_flags()
    common.run(common.exit_on_missing_data(main))
