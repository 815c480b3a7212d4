"""examples/wikitext103_transformer.py on a generated WikiText-format corpus."""

import collections
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from examples import generated_text
from examples import wikitext103_transformer as wt
from tests.testing import tensorboard_tags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(
    hidden_dim=16,
    num_heads=2,
    intermediate_dim=32,
    max_iter=6,
    backward_max_iter=6,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wikitext")
    generated_text.write_corpus(str(directory), num_words=6000, seed=0)
    return str(directory)


def python_tokens(path):
    """Independent reference: WikiText lines as words, each ending <eos>."""
    with open(path, encoding="utf-8") as file:
        return [w for line in file for w in line.split() + ["<eos>"]]


def test_vocabulary_and_encoding_match_a_python_reference(corpus):
    train = python_tokens(os.path.join(corpus, "wiki.train.tokens"))
    counts = collections.Counter(w for w in train if w != "<unk>")
    lookup = wt.build_vocabulary(corpus, max_vocab=20)
    vocab = lookup.get_vocabulary()
    assert vocab[0] == "<unk>" and len(vocab) == 20
    # The 19 most frequent words (ties aside), most frequent first.
    frequencies = [counts[w] for w in vocab[1:]]
    assert frequencies == sorted(frequencies, reverse=True)
    assert min(frequencies) >= sorted(counts.values(), reverse=True)[18]
    index = {w: i for i, w in enumerate(vocab)}
    valid_path = os.path.join(corpus, "wiki.valid.tokens")
    expected = [index.get(w, 0) for w in python_tokens(valid_path)]
    np.testing.assert_array_equal(wt.encode(valid_path, lookup), expected)
    full = wt.build_vocabulary(corpus)
    assert full.vocabulary_size() == len(counts) + 1


def test_sequences_are_contiguous_runs_and_their_shifts():
    ids = np.arange(23, dtype=np.int32)
    inputs, targets = wt.sequences(ids, 5)
    assert inputs.shape == targets.shape == (4, 5)
    np.testing.assert_array_equal(inputs.ravel(), ids[:20])
    np.testing.assert_array_equal(targets.ravel(), ids[1:21])
    with pytest.raises(ValueError, match="seq_len"):
        wt.sequences(ids[:5], 5)


def test_reported_perplexity_is_exp_of_mean_token_cross_entropy():
    model = keras.Sequential(
        [keras.Input((7,), dtype="int32"), keras.layers.Embedding(11, 11)]
    )
    wt.compile_model(model, 1e-3, 1, 10)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (13, 8)).astype(np.int32)
    # Batches of 5, 5 and 3 sequences: the mean is over tokens, not batches.
    data = tf.data.Dataset.from_tensor_slices((ids[:, :-1], ids[:, 1:]))
    logs = model.evaluate(data.batch(5), return_dict=True, verbose=0)
    logits = model.predict(ids[:, :-1], verbose=0).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = ids[:, 1:]
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)
    assert np.isclose(logs["perplexity"], np.exp(nll.mean()), rtol=1e-5)


def test_one_epoch_mirrored_then_keras_file_and_savedmodel(
    corpus, tmp_path, mirrored
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = wt.run(
            corpus,
            model_dir=str(tmp_path / "run"),
            export_dir=str(tmp_path / "export"),
            epochs=1,
            batch_size=8,
            seq_len=16,
            strategy=mirrored,
            verbose=0,
            **TINY_MODEL,
        )
    # The datasets shuffle themselves: no "shuffle=True ... ignored" noise.
    assert not [w for w in caught if "shuffle" in str(w.message)]
    model = result["model"]
    assert model.distribute_strategy is mirrored
    for w in model.deq.block.trainable_weights:
        assert len(w.value.values) == 2
    history = result["history"]
    for key in [
        "loss",
        "perplexity",
        "val_perplexity",
        "deq_forward_nfe",
        "deq_backward_nfe",
        "deq_jac_loss",
    ]:
        assert np.isfinite(history[key][0]), key
    assert 1 <= history["deq_forward_nfe"][0] <= 6
    np.testing.assert_allclose(history["deq_jac_weight"], [1.6], rtol=1e-6)
    # A full softmax over the vocabulary after one warm-up epoch: the tied
    # head starts with unit-variance logits (perplexity about e^½ · vocab).
    vocab_size = result["vocabulary"].vocabulary_size()
    assert 1 < result["test"]["perplexity"] < 2 * vocab_size
    tags = tensorboard_tags(str(tmp_path / "run" / "logs" / "validation"))
    assert {"epoch_perplexity", "epoch_deq_forward_nfe"} <= tags
    with open(tmp_path / "export" / "vocab.txt") as file:
        written = file.read().splitlines()
    assert written == result["vocabulary"].get_vocabulary()
    assert written[0] == "<unk>" and "<eos>" in written

    ids = wt.sequences(
        wt.encode(
            os.path.join(corpus, "wiki.test.tokens"), result["vocabulary"]
        ),
        16,
    )[0][:4]
    expected = model.predict(ids, verbose=0)
    restored = keras.saving.load_model(str(tmp_path / "run" / "best.keras"))
    np.testing.assert_allclose(
        restored.predict(ids, verbose=0), expected, atol=1e-5
    )
    served = tf.saved_model.load(result["export_dir"])
    np.testing.assert_allclose(
        served.serve(tf.constant(ids)).numpy(), expected, atol=1e-5
    )
    # Any length: the endpoint takes [batch, length] ids.
    np.testing.assert_allclose(
        served.serve(tf.constant(ids[:, :9])).numpy(),
        expected[:, :9],
        atol=1e-5,
    )


def run_script(*args):
    return subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "wikitext103_transformer.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )


@pytest.mark.parametrize("given", [True, False])
def test_missing_data_is_a_clear_error(tmp_path, given):
    args = [f"--data_dir={tmp_path}"] if given else []
    done = run_script(*args, f"--model_dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "wikitext-103-v1.zip" in done.stderr
    if given:
        assert os.path.join(str(tmp_path), "wiki.train.tokens") in done.stderr
    else:
        assert "--data_dir is not set" in done.stderr


def test_bad_flags():
    done = run_script("--max_vocab=1")
    assert done.returncode != 0
    assert "--max_vocab=1" in done.stderr
