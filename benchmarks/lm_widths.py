r"""DEQTransformerLM at its defaults across widths, both LayerNorm placements.

    python -m benchmarks.lm_widths
    python -m benchmarks.lm_widths --widths=64,700 --norms=post --seeds=0,1

Char-level text that ships with Keras (`benchmarks/char_text.py`: the
first `--num_chars` characters of Keras' own `layers` sources, the last
10% held out) in windows of `--seq_len`. Each run builds
`DEQTransformerLM(vocab, hidden_dim=w, num_heads=h, intermediate_dim=
--ffn_ratio·w, norm=...)` with every other argument at its default (so the
width-aware γ, the N(0, 1/fan_in) initialisation, Broyden 12/12, dropout
0.06, weight normalization, the penalty at p = 0.35) and trains it with
Adam 1e-3, batch `--batch_size`, for `--epochs`. h is 4 up to width 256
and above it the divisor of the width nearest width / 64 (7 at 448, 10 at
700, the paper's). Prints, per width and norm, the held-out perplexity as
a fraction of the unigram perplexity and of an explicit one-layer
transformer of the same width trained identically (`--baseline`), the
forward NFE and residual at evaluation, γ and the seconds per training
step (the wall-clock of fit and evaluation, tracing included, over the
training steps: a rough figure).
`--model_kwargs` (JSON) sets further arguments, e.g. `'{"jac_weight": 0}'`;
`--history` adds the training and held-out perplexity of every epoch.
Writes every run to `--output` (JSON).
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

from benchmarks import char_text  # noqa: E402
from keras_deq.models import DEQTransformerLM  # noqa: E402

_WIDTHS = flags.DEFINE_list(
    "widths", ["64", "128", "256", "448", "700"], "Model widths."
)
_NORMS = flags.DEFINE_list("norms", ["post", "pre"], "LayerNorm placements.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, one run each.")
_NUM_CHARS = flags.DEFINE_integer("num_chars", 100_000, "Characters of text.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 32, "Characters per window.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Windows per step.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Passes over the training part.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 1e-3, "Adam's learning rate, for both models."
)
_FFN_RATIO = flags.DEFINE_integer(
    "ffn_ratio", 2, "Feed-forward width as a multiple of the model width."
)
_BASELINE = flags.DEFINE_bool(
    "baseline", True, "Also train the explicit one-layer transformer."
)
_HISTORY = flags.DEFINE_bool(
    "history",
    False,
    "Also record the training perplexity of every epoch and the held-out "
    "perplexity after it (the times then include the evaluations).",
)
_MODEL_KWARGS = flags.DEFINE_string(
    "model_kwargs", "{}", "JSON of further DEQTransformerLM arguments."
)
_OUTPUT = flags.DEFINE_string(
    "output", "lm_widths.json", "Where to write the JSON results."
)


def heads_for(width):
    """4 heads up to width 256, else the divisor of `width` nearest w / 64."""
    if width <= 256:
        return 4
    divisors = [h for h in range(1, width + 1) if width % h == 0]
    return min(divisors, key=lambda h: (abs(h - width / 64), h))


def run(
    width,
    norm,
    seed,
    data,
    epochs,
    batch_size,
    ffn_ratio,
    baseline,
    model_kwargs=None,
    per_epoch=False,
    learning_rate=1e-3,
):
    """One width and norm: a dict of the measurements. `per_epoch` adds
    the training and held-out perplexity of every epoch, and the training
    objective of every epoch (the mean cross-entropy plus the mean
    Jacobian penalty, as `fit` minimises it) as
    `train_objective_per_epoch`."""
    train, test, vocab = data
    unigram = char_text.unigram_perplexity(train[1], test[1], vocab)
    heads = heads_for(width)
    intermediate = ffn_ratio * width
    result = {
        "width": width,
        "norm": norm,
        "seed": seed,
        "num_heads": heads,
        "intermediate_dim": intermediate,
        "unigram_perplexity": unigram,
        "model_kwargs": model_kwargs or {},
    }
    if baseline:
        keras.utils.set_random_seed(seed)
        explicit = char_text.explicit_transformer(
            vocab, width, heads, intermediate, train[0].shape[1]
        )
        result["explicit_perplexity"], *_ = char_text.held_out_perplexity(
            explicit,
            train,
            test,
            epochs,
            batch_size,
            learning_rate=learning_rate,
        )
    keras.utils.set_random_seed(seed)
    model = DEQTransformerLM(
        vocab,
        hidden_dim=width,
        num_heads=heads,
        intermediate_dim=intermediate,
        norm=norm,
        seed=seed,
        **(model_kwargs or {}),
    )
    start = time.perf_counter()
    perplexity, history, logs = char_text.held_out_perplexity(
        model,
        train,
        test,
        epochs,
        batch_size,
        per_epoch=per_epoch,
        learning_rate=learning_rate,
    )
    seconds = time.perf_counter() - start
    steps = epochs * -(-len(train[0]) // batch_size)
    deq = model.deq
    result.update(
        perplexity=perplexity,
        of_unigram=perplexity / unigram,
        learning_rate=float(model.optimizer.learning_rate),
        jac_weight=float(deq.jac_weight),
        forward_nfe=float(logs[f"{deq.name}_forward_nfe"]),
        forward_residual=float(logs[f"{deq.name}_forward_residual"]),
        min_jac_loss=float(
            min(history.get(f"{deq.name}_jac_loss", [float("nan")]))
        ),
        seconds_per_step=seconds / steps,
    )
    if per_epoch:
        for key, name in [
            ("train_perplexity_per_epoch", "cross_entropy"),
            ("held_out_perplexity_per_epoch", "val_cross_entropy"),
        ]:
            result[key] = [float(np.exp(v)) for v in history[name]]
        result["train_objective_per_epoch"] = [
            float(v) for v in history["loss"]
        ]
    if baseline:
        result["of_explicit"] = perplexity / result["explicit_perplexity"]
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    data = char_text.char_windows(_NUM_CHARS.value, _SEQ_LEN.value)
    results = []
    print(
        "width  norm  seed  heads  γ     perplexity  × unigram  × explicit"
        "  forward NFE  residual  s/step"
    )
    for width in map(int, _WIDTHS.value):
        for norm in _NORMS.value:
            for seed in map(int, _SEEDS.value):
                r = run(
                    width,
                    norm,
                    seed,
                    data,
                    _EPOCHS.value,
                    _BATCH_SIZE.value,
                    _FFN_RATIO.value,
                    _BASELINE.value,
                    json.loads(_MODEL_KWARGS.value),
                    per_epoch=_HISTORY.value,
                    learning_rate=_LEARNING_RATE.value,
                )
                results.append(r)
                explicit = f"{r['of_explicit']:.2f}" if _BASELINE.value else "-"
                print(
                    f"{width:5d}  {norm:4s}  {seed:4d}  {r['num_heads']:5d}  "
                    f"{r['jac_weight']:.2f}  {r['perplexity']:10.2f}  "
                    f"{r['of_unigram']:9.3f}  {explicit:>10s}  "
                    f"{r['forward_nfe']:11.2f}  {r['forward_residual']:8.1e}  "
                    f"{r['seconds_per_step']:6.2f}",
                    flush=True,
                )
                for key in ("train", "held_out"):
                    per_epoch = r.get(f"{key}_perplexity_per_epoch", [])
                    if per_epoch:
                        values = " ".join(f"{p:.2f}" for p in per_epoch)
                        print(f"      {key} perplexity per epoch: {values}")
                with open(_OUTPUT.value, "w") as file:
                    json.dump(results, file, indent=1)


if __name__ == "__main__":
    app.run(main)
