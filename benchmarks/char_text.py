"""Real text for char-level language models: Keras' own source code.

The Python files of Keras' `layers` package ship with every install of
keras_deq (Keras is a dependency), so this text is there offline on any
machine; its exact content follows the installed Keras version. The
baselines a char-level model is held against live here too: the unigram
perplexity and one explicit transformer layer of the same width.
"""

import glob
import os

import keras
import numpy as np


def keras_source_text(num_chars):
    """The first `num_chars` characters of Keras' `layers` sources."""
    root = os.path.join(os.path.dirname(keras.__file__), "src", "layers")
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    text = "".join(open(f, encoding="utf-8").read() for f in files)
    if len(text) < num_chars:
        raise ValueError(
            f"`num_chars`={num_chars} is more than the {len(text)} characters "
            f"of the Keras sources under {root}."
        )
    return text[:num_chars]


def char_windows(num_chars, seq_len, held_out=0.1):
    """Train/held-out `(inputs, targets)` windows and the vocabulary size.

    The last `held_out` fraction of the text is held out; each part is cut
    into non-overlapping windows of `seq_len` characters, the targets being
    the inputs shifted by one.
    """
    text = keras_source_text(num_chars)
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    cut = int(len(ids) * (1 - held_out))

    def windows(part):
        n = (len(part) - 1) // seq_len
        x = part[: n * seq_len].reshape(n, seq_len)
        return x, part[1 : n * seq_len + 1].reshape(n, seq_len)

    return windows(ids[:cut]), windows(ids[cut:]), len(chars)


def unigram_perplexity(train_targets, test_targets, vocab_size):
    """Held-out perplexity of the training part's add-one frequencies."""
    counts = np.bincount(train_targets.ravel(), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[test_targets.ravel()].mean()))


def explicit_transformer(vocab_size, width, num_heads, intermediate, length):
    """One causal post-LN transformer layer of the same width: the baseline.

    keras-hub's `TokenAndPositionEmbedding` (learned positions up to
    `length`) and `TransformerDecoder` (causal self-attention), then a
    Dense head.
    """
    import keras_hub

    tokens = keras.Input((None,), dtype="int32")
    h = keras_hub.layers.TokenAndPositionEmbedding(vocab_size, length, width)(
        tokens
    )
    h = keras_hub.layers.TransformerDecoder(intermediate, num_heads)(h)
    return keras.Model(tokens, keras.layers.Dense(vocab_size)(h))


def held_out_perplexity(
    model,
    train,
    test,
    epochs,
    batch_size=32,
    per_epoch=False,
    learning_rate=1e-3,
):
    """Trains with Adam at `learning_rate`; returns the held-out perplexity,
    the History's dict and the held-out `evaluate` logs. `per_epoch` also
    evaluates the held-out part after every epoch (the History's
    `val_loss`).

    The History's `loss` is the training objective, which includes any
    loss the model adds (a DEQ's Jacobian penalty); its `cross_entropy` is
    the language-model loss alone, the one a perplexity is made of.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="cross_entropy"
            )
        ],
    )
    history = model.fit(
        *train,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        validation_data=test if per_epoch else None,
    ).history
    logs = model.evaluate(
        *test, batch_size=batch_size, verbose=0, return_dict=True
    )
    return float(np.exp(logs["cross_entropy"])), history, logs
