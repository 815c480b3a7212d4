"""DEQTransformerLM: causality, parameters, training with JR, generation."""

import keras
import numpy as np
import pytest

import keras_deq
from keras_deq.models import DEQTransformerBlock
from keras_deq.models import DEQTransformerLM
from tests.any_backend import BACKEND
from tests.any_backend import to_numpy

VOCAB = 30
TINY = dict(hidden_dim=16, num_heads=2, intermediate_dim=24, seed=0)


def tokens(seed=0, batch=3, length=12):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_later_tokens_leave_earlier_logits_unchanged(norm, solver):
    model = DEQTransformerLM(VOCAB, norm=norm, solver=solver, **TINY)
    ids = tokens()
    changed = ids.copy()
    t = 6
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % VOCAB
    a = to_numpy(model(ids, training=False))
    b = to_numpy(model(changed, training=False))
    assert np.abs(a[:, : t + 1] - b[:, : t + 1]).max() <= 1e-5
    # The test can see a dependence: the changed positions do move.
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-4


def test_block_is_a_transformer_layer_with_injection():
    """f against the same formula written out with NumPy (post-LN)."""
    block = DEQTransformerBlock(weight_norm=False, dropout=0.0, **TINY)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 5, 16)).astype("float32")
    x = rng.normal(size=(2, 5, 48)).astype("float32")
    out = to_numpy(block(z, x))

    def ln(h, layer):
        mu = h.mean(-1, keepdims=True)
        var = h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-5) * layer.gamma.numpy() + (
            layer.beta.numpy()
        )

    qkv = z @ block.qkv.kernel.numpy() + x
    q, k, v = np.split(qkv.reshape(2, 5, 3, 2, 8), 3, axis=2)
    q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    scores = np.where(np.tril(np.ones((5, 5))) > 0, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = (weights @ v).transpose(0, 2, 1, 3).reshape(2, 5, 16)
    a = attended @ block.attention_output.kernel.numpy()
    a += block.attention_output.bias.numpy()
    h = ln(z + a, block.norm1)
    inner = np.maximum(
        h @ block.ffn_inner.kernel.numpy() + block.ffn_inner.bias.numpy(), 0
    )
    f = inner @ block.ffn_output.kernel.numpy() + block.ffn_output.bias.numpy()
    np.testing.assert_allclose(out, ln(h + f, block.norm2), atol=1e-5)


def test_parameter_count_matches_the_architecture():
    v, d, i = VOCAB, 16, 24
    model = DEQTransformerLM(VOCAB, **TINY)
    wn = 1  # WeightNormalization adds g, one per output unit
    expected = (
        v * d  # tied embedding and softmax
        + d * 3 * d
        + 3 * d
        + wn * 3 * d  # injection (with bias)
        + d * 3 * d
        + wn * 3 * d  # qkv (no bias)
        + d * d
        + d
        + wn * d  # attention output
        + d * i
        + i
        + wn * i  # feed-forward in
        + i * d
        + d
        + wn * d  # feed-forward out
        + 2 * 2 * d  # two LayerNorms
        + 2  # the DEQLayer's γ and p (non-trainable)
    )
    assert model.count_params() == expected
    pre = DEQTransformerLM(VOCAB, norm="pre", **TINY)
    assert pre.count_params() == expected + 2 * d  # the final LayerNorm


def test_softmax_head_is_the_transposed_embedding():
    model = DEQTransformerLM(VOCAB, **TINY)
    embedding = model.get_layer("token_embedding").embeddings.numpy()
    vocab_sized = [w for w in model.weights if VOCAB in tuple(w.shape)]
    assert len(vocab_sized) == 1
    ids = tokens(batch=2, length=5)
    features = to_numpy(
        keras.Model(model.input, model.get_layer("output_dropout").output)(
            ids, training=False
        )
    )
    np.testing.assert_allclose(
        to_numpy(model(ids, training=False)),
        features @ embedding.T,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_trains_with_the_jacobian_penalty_on(norm, seed, record_property):
    """Learns a deterministic successor map, beyond the token frequencies.

    Calibrated on seeds 0-4 for both norms: the loss after 40 steps is
    0.48-1.36, against log(10) = 2.30 for a model that only learns which
    10 tokens occur (every run of the N(0, 0.01²) initialisation ended at
    2.37 or above).
    """
    model = DEQTransformerLM(
        VOCAB, norm=norm, jac_weight=1.6, jac_freq=1.0, **{**TINY, "seed": seed}
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # Shifted cycles 0..9: the next token is a function of the current one.
    ids = np.stack([np.roll(np.tile(np.arange(10), 3), i) for i in range(8)])
    x, y = ids[:, :-1], ids[:, 1:]
    before = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    history = model.fit(x, y, epochs=40, batch_size=8, verbose=0).history
    after = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert np.all(np.isfinite(history["loss"]))
    record_property("loss_after", after)
    assert after < np.log(10) - 0.5, (before, after)
    if BACKEND != "tensorflow":
        return  # the penalty's value is logged on TensorFlow only
    # p = 1: every step computed the penalty, and it is in the loss.
    assert all(v > 0 for v in history["deq_jac_loss"])
    assert all(
        total > jac
        for total, jac in zip(
            history["loss"], history["deq_jac_loss"], strict=True
        )
    )


def test_generate_without_cache_runs_the_whole_sequence_through_the_deq():
    model = DEQTransformerLM(VOCAB, **TINY)
    prompt = tokens(seed=3, batch=2, length=4)
    out = model.generate(prompt, 5, cache=False)
    assert out.shape == (2, 9)
    np.testing.assert_array_equal(out[:, :4], prompt)
    # Reference: argmax of the full forward pass over the growing sequence.
    ids = prompt.copy()
    for _ in range(5):
        logits = model.predict(ids, verbose=0)[:, -1]
        ids = np.concatenate([ids, logits.argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)
    single = model.generate(prompt[0], 5, cache=False)
    np.testing.assert_array_equal(single, ids[0])
    a = model.generate(prompt, 6, temperature=1.0, seed=4, cache=False)
    b = model.generate(prompt, 6, temperature=1.0, seed=4, cache=False)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < VOCAB


def test_generate_samples_through_keras_hub_samplers():
    from keras_hub import samplers

    model = DEQTransformerLM(VOCAB, **TINY)
    prompt = tokens(seed=5, batch=2, length=3)
    greedy = model.generate(prompt, 4, cache=False)
    # k = 1 and a vanishing nucleus both leave only the argmax.
    for sampler in (samplers.TopKSampler(k=1), samplers.TopPSampler(p=1e-9)):
        np.testing.assert_array_equal(
            model.generate(prompt, 4, sampler=sampler, cache=False), greedy
        )
    # Top-k by name: every new token is among the k = 5 largest logits of
    # the full forward pass over the sequence before it, and a seed
    # repeats the draws.
    out = model.generate(prompt, 4, sampler="top_k", seed=1, cache=False)
    for t in range(3, 7):
        logits = model.predict(out[:, :t], verbose=0)[:, -1]
        top5 = np.argsort(logits, axis=-1)[:, -5:]
        assert all(out[b, t] in top5[b] for b in range(2)), (t, out)
    np.testing.assert_array_equal(
        out, model.generate(prompt, 4, sampler="top_k", seed=1, cache=False)
    )


def test_generate_rejects_bad_input():
    model = DEQTransformerLM(VOCAB, **TINY)
    with pytest.raises(ValueError, match="token_ids"):
        model.generate(np.zeros((0,), int), 2)
    with pytest.raises(ValueError, match="token_ids"):
        model.generate([1, VOCAB], 2)
    with pytest.raises(TypeError, match="token_ids"):
        model.generate([0.5, 1.0], 2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1, 2], 2, temperature=-1)
    with pytest.raises(ValueError, match="num_tokens"):
        model.generate([1, 2], -1)
    with pytest.raises(ValueError, match="sampler"):
        model.generate([1, 2], 2, sampler="beam")
    from keras_hub import samplers

    with pytest.raises(ValueError, match="temperature"):
        model.generate(
            [1, 2], 2, sampler=samplers.TopKSampler(k=2), temperature=0.5
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_dim=16, num_heads=3), "num_heads"),
        (dict(norm="middle"), "norm"),
        (dict(dropout=1.5), "dropout"),
        (dict(intermediate_dim=0), "intermediate_dim"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEQTransformerLM(VOCAB, **{**TINY, **kwargs})
    with pytest.raises(ValueError, match="vocab_size"):
        DEQTransformerLM(1, **TINY)


def test_block_rejects_wrong_injection_width():
    layer = keras_deq.DEQLayer(DEQTransformerBlock(**TINY))
    with pytest.raises(ValueError, match="injection"):
        layer(np.zeros((2, 5, 16), "float32"))


@pytest.mark.parametrize(
    "hidden_dim, expected",
    [
        (64, 1.6 * np.sqrt(64 / 700)),
        (128, 1.6 * np.sqrt(128 / 700)),
        (1400, 1.6),
    ],
)
def test_default_penalty_strength_follows_the_width(hidden_dim, expected):
    """γ = 1.6 at the paper's width 700 and above, 1.6·√(d/700) below it."""
    small = dict(num_heads=2, intermediate_dim=8, seed=0)
    model = DEQTransformerLM(VOCAB, hidden_dim=hidden_dim, **small)
    deq = model.deq
    np.testing.assert_allclose(float(deq.jac_weight.numpy()), expected, 1e-6)
    assert model.get_config()["jac_weight"] == pytest.approx(expected, 1e-6)
    given = DEQTransformerLM(VOCAB, hidden_dim=64, jac_weight=0.3, **small)
    assert float(given.deq.jac_weight.numpy()) == pytest.approx(0.3)
