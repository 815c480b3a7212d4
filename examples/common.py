"""What the training examples share: strategy, callbacks, export, errors."""

import os
import sys

import keras
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

import keras_deq

try:
    from examples import distribute
except ImportError:  # run as a script: examples/ itself is on sys.path
    import distribute

FLAGS = flags.FLAGS


class DataNotFoundError(Exception):
    """A data set is not on this machine; the message says how to get it."""


def define_training_flags(epochs, batch_size, learning_rate, model_dir):
    """Flags every training example has, with the example's defaults.

    They are key flags of the script being run, so its `--help` lists them
    (absl lists only the main module's own flags there).
    """
    before = set(flags.FLAGS)
    flags.DEFINE_string("data_dir", None, "Where the data set lives.")
    flags.DEFINE_string(
        "model_dir",
        model_dir,
        "Backups (for resuming), the best checkpoint and TensorBoard logs "
        "(under runs/, which git ignores, by default).",
    )
    flags.DEFINE_string(
        "export_dir", None, "If set, write a SavedModel here at the end."
    )
    flags.DEFINE_integer("epochs", epochs, "Training epochs.")
    flags.DEFINE_integer(
        "batch_size", batch_size, "Global batch size (over all replicas)."
    )
    flags.DEFINE_float("learning_rate", learning_rate, "Adam start rate.")
    flags.DEFINE_integer(
        "steps_per_epoch", None, "Limit the steps per epoch (for trials)."
    )
    flags.DEFINE_integer(
        "validation_steps", None, "Limit the validation steps (for trials)."
    )
    flags.DEFINE_enum(
        "strategy",
        "auto",
        list(distribute.STRATEGIES),
        "auto: MirroredStrategy on >1 GPU, else default; mirrored; "
        "multi_worker (TF_CONFIG); one_device.",
    )
    flags.DEFINE_integer(
        "cpu_devices",
        None,
        "Split the CPU into this many logical devices first (to run "
        "--strategy=mirrored without GPUs).",
    )
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("verbose", 1, "Keras fit verbosity (0, 1, 2).")
    main = sys.argv[0]
    for name in sorted(set(flags.FLAGS) - before):
        flags.FLAGS.register_key_flag_for_module(main, flags.FLAGS[name])


def model_arguments(names):
    """The model flags among `names` that were given on the command line.

    Model flags default to `None`, so an unset one leaves the model's own
    default in force: the examples state no model default again.
    """
    return {
        name: FLAGS[name].value
        for name in names
        if FLAGS[name].value is not None
    }


def make_strategy(strategy, cpu_devices=None):
    """A strategy from its name (or the strategy itself, passed through)."""
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if cpu_devices:
        distribute.split_cpu(cpu_devices)
    return distribute.make_strategy(strategy)


def training_callbacks(strategy, model_dir, monitor, mode, extra=()):
    """BackupAndRestore, best-model checkpoint and TensorBoard, per worker.

    Workers other than the chief write to their own scratch directories,
    as multi-worker training requires.
    """
    if not distribute.is_chief(strategy):
        task = strategy.cluster_resolver.task_id
        model_dir = os.path.join(model_dir, f"worker_{task}_scratch")
    os.makedirs(model_dir, exist_ok=True)
    return [
        keras.callbacks.BackupAndRestore(os.path.join(model_dir, "backup")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(model_dir, "best.keras"),
            monitor=monitor,
            mode=mode,
            save_best_only=True,
        ),
        *extra,
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs")),
    ]


def fit(
    model,
    strategy,
    train,
    validation,
    *,
    model_dir,
    monitor,
    mode,
    epochs,
    steps_per_epoch=None,
    validation_steps=None,
    pretrain_steps=0,
    pretrain_iters=4,
    callbacks=(),
    verbose=1,
):
    """`model.fit` with the examples' callbacks, under any strategy.

    Adds `UnrolledPretraining` when `pretrain_steps` > 0, and the backup,
    best-model checkpoint (by `monitor`, `mode`) and TensorBoard callbacks
    of `training_callbacks`. Returns the History's dict.
    """
    extra = list(callbacks)
    if pretrain_steps:
        extra.append(
            keras_deq.callbacks.UnrolledPretraining(
                pretrain_steps, pretrain_iters
            )
        )
    prepare_for_multi_worker(model, strategy, train)
    history = model.fit(
        train,
        validation_data=validation,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        callbacks=training_callbacks(strategy, model_dir, monitor, mode, extra),
        verbose=verbose,
        # The datasets shuffle themselves; Keras warns that its own
        # `shuffle=True` default is ignored for a tf.data.Dataset.
        shuffle=False,
    )
    return history.history


def prepare_for_multi_worker(model, strategy, dataset):
    """Works around Keras 3's `fit` under MultiWorkerMirroredStrategy.

    Before training, `fit` builds the model's metrics from the first batch,
    which it averages over replicas with `strategy.reduce`; with several
    workers that call fails on the per-replica batch ("Attempt to convert a
    value (PerReplica...)", keras-team/keras#20585). The build only needs
    the batch's shapes, so this does it here from one local batch and makes
    `fit` skip its own. After each step `fit` then averages the scalar logs
    over workers with `strategy.reduce(..., axis=0)`, which fails on
    scalars; with this patch the logs are averaged over each worker's local
    replicas instead. Training itself (gradient all-reduce, weight updates)
    is untouched and identical on every worker.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    from keras.src.backend.tensorflow import trainer

    batch = next(iter(dataset))
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda *args, **kwargs: None
    trainer._collective_all_reduce_multi_worker = lambda strategy: False


def export(model, strategy, export_dir):
    """Writes a SavedModel whose `serve` endpoint runs the DEQ solve."""
    if not export_dir:
        return None
    if not distribute.is_chief(strategy):
        export_dir = os.path.join(
            export_dir + "_scratch",
            f"worker_{strategy.cluster_resolver.task_id}",
        )
    # TensorFlow's SavedModel writer logs every step at INFO through absl.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        model.export(export_dir, verbose=False)
    finally:
        logging.set_verbosity(verbosity)
    return export_dir


def distribute_options(dataset):
    """Shards by element, so any file layout splits across workers."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


_HELP = {"--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"}


def run(main):
    """`app.run(main)`, where asking for help exits 0.

    absl prints the help and exits with status 1, which reads as a failure
    to a shell or a CI step that runs `script --help`.
    """
    try:
        app.run(main)
    except SystemExit as done:
        if done.code == 1 and _HELP.intersection(sys.argv[1:]):
            raise SystemExit(0) from None
        raise


def exit_on_missing_data(main):
    """Turns DataNotFoundError into its message and exit status 2."""

    def wrapped(argv):
        try:
            return main(argv)
        except DataNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapped
