r"""Is the char-level DEQTransformerLM an equilibrium model?

    python -m benchmarks.lm_equilibrium --seeds=0,1,2

Trains `DEQTransformerLM` at its defaults (width 64, 4 heads, feed-forward
128; both norms with `--norms`) on 100k characters of real text (Keras'
own `layers` sources, as in the learning test), three epochs, then runs
`keras_deq.diagnostics.equilibrium_report` on the held-out windows:
perplexity, residual and NFE at 1×, 2× and 4× the trained 12 iterations,
and the agreement of the next-token arg-max reached from `--starts` random
first iterates (σ = 1) with the default start's. Prints one row per run
and writes them to `--output` (JSON).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks.char_text import char_windows  # noqa: E402
from benchmarks.char_text import held_out_perplexity  # noqa: E402
from keras_deq import diagnostics  # noqa: E402
from keras_deq.models import DEQTransformerLM  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, one run per norm each.")
_NORMS = flags.DEFINE_list("norms", ["post"], "post and/or pre.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs.")
_STARTS = flags.DEFINE_integer("starts", 2, "Random first iterates.")
_OUTPUT = flags.DEFINE_string(
    "output", "lm_equilibrium.json", "Where to write the JSON results."
)


def cross_entropy(y, logits):
    return keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True
    )


def run(seed, norm, epochs, starts):
    keras.utils.set_random_seed(seed)
    train, test, vocab = char_windows(100_000, 32)
    model = DEQTransformerLM(
        vocab, hidden_dim=64, num_heads=4, intermediate_dim=128, norm=norm
    )
    perplexity, _, _ = held_out_perplexity(model, train, test, epochs=epochs)
    report = diagnostics.equilibrium_report(
        model,
        test[0],
        test[1],
        metric=cross_entropy,
        budgets=(1, 2, 4),
        num_starts=starts,
    )
    for row in report["rows"]:
        row["perplexity"] = float(np.exp(row["metric"]))
    return {"seed": seed, "norm": norm, "perplexity": perplexity, **report}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_NORMS.value) - {"post", "pre"})
    if unknown:
        raise app.UsageError(f"--norms takes post and/or pre. Got {unknown}")
    runs = []
    print("norm seed  ppl@1x  ppl@2x  ppl@4x  res@1x   res@4x   NFE@4x  path")
    for seed in [int(s) for s in _SEEDS.value]:
        for norm in _NORMS.value:
            result = run(seed, norm, _EPOCHS.value, _STARTS.value)
            runs.append(result)
            rows = result["rows"]
            print(
                f"{norm:4s} {seed:4d}  "
                + "  ".join(f"{r['perplexity']:6.3f}" for r in rows)
                + f"  {rows[0]['residual_median']:.2e}"
                f" {rows[-1]['residual_median']:.2e}  {rows[-1]['nfe']:6.2f}"
                f"  {result['path']['agreement']:.4f}",
                flush=True,
            )
            with open(_OUTPUT.value, "w") as f:
                json.dump({"runs": runs}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
