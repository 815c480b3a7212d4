r"""Training throughput of MDEQClassifier on this machine, penalty on and off.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 \
      python -m benchmarks.mdeq_throughput --batch_size=32

Times `model.train_on_batch` on random 32×32 images with the Table 4
model (widths 28/56/112/224, Broyden 7/8 NFEs), once with the Jacobian
penalty off (γ = 0) and once with it on every step (γ = 0.5, p = 1), and
reports samples per second (median over `--repeats` after `--warmup`
untimed steps, which include tracing). Writes the raw numbers to
`--output` (JSON).
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

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_WIDTHS = flags.DEFINE_list("widths", ["28", "56", "112", "224"], "Widths.")
_EXPANSION = flags.DEFINE_integer("expansion", 5, "Residual block factor.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (tracing).")
_OUTPUT = flags.DEFINE_string(
    "output", "mdeq_throughput.json", "Where to write the JSON results."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    rng = np.random.default_rng(0)
    batch = _BATCH_SIZE.value
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, batch)
    results = []
    for penalty in (False, True):
        keras.utils.clear_session()
        model = keras_deq.models.MDEQClassifier(
            10,
            widths=tuple(int(w) for w in _WIDTHS.value),
            expansion=_EXPANSION.value,
            jac_weight=0.5 if penalty else 0.0,
            jac_freq=1.0 if penalty else 0.05,
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
        results.append(
            {
                "penalty": penalty,
                "batch_size": batch,
                "parameters": int(model.count_params()),
                "step_seconds": seconds,
                "samples_per_second": batch / seconds["median"],
            }
        )
    off, on = results
    on["ratio_to_penalty_off"] = (
        on["step_seconds"]["median"] / off["step_seconds"]["median"]
    )
    timing.print_table(
        ["penalty", "step s", "min-max ms", "samples/s", "/ off"],
        [
            [
                "on (p = 1)" if r["penalty"] else "off",
                f"{r['step_seconds']['median']:.2f}",
                timing.ms_range(r["step_seconds"]),
                f"{r['samples_per_second']:.1f}",
                f"{r.get('ratio_to_penalty_off', 1.0):.2f}",
            ]
            for r in results
        ],
    )
    timing.write_json(_OUTPUT.value, results)


if __name__ == "__main__":
    app.run(main)
