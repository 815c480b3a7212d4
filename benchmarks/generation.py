r"""Generation with cached equilibria against a full re-solve per token.

    export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736
    python -m benchmarks.generation

Trains a char-level `DEQTransformerLM` (defaults, sizes aside: width
`--hidden_dim`, `--num_heads`, `--intermediate_dim`) on Keras' own sources
(`benchmarks/char_text.py`) for `--epochs` of Adam 1e-3, or loads the
weights a previous run left in `--weights`. Then:

- **Agreement.** `--prompts` held-out windows of `--prompt_len`
  characters are continued greedily by `--new_tokens` with
  `generate(cache=True)` (one position's solve per token, `decode_step`)
  and `generate(cache=False)` (a full forward pass per token). It counts
  the identical continuations and, at the first differing token of each
  other one, the margin between the two candidates' logits in the full
  re-solve, relative to the norm of those logits (a near-tie is a margin
  within a few tolerances). It also takes the cached logits at every new
  position and their relative distance ‖Δ‖ / ‖logits‖ to the full pass
  over the same sequence (with `sample_axes=2` one pass over the whole
  sequence gives every position's logits exactly as a re-solve at that
  length would).
- **Speed.** For a `--speed_prompt`-token prompt and `--speed_tokens` new
  tokens, at each batch size of `--batch_sizes`: tokens per second of
  `generate` with and without the cache (median of `--repeats`, traced
  beforehand), and the time of each token against its position (one
  timed pass of the same per-token calls `generate` makes).

`--max_iter` and `--solver` change the forward solve of both paths (after
training): where a solve stops at the cap above the tolerance, the two
paths are two different unconverged iterates.

Prints the tables, writes everything to `--output` (JSON) and the time
per token against position to `--plot` (PNG, needs matplotlib).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import cache_agreement  # noqa: E402
from benchmarks import char_text  # noqa: E402
from benchmarks import timing  # noqa: E402
from keras_deq.models import DEQTransformerLM  # noqa: E402

_HIDDEN_DIM = flags.DEFINE_integer("hidden_dim", 128, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_INTERMEDIATE_DIM = flags.DEFINE_integer(
    "intermediate_dim", 256, "Feed-forward width."
)
_NUM_CHARS = flags.DEFINE_integer("num_chars", 300_000, "Text to train on.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Training window length.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Training epochs.")
_SEED = flags.DEFINE_integer("seed", 0, "Model and data seed.")
_WEIGHTS = flags.DEFINE_string(
    "weights",
    "generation.weights.h5",
    "Trained weights: loaded if the file exists, else written after training.",
)
_MAX_ITER = flags.DEFINE_integer(
    "max_iter",
    None,
    "Forward iterations when generating (both paths); default: the model's.",
    lower_bound=1,
)
_SOLVER = flags.DEFINE_enum(
    "solver",
    None,
    ["broyden", "anderson", "fixed_point"],
    "Forward solver when generating (both paths); default: the model's.",
)
_PROMPTS = flags.DEFINE_integer("prompts", 20, "Prompts of the agreement.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Their length.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Tokens per prompt.")
_SPEED_PROMPT = flags.DEFINE_integer("speed_prompt", 64, "Prompt (speed).")
_SPEED_TOKENS = flags.DEFINE_integer("speed_tokens", 64, "New tokens (speed).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Speed batches.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed generations per case.")
_OUTPUT = flags.DEFINE_string(
    "output", "generation.json", "Where to write the JSON results."
)
_PLOT = flags.DEFINE_string(
    "plot", "generation.png", "Time per token against position (PNG)."
)


def trained_model():
    """The model, trained or loaded; its held-out windows; and its fit."""
    train, test, vocab = char_text.char_windows(
        _NUM_CHARS.value, _SEQ_LEN.value
    )
    keras.utils.set_random_seed(_SEED.value)
    model = DEQTransformerLM(
        vocab,
        hidden_dim=_HIDDEN_DIM.value,
        num_heads=_NUM_HEADS.value,
        intermediate_dim=_INTERMEDIATE_DIM.value,
        seed=_SEED.value,
    )
    loaded = os.path.exists(_WEIGHTS.value)
    if loaded:
        model.load_weights(_WEIGHTS.value)
        print(f"Loaded trained weights from {_WEIGHTS.value}")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if not loaded:
        model.fit(*train, batch_size=32, epochs=_EPOCHS.value, verbose=2)
        model.save_weights(_WEIGHTS.value)
    if _MAX_ITER.value is not None:
        model.deq.max_iter = _MAX_ITER.value
    if _SOLVER.value is not None:
        model.deq.solver = _SOLVER.value
    loss = model.evaluate(*test, batch_size=32, verbose=0, return_dict=True)
    return model, test[0], {"held_out_perplexity": float(np.exp(loss["loss"]))}


def per_token_seconds(model, prompt, num_tokens, cache):
    """Seconds of each new token's logits, by the calls `generate` makes
    (for the cache: the prompt's solve, then `num_tokens` − 1 steps)."""
    times, ids = [], prompt
    start = time.perf_counter()
    if cache:
        logits, decode = model._cached_decoder(prompt, num_tokens)
    for step in range(num_tokens):
        if not cache:
            logits = model.next_token_logits(ids)
        new = logits.numpy().argmax(-1)[:, None].astype(np.int32)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ids = np.concatenate([ids, new], 1)
        if cache and step < num_tokens - 1:
            logits = decode(new)
    return times


def speed(model, held_out):
    results = []
    for batch in map(int, _BATCH_SIZES.value):
        rows = np.arange(batch) % len(held_out)
        prompt = held_out[rows, : _SPEED_PROMPT.value].astype(np.int32)
        record = {"batch": batch}
        for cache in (False, True):
            kind = "cached" if cache else "full"
            seconds = timing.measure(
                lambda c=cache, prompt=prompt: model.generate(
                    prompt, _SPEED_TOKENS.value, cache=c
                ),
                repeats=_REPEATS.value,
                warmup=1,
            )
            record[f"{kind}_tokens_per_s"] = (
                batch * _SPEED_TOKENS.value / seconds["median"]
            )
            record[f"{kind}_seconds"] = seconds
            record[f"{kind}_per_token_s"] = per_token_seconds(
                model, prompt, _SPEED_TOKENS.value, cache
            )
        record["speedup"] = (
            record["cached_tokens_per_s"] / record["full_tokens_per_s"]
        )
        results.append(record)
    return results


def plot(results, path):
    from examples import plotting

    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    positions = _SPEED_PROMPT.value + np.arange(_SPEED_TOKENS.value)
    for record, colour in zip(results, ["C0", "C1", "C2", "C3"], strict=False):
        for kind, style in (("full", "-"), ("cached", "--")):
            ax.plot(
                positions,
                1e3 * np.array(record[f"{kind}_per_token_s"]),
                style,
                color=colour,
                label=f"{kind}, batch {record['batch']}",
            )
    ax.set_xlabel("position of the new token")
    ax.set_ylabel("ms per token")
    ax.set_yscale("log")
    ax.set_title("DEQTransformerLM generation: full re-solve vs cache")
    ax.legend(loc="center right")
    plotting.save(fig, path)


def main(argv):
    del argv
    for flag in (_PROMPT_LEN, _SPEED_PROMPT):
        if not 1 <= flag.value <= _SEQ_LEN.value:
            raise ValueError(
                f"--{flag.name} must be in [1, --seq_len={_SEQ_LEN.value}] "
                f"(prompts are held-out windows). Received: {flag.value}"
            )
    model, held_out, fit = trained_model()
    print(f"held-out perplexity {fit['held_out_perplexity']:.2f}")
    rng = np.random.default_rng(_SEED.value)
    rows = rng.choice(len(held_out), _PROMPTS.value, replace=False)
    prompts = held_out[rows, : _PROMPT_LEN.value].astype(np.int32)
    agree = cache_agreement.agreement(model, prompts, _NEW_TOKENS.value)
    print(
        f"\nGreedy continuations identical: {agree['identical']} of "
        f"{agree['prompts']} ({agree['new_tokens']} tokens each); tokens "
        f"equal {100 * agree['tokens_equal']:.1f}%"
    )
    for tie in agree["differing"]:
        print(
            f"  prompt {tie['prompt']}: first difference at new token "
            f"{tie['position']}, logit margin {tie['relative_margin']:.2e} "
            "of ‖logits‖ in the full re-solve"
        )
    print(
        "Cached logits against the full pass, relative: median "
        f"{agree['logit_error_median']:.2e}, max {agree['logit_error_max']:.2e}"
        f" (10 × tol = {10 * agree['tol']:.0e}); within 10 × tol: "
        f"{100 * agree['within_10_tol']:.1f}% of positions"
    )
    print(
        "Against a tight solve (tol 1e-6, 200 iterations), max: cached "
        f"{agree['cached_exact_error_max']:.2e}, full re-solve "
        f"{agree['full_exact_error_max']:.2e}\n"
    )
    results = speed(model, held_out)
    timing.print_table(
        [
            "batch",
            "full tok/s",
            "cached tok/s",
            "speed-up",
            "ms/token full",
            "ms/token cached",
        ],
        [
            [
                r["batch"],
                f"{r['full_tokens_per_s']:.1f}",
                f"{r['cached_tokens_per_s']:.1f}",
                f"{r['speedup']:.1f}",
                "{:.1f} → {:.1f}".format(
                    *(
                        1e3 * np.median(r["full_per_token_s"][s])
                        for s in (slice(0, 8), slice(-8, None))
                    )
                ),
                "{:.1f} → {:.1f}".format(
                    *(
                        1e3 * np.median(r["cached_per_token_s"][s])
                        for s in (slice(0, 8), slice(-8, None))
                    )
                ),
            ]
            for r in results
        ],
    )
    print("(ms/token: median of the first 8 tokens → of the last 8)")
    timing.write_json(
        _OUTPUT.value, {"fit": fit, "agreement": agree, "speed": results}
    )
    if _PLOT.value:
        plot(results, _PLOT.value)
        print(f"Wrote {_PLOT.value}")


if __name__ == "__main__":
    app.run(main)
