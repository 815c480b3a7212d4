r"""Training throughput of DEQTransformerLM on this machine, penalty on/off.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 \
      python -m benchmarks.lm_throughput --batch_size=2 --vocab_size=50000

Times `model.train_on_batch` on random token ids with the Table 4 model
(width 700, 10 heads, feed-forward 48000, post-LN, Broyden 12/12 NFEs,
sequences of `--seq_len` = 150 tokens), once with the Jacobian penalty off
(γ = 0) and once with it on every step (γ = 1.6, p = 1), and reports
tokens per second (median over `--repeats` after `--warmup` untimed steps,
which include tracing) and the parameter count (which the vocabulary
dominates: 700 per word, tied). Writes the raw numbers to `--output`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_deq  # noqa: E402
from benchmarks import timing  # noqa: E402

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 150, "Tokens per sequence.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 50_000, "Vocabulary size.")
_HIDDEN_DIM = flags.DEFINE_integer("hidden_dim", 700, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 10, "Attention heads.")
_INTERMEDIATE_DIM = flags.DEFINE_integer(
    "intermediate_dim", 48000, "Feed-forward width."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (tracing).")
_OUTPUT = flags.DEFINE_string(
    "output", "lm_throughput.json", "Where to write the JSON results."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    rng = np.random.default_rng(0)
    batch, length = _BATCH_SIZE.value, _SEQ_LEN.value
    ids = rng.integers(0, _VOCAB_SIZE.value, (batch, length + 1))
    x, y = ids[:, :-1].astype("int32"), ids[:, 1:].astype("int32")
    results = []
    for penalty in (False, True):
        keras.utils.clear_session()
        model = keras_deq.models.DEQTransformerLM(
            _VOCAB_SIZE.value,
            hidden_dim=_HIDDEN_DIM.value,
            num_heads=_NUM_HEADS.value,
            intermediate_dim=_INTERMEDIATE_DIM.value,
            jac_weight=1.6 if penalty else 0.0,
            jac_freq=1.0,
            seed=0,
        )
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        seconds = timing.measure(
            lambda model=model: model.train_on_batch(x, y),
            _REPEATS.value,
            _WARMUP.value,
        )
        deq = model.deq
        results.append(
            {
                "penalty": penalty,
                "batch_size": batch,
                "seq_len": length,
                "vocab_size": _VOCAB_SIZE.value,
                "parameters": int(model.count_params()),
                "block_parameters": int(deq.block.count_params()),
                "forward_nfe": float(deq.forward_nfe.result()),
                "step_seconds": seconds,
                "tokens_per_second": batch * length / seconds["median"],
            }
        )
    off, on = results
    on["ratio_to_penalty_off"] = (
        on["step_seconds"]["median"] / off["step_seconds"]["median"]
    )
    print(
        f"parameters: {off['parameters']:,} (f_θ {off['block_parameters']:,}"
        f", vocabulary {off['vocab_size']:,})"
    )
    timing.print_table(
        ["penalty", "step s", "min-max ms", "tokens/s", "NFE", "/ off"],
        [
            [
                "on (p = 1)" if r["penalty"] else "off",
                f"{r['step_seconds']['median']:.2f}",
                timing.ms_range(r["step_seconds"]),
                f"{r['tokens_per_second']:.1f}",
                f"{r['forward_nfe']:.2f}",
                f"{r.get('ratio_to_penalty_off', 1.0):.2f}",
            ]
            for r in results
        ],
    )
    timing.write_json(_OUTPUT.value, results)


if __name__ == "__main__":
    app.run(main)
