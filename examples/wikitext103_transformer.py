r"""Trains a DEQ-Transformer language model on WikiText-103 with JR.

The paper's WikiText-103 run (Table 1: 24.9 perplexity with 12 NFEs, post-LN
+ JR; Table 4 column 2) needs GPUs and the data set, the standard token
files `wiki.train.tokens`, `wiki.valid.tokens`, `wiki.test.tokens`:

    python examples/wikitext103_transformer.py \
        --data_dir=~/data/wikitext-103 --model_dir=runs/wt103 \
        --export_dir=exported/wt103 --max_vocab=50000
    # several GPUs on one machine: add --strategy=mirrored
    # several machines: set TF_CONFIG on each and add --strategy=multi_worker

A trial on a CPU with a generated corpus in the same format:

    python examples/generated_text.py --out=/tmp/generated_wikitext
    python examples/wikitext103_transformer.py \
        --data_dir=/tmp/generated_wikitext --hidden_dim=64 --num_heads=4 \
        --intermediate_dim=256 --seq_len=32 --batch_size=16 --epochs=8

Defaults follow Table 4: width 700 (10 heads, feed-forward 48000 as in the
original DEQ-Transformer), post-LN, variational dropout 0.06, weight
normalization, Broyden with 12 forward / 12 backward NFEs (ε 1e-3 / 1e-4),
γ raised from 1.6 to 2.5 over training (`JacobianSchedule`) with p = 0.35,
sequences of 150 tokens, global batch 60, Adam 2.5e-4 with one epoch of
linear warm-up and then cosine decay, 23 epochs. The vocabulary is built
from the training file with `keras.layers.StringLookup`: every line ends
with `<eos>`, and words outside the `--max_vocab` most frequent (0: all of
them, 267,735 for WikiText-103) map to `<unk>`. The softmax is full (the
original used an adaptive softmax), so `--max_vocab` bounds its cost.

Validation perplexity is reported each epoch (`val_perplexity`, with the
DEQ's NFE and residual), test perplexity at the end. A killed run started
again with the same `--model_dir` resumes (`BackupAndRestore`); the best
model is `model_dir/best.keras`, TensorBoard logs go to `model_dir/logs`,
the vocabulary to `model_dir/vocab.txt` (and next to the SavedModel that
`--export_dir` writes; its `serve` endpoint maps token ids `[B, T]` to
next-token logits).
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

try:
    from examples import common  # noqa: E402
except ImportError:  # run as a script: examples/ itself is on sys.path
    import common  # noqa: E402

FLAGS = flags.FLAGS
# Under runs/, which git ignores; each example has its own.
MODEL_DIR = "runs/wikitext103_transformer"

SPLITS = ("train", "valid", "test")
UNK, EOS = "<unk>", "<eos>"

MISSING_DATA = (
    "WikiText-103 was not found: {reason}. This script does not download "
    "it. Get wikitext-103-v1.zip (the tokenized version) from "
    "https://s3.amazonaws.com/research.metamind.io/wikitext/"
    "wikitext-103-v1.zip (or the Hugging Face data set Salesforce/wikitext, "
    "config wikitext-103-v1), unzip it and pass the directory that holds "
    "wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens as "
    "--data_dir. To try the pipeline without it: python "
    "examples/generated_text.py --out=DIR writes a small corpus in the same "
    "format."
)


def define_flags():
    common.define_training_flags(
        epochs=23, batch_size=60, learning_rate=2.5e-4, model_dir=MODEL_DIR
    )
    flags.DEFINE_integer("seq_len", 150, "Tokens per training sequence.")
    flags.DEFINE_integer(
        "max_vocab", 0, "Vocabulary size incl. <unk> (0: every word)."
    )
    # Model settings; unset, each keeps DEQTransformerLM's default.
    flags.DEFINE_integer("hidden_dim", None, "Model width.")
    flags.DEFINE_integer("num_heads", None, "Attention heads.")
    flags.DEFINE_integer("intermediate_dim", None, "Feed-forward width.")
    flags.DEFINE_enum("norm", None, ["post", "pre"], "LayerNorm placement.")
    flags.DEFINE_float("dropout", None, "Variational dropout rate.")
    flags.DEFINE_float(
        "init_stddev",
        None,
        "Std of the initial weights; unset: 1/sqrt(fan_in) per projection "
        "(0.01 is the paper's).",
    )
    flags.DEFINE_integer("max_iter", None, "Forward NFE threshold.")
    flags.DEFINE_integer("backward_max_iter", None, "Backward NFE threshold.")
    flags.DEFINE_float("jac_freq", None, "Jacobian penalty frequency p.")
    # The γ schedule, Table 4's: the example's own setting, not the model's
    # width-aware default.
    flags.DEFINE_float("jac_weight", 1.6, "Jacobian penalty γ at the start.")
    flags.DEFINE_float("jac_weight_end", 2.5, "γ at the last epoch.")
    flags.DEFINE_integer(
        "pretrain_steps", 0, "Unrolled-gradient warm-up steps."
    )
    flags.DEFINE_integer("pretrain_iters", 4, "Unrolled iterations then.")
    flags.DEFINE_integer(
        "sample_words", 20, "Greedy continuation printed at the end (0: none)."
    )


def token_file(data_dir, split):
    """The path of `wiki.{split}.tokens`, or a DataNotFoundError."""
    if not data_dir:
        raise common.DataNotFoundError(
            MISSING_DATA.format(reason="--data_dir is not set")
        )
    path = os.path.join(os.path.expanduser(data_dir), f"wiki.{split}.tokens")
    if not os.path.isfile(path):
        raise common.DataNotFoundError(
            MISSING_DATA.format(reason=f"{path} does not exist")
        )
    return path


def words(path):
    """A tf.data.Dataset of the file's lines as words, each ending <eos>."""
    lines = tf.data.TextLineDataset(path)
    return lines.map(
        lambda line: tf.concat([tf.strings.split(line), [EOS]], 0),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def build_vocabulary(data_dir, max_vocab=0):
    """A StringLookup over the training file's words, most frequent first.

    Index 0 is `<unk>` (for the data's own `<unk>` and every word beyond
    the `max_vocab` most frequent); `max_vocab` counts it.
    """
    lookup = keras.layers.StringLookup(
        max_tokens=max_vocab or None, oov_token=UNK, name="vocabulary"
    )
    lookup.adapt(words(token_file(data_dir, "train")).prefetch(8))
    return lookup


def encode(path, lookup):
    """The file as one int32 array of token ids (lines joined by <eos>)."""
    ids = (
        words(path)
        .ragged_batch(4096)
        .map(
            lambda w: tf.cast(lookup(w.flat_values), tf.int32),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
    parts = [part.numpy() for part in ids]
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def sequences(ids, seq_len):
    """(inputs, targets): contiguous `seq_len`-token runs and their shifts."""
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise ValueError(
            f"The text has {len(ids)} tokens, fewer than `seq_len` + 1 = "
            f"{seq_len + 1}."
        )
    inputs = ids[: n * seq_len].reshape(n, seq_len)
    targets = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return inputs, targets


def make_dataset(ids, seq_len, batch_size, training, seed=0):
    inputs, targets = sequences(ids, seq_len)
    ds = tf.data.Dataset.from_tensor_slices((inputs, targets))
    if training:
        ds = ds.shuffle(len(inputs), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=training)
    return common.distribute_options(ds.prefetch(tf.data.AUTOTUNE))


def load_data(data_dir, max_vocab=0):
    """The vocabulary and the id arrays of the three splits."""
    paths = {split: token_file(data_dir, split) for split in SPLITS}
    lookup = build_vocabulary(data_dir, max_vocab)
    ids = {split: encode(path, lookup) for split, path in paths.items()}
    return lookup, ids


MODEL_FLAGS = (
    "hidden_dim",
    "num_heads",
    "intermediate_dim",
    "norm",
    "dropout",
    "init_stddev",
    "max_iter",
    "backward_max_iter",
    "jac_freq",
)


def build_model(vocab_size, seed=0, **model_kwargs):
    """`DEQTransformerLM` with its defaults but for `model_kwargs`."""
    return keras_deq.models.DEQTransformerLM(
        vocab_size, seed=seed, **model_kwargs
    )


def compile_model(model, learning_rate, warmup_steps, total_steps):
    """Adam with linear warm-up then cosine decay; perplexity metric."""
    import keras_hub

    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras_hub.metrics.Perplexity(from_logits=True)],
    )


def write_vocabulary(lookup, directory):
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.txt"), "w") as file:
        file.write("\n".join(lookup.get_vocabulary()) + "\n")


def run(
    data_dir,
    model_dir=MODEL_DIR,
    export_dir=None,
    epochs=23,
    batch_size=60,
    learning_rate=2.5e-4,
    steps_per_epoch=None,
    validation_steps=None,
    strategy="auto",
    cpu_devices=None,
    seq_len=150,
    max_vocab=0,
    jac_weight=1.6,
    jac_weight_end=2.5,
    pretrain_steps=0,
    pretrain_iters=4,
    seed=0,
    verbose=1,
    callbacks=(),
    **model_kwargs,
):
    """Trains (or resumes), evaluates on test; returns a dict of results.

    Keys: `history`, `test` (evaluate's logs), `model`, `vocabulary` (the
    StringLookup), `export_dir`.
    """
    strategy = common.make_strategy(strategy, cpu_devices)
    keras.utils.set_random_seed(seed)
    lookup, ids = load_data(data_dir, max_vocab)
    train = make_dataset(ids["train"], seq_len, batch_size, True, seed)
    valid = make_dataset(ids["valid"], seq_len, batch_size, False)
    test = make_dataset(ids["test"], seq_len, batch_size, False)
    steps = steps_per_epoch or len(sequences(ids["train"], seq_len)[0]) // (
        batch_size
    )
    if steps == 0:
        raise ValueError(
            f"The training split has fewer than `batch_size`={batch_size} "
            f"sequences of {seq_len} tokens."
        )
    with strategy.scope():
        model = build_model(
            lookup.vocabulary_size(),
            seed=seed,
            jac_weight=jac_weight,
            **model_kwargs,
        )
        compile_model(model, learning_rate, steps, epochs * steps)
    extra = list(callbacks)
    if jac_weight > 0 or jac_weight_end > 0:
        extra.append(
            keras_deq.callbacks.JacobianSchedule(
                jac_weight, jac_weight_end, epochs=max(1, epochs - 1)
            )
        )
    write_vocabulary(lookup, model_dir)
    history = common.fit(
        model,
        strategy,
        train,
        valid,
        model_dir=model_dir,
        monitor="val_perplexity",
        mode="min",
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        pretrain_steps=pretrain_steps,
        pretrain_iters=pretrain_iters,
        callbacks=extra,
        verbose=verbose,
    )
    test_logs = model.evaluate(
        test, steps=validation_steps, return_dict=True, verbose=verbose
    )
    exported = common.export(model, strategy, export_dir)
    write_vocabulary(lookup, exported)
    return {
        "history": history,
        "test": test_logs,
        "model": model,
        "vocabulary": lookup,
        "export_dir": exported,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.seq_len < 1 or FLAGS.max_vocab < 0 or FLAGS.max_vocab == 1:
        raise app.UsageError(
            "--seq_len must be >= 1 and --max_vocab 0 (all words) or >= 2. "
            f"Got --seq_len={FLAGS.seq_len} --max_vocab={FLAGS.max_vocab}"
        )
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
        seq_len=FLAGS.seq_len,
        max_vocab=FLAGS.max_vocab,
        jac_weight=FLAGS.jac_weight,
        jac_weight_end=FLAGS.jac_weight_end,
        pretrain_steps=FLAGS.pretrain_steps,
        pretrain_iters=FLAGS.pretrain_iters,
        seed=FLAGS.seed,
        verbose=FLAGS.verbose,
        **common.model_arguments(MODEL_FLAGS),
    )
    logs = {k: v[-1] for k, v in result["history"].items()}
    test = result["test"]
    print(
        f"validation perplexity {logs['val_perplexity']:.2f}, forward NFE "
        f"{logs['val_deq_forward_nfe']:.2f} (residual "
        f"{logs['val_deq_forward_residual']:.1e}) | test perplexity "
        f"{test['perplexity']:.2f}, forward NFE {test['deq_forward_nfe']:.2f} "
        f"| last training epoch's forward NFE {logs['deq_forward_nfe']:.2f}"
    )
    if FLAGS.sample_words:
        vocab = result["vocabulary"].get_vocabulary()
        prompt = encode(
            token_file(FLAGS.data_dir, "valid"), result["vocabulary"]
        )
        prompt = prompt[:8] if len(prompt) >= 8 else prompt
        out = result["model"].generate(prompt, FLAGS.sample_words)
        print("greedy sample:", " ".join(vocab[i] for i in out))
    if result["export_dir"]:
        print(f"SavedModel written to {result['export_dir']}")


if __name__ == "__main__":
    define_flags()
    common.run(common.exit_on_missing_data(main))
