r"""Thinking longer: a DEQ trained on 32-bit prefix sums solves longer strings.

The task of Schwarzschild et al. (NeurIPS 2021): given a string of bits,
output the running parity (the prefix sum mod 2) at every position. A
network of fixed depth sees a fixed window of the string, so it cannot
solve strings longer than its receptive field; a DEQ's answer is a fixed
point, so the same weights solve a longer string by iterating longer.

    python examples/prefix_sums.py
    python examples/prefix_sums.py --seed=1 --lengths=32,64,128,256,512

The DEQ's block is a causal 1-D convolution over the state with input
injection,

    f(z, x)_i = ReLU(W₂ ReLU(Σ_{j=1..k} A_j z_{i−j} + x_i + b₁) + b₂),

which reads the k states before position i (`--kernel`, 1 by default:
wider taps let the model learn shortcuts that hold on the training length
only; the README has the measurement), never z_i itself;
x is a learned per-bit embedding (a 1×1 convolution of the bits). Its
Jacobian is strictly lower block-triangular, so plain fixed-point
iteration reaches the fixed point exactly, in at most L + 1 evaluations
for a string of length L, from any first iterate: the model is path
independent by construction, and information travels one position per
iteration (or up to k, if the model learns to use the wider taps). The
DEQ trains on length-32 strings with a budget of 34 iterations and the
implicit gradient (its backward iteration is exact in as many steps), and
is evaluated on longer strings with a budget that grows with the length:
`DEQLayer.override_inference(max_iter=...)`, the test-time budget.

Baselines: the same block stacked to the training budget's depth (34),
weight-tied (`tied`: 34 plain iterations from zero, trained through) and
untied (`untied`: 34 blocks of their own), trained the same way. Their
receptive field is 34 · k positions.

The script writes `results.json` under `--output_dir` (a list `rows`: one
object per model, length and budget, with `model`, `length`, `budget`,
`accuracy` (whole strings right), `bit_accuracy`, `nfe`, `residual`
(the DEQ solve's mean relative residual) and `path_agreement` (the
fraction of strings whose answer is the same from N(0, 1) first iterates),
and `accuracy.png`: the DEQ's accuracy against its budget, one curve per
length, with the baselines as points.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_deq  # noqa: E402

try:
    from examples import common  # noqa: E402
    from examples import plotting  # noqa: E402
except ImportError:  # run as a script: examples/ itself is on sys.path
    import common  # noqa: E402
    import plotting  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags; defined only when run as a script, so that the
    examples can be imported together."""
    flags.DEFINE_integer("train_length", 32, "Length of the training strings.")
    flags.DEFINE_list(
        "lengths", ["32", "64", "128", "256"], "Lengths to evaluate on."
    )
    flags.DEFINE_integer("width", 32, "Channels of the state.")
    flags.DEFINE_integer("kernel", 1, "Causal taps k of the state conv.")
    flags.DEFINE_integer("epochs", 8, "Training epochs.")
    flags.DEFINE_integer("steps_per_epoch", 100, "Steps per epoch.")
    flags.DEFINE_integer("batch_size", 64, "Strings per batch.")
    flags.DEFINE_float("learning_rate", 3e-3, "Adam start rate.")
    flags.DEFINE_list(
        "baselines", ["tied", "untied"], "Explicit baselines: tied, untied."
    )
    flags.DEFINE_integer("eval_strings", 1000, "Strings per length.")
    flags.DEFINE_integer("seed", 0, "Random seed (data and weights).")
    flags.DEFINE_string(
        "output_dir",
        "runs/prefix_sums",
        "Where to write results.json and accuracy.png (runs/ is git-ignored).",
    )
    flags.DEFINE_bool("plot", True, "Draw accuracy.png (matplotlib).")
    flags.DEFINE_integer("verbose", 1, "Keras fit verbosity (0, 1, 2).")


BASELINES = ("tied", "untied")


def bit_strings(num, length, rng):
    """`(bits, parity)`: float32 `[num, length, 1]` bits and their running
    parity (the prefix sum mod 2) at every position."""
    bits = rng.integers(0, 2, size=(num, length, 1))
    return bits.astype("float32"), (np.cumsum(bits, 1) % 2).astype("float32")


class BitStrings(keras.utils.PyDataset):
    """Fresh random strings for every batch: the training set never
    repeats, so the score is the task's, not a memorised sample's."""

    def __init__(self, length, batch_size, steps, seed):
        super().__init__()
        self.length, self.batch_size, self.steps = length, batch_size, steps
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return bit_strings(self.batch_size, self.length, self.rng)


@keras.saving.register_keras_serializable(package="keras_deq_examples")
class CausalConvBlock(keras.layers.Layer):
    """f(z, x)_i = ReLU(W₂ ReLU(Σ_j A_j z_{i−j} + x_i + b₁) + b₂), j = 1..k.

    The state z and the injection x are `[B, L, width]`. Position i reads
    the `kernel` states before it and its own injection, never z_i: the
    block is strictly causal, so its fixed point is reached exactly by
    plain iteration in at most L + 1 evaluations, from any start.

    Args:
        kernel: causal taps k >= 1. Defaults to 1.
    """

    def __init__(self, kernel=1, **kwargs):
        super().__init__(**kwargs)
        self.kernel = kernel

    def build(self, z_shape, x_shape):
        width = z_shape[-1]
        self.taps = keras.layers.Conv1D(
            width, self.kernel, padding="valid", name="taps"
        )
        self.taps.build((None, None, width))
        self.out = keras.layers.Dense(width, activation="relu", name="out")
        self.out.build((None, None, width))

    def call(self, z, x, training=None):
        # Left-pad by k and drop the last state: position i sees
        # z_{i−k}, ..., z_{i−1}.
        shifted = keras.ops.pad(z, [[0, 0], [self.kernel, 0], [0, 0]])
        reads = self.taps(shifted[:, :-1])
        return self.out(keras.ops.relu(reads + x))

    def get_config(self):
        return {**super().get_config(), "kernel": self.kernel}


def budget_for(length):
    """Evaluations of the block that reach the fixed point of a string of
    `length`: one per position, one for the first iterate and one that
    reads a zero residual."""
    return length + 2


def build_deq(train_length, width=32, kernel=1, seed=0):
    """The DEQ: bit embedding, `DEQLayer(CausalConvBlock)`, a logit per bit.

    Plain iteration (`fixed_point`) for the forward and the implicit
    backward, with `budget_for(train_length)` iterations each.
    """
    bits = keras.Input((None, 1), name="bits")
    injection = keras.layers.Conv1D(width, 1, name="embed")(bits)
    budget = budget_for(train_length)
    deq = keras_deq.DEQLayer(
        CausalConvBlock(kernel, name="block"),
        solver="fixed_point",
        max_iter=budget,
        # Relative to a whole string: a looser tol stops while the last
        # positions still move. The exact fixed point reads a residual 0.
        tol=1e-6,
        backward_max_iter=budget,
        backward_tol=1e-6,
        seed=seed,
        name="deq",
    )
    logits = keras.layers.Dense(1, name="logit")(deq(injection))
    return keras.Model(bits, logits, name="deq")


def build_baseline(kind, train_length, width=32, kernel=1):
    """The block stacked `budget_for(train_length)` deep from z = 0."""
    if kind not in BASELINES:
        raise ValueError(
            f"`kind` must be one of {BASELINES}. Received: kind={kind!r}"
        )
    depth = budget_for(train_length)
    bits = keras.Input((None, 1), name="bits")
    injection = keras.layers.Conv1D(width, 1, name="embed")(bits)
    z = keras.ops.zeros_like(keras.ops.repeat(bits, width, axis=-1))
    tied = CausalConvBlock(kernel, name="block")
    for _ in range(depth):
        block = tied if kind == "tied" else CausalConvBlock(kernel)
        z = block(z, injection)
    logits = keras.layers.Dense(1, name="logit")(z)
    return keras.Model(bits, logits, name=kind)


def train(
    model,
    train_length,
    epochs,
    steps_per_epoch,
    batch_size,
    rate,
    seed,
    verbose=1,
):
    """Adam at `rate` with cosine decay, per-bit cross-entropy."""
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(
                rate, epochs * steps_per_epoch
            )
        ),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="bit_acc")],
    )
    data = BitStrings(train_length, batch_size, steps_per_epoch, seed)
    start = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=verbose)
    return time.perf_counter() - start


def score(model, bits, parity, batch_size=250):
    """Whole-string and per-bit accuracy, and the predicted bits."""
    logits = model.predict(bits, batch_size=batch_size, verbose=0)
    predicted = logits > 0
    right = predicted == (parity > 0.5)
    return (
        float(np.mean(right.all(axis=(1, 2)))),
        float(right.mean()),
        predicted,
    )


def evaluate_deq(model, length, budgets, bits, parity):
    """One row per budget, and the path check at the largest."""
    deq = model.get_layer("deq")
    rows = []
    for budget in budgets:
        keras_deq.diagnostics.override_inference(model, max_iter=budget)
        deq.forward_nfe.reset_state()
        deq.forward_residual.reset_state()
        accuracy, bit_accuracy, predicted = score(model, bits, parity)
        rows.append(
            {
                "model": "deq",
                "length": length,
                "budget": budget,
                "accuracy": accuracy,
                "bit_accuracy": bit_accuracy,
                "nfe": float(deq.forward_nfe.result()),
                "residual": float(deq.forward_residual.result()),
                "path_agreement": None,
            }
        )
    keras_deq.diagnostics.override_inference(
        model, max_iter=budgets[-1], random_start=1.0
    )
    *_, from_noise = score(model, bits, parity)
    rows[-1]["path_agreement"] = float(
        np.mean((from_noise == predicted).all(axis=(1, 2)))
    )
    keras_deq.diagnostics.override_inference(model)
    return rows


def budgets_for(length, train_length):
    """Powers of 2 from 8, the training budget, the length's budget and
    twice that."""
    top = 2 * budget_for(length)
    grid = {budget_for(train_length), budget_for(length), top}
    grid |= {2**k for k in range(3, top.bit_length()) if 2**k < top}
    return sorted(grid)


def run(
    train_length=32,
    lengths=(32, 64, 128, 256),
    width=32,
    kernel=1,
    epochs=8,
    steps_per_epoch=100,
    batch_size=64,
    learning_rate=3e-3,
    baselines=BASELINES,
    eval_strings=1000,
    seed=0,
    output_dir=None,
    plot=True,
    verbose=0,
):
    """Trains the DEQ and the baselines; returns {"rows", "seconds"}."""
    for name in baselines:
        if name not in BASELINES:
            raise ValueError(
                f"`baselines` takes {BASELINES}. Received: {name!r}"
            )
    rng = np.random.default_rng(seed + 1000)
    tests = {n: bit_strings(eval_strings, n, rng) for n in lengths}
    settings = (epochs, steps_per_epoch, batch_size, learning_rate, seed)
    rows, seconds = [], {}
    keras.utils.set_random_seed(seed)
    deq = build_deq(train_length, width, kernel, seed)
    seconds["deq"] = train(deq, train_length, *settings, verbose=verbose)
    for length in lengths:
        rows += evaluate_deq(
            deq, length, budgets_for(length, train_length), *tests[length]
        )
    for name in baselines:
        keras.utils.set_random_seed(seed)
        model = build_baseline(name, train_length, width, kernel)
        seconds[name] = train(model, train_length, *settings, verbose=verbose)
        for length in lengths:
            accuracy, bit_accuracy, _ = score(model, *tests[length])
            rows.append(
                {
                    "model": name,
                    "length": length,
                    "budget": budget_for(train_length),
                    "accuracy": accuracy,
                    "bit_accuracy": bit_accuracy,
                    "nfe": float(budget_for(train_length)),
                    "residual": None,
                    "path_agreement": None,
                }
            )
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        config = dict(
            train_length=train_length,
            width=width,
            kernel=kernel,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
        )
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(
                {"config": config, "seconds": seconds, "rows": rows},
                f,
                indent=1,
            )
        if plot:
            draw(rows, os.path.join(output_dir, "accuracy.png"), train_length)
    return {"rows": rows, "seconds": seconds, "model": deq}


def headline(rows, train_length):
    """Per model and length: accuracy at the training budget and at the
    length's own budget (the DEQ), or at its depth (baselines)."""
    lines = [
        f"{'model':>7} | {'length':>6} | {'budget':>6} | {'strings':>7} | "
        f"{'bits':>6} | {'NFE':>6} | {'path':>5}"
    ]
    lines.append("-" * len(lines[0]))
    for row in rows:
        if row["model"] == "deq" and row["budget"] not in (
            budget_for(train_length),
            budget_for(row["length"]),
            2 * budget_for(row["length"]),
        ):
            continue
        path = row["path_agreement"]
        lines.append(
            f"{row['model']:>7} | {row['length']:>6} | {row['budget']:>6} | "
            f"{100 * row['accuracy']:6.1f}% | "
            f"{100 * row['bit_accuracy']:5.1f}% | {row['nfe']:6.1f} | "
            + ("    -" if path is None else f"{path:5.3f}")
        )
    return "\n".join(lines)


def draw(rows, path, train_length=32):
    """Whole-string accuracy against the budget, one curve per length."""
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    lengths = sorted({r["length"] for r in rows})
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, len(lengths)))
    markers = {"tied": "s", "untied": "^"}
    for color, length in zip(colors, lengths, strict=True):
        deq = [r for r in rows if r["model"] == "deq" and r["length"] == length]
        ax.plot(
            [r["budget"] for r in deq],
            [100 * r["accuracy"] for r in deq],
            ".-",
            color=color,
            label=f"DEQ, length {length}",
        )
        for r in rows:
            if r["length"] == length and r["model"] in markers:
                ax.plot(
                    r["budget"],
                    100 * r["accuracy"],
                    markers[r["model"]],
                    color=color,
                    mfc="none",
                    label=f"{r['model']} network, length {length}",
                )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("iterations at test time (explicit networks: depth)")
    ax.set_ylabel("strings exactly right (%)")
    ax.set_title(
        f"prefix sums: trained on {train_length} bits, solved by iterating "
        "longer"
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    plotting.save(fig, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        lengths = [int(n) for n in FLAGS.lengths]
    except ValueError:
        raise app.UsageError(
            f"--lengths takes integers, e.g. 32,64,128. Got {FLAGS.lengths}"
        ) from None
    if min(lengths) < 1 or FLAGS.train_length < 1:
        raise app.UsageError("--lengths and --train_length must be >= 1.")
    unknown = sorted(set(FLAGS.baselines) - set(BASELINES))
    if unknown:
        raise app.UsageError(
            f"--baselines takes {list(BASELINES)}. Unknown: {unknown}"
        )
    result = run(
        train_length=FLAGS.train_length,
        lengths=lengths,
        width=FLAGS.width,
        kernel=FLAGS.kernel,
        epochs=FLAGS.epochs,
        steps_per_epoch=FLAGS.steps_per_epoch,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        baselines=FLAGS.baselines,
        eval_strings=FLAGS.eval_strings,
        seed=FLAGS.seed,
        output_dir=FLAGS.output_dir,
        plot=FLAGS.plot,
        verbose=FLAGS.verbose,
    )
    print()
    print(headline(result["rows"], FLAGS.train_length))
    print(
        "\ntraining seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())
    )
    print(f"Wrote {FLAGS.output_dir}/results.json", end="")
    print(" and accuracy.png" if FLAGS.plot else "")


if __name__ == "__main__":
    define_flags()
    common.run(main)
