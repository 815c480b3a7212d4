r"""A small generated corpus in WikiText format, with learnable structure.

WikiText-103 cannot be downloaded on machines without internet access;
this writes `wiki.train.tokens`, `wiki.valid.tokens` and `wiki.test.tokens`
laid out like the real files (` = Title = ` headings, blank lines,
paragraphs of space-separated words, `<unk>`, ` @-@ `), so the language
model example runs end to end:

    python examples/generated_text.py --out=/tmp/generated_wikitext
    python examples/wikitext103_transformer.py \
        --data_dir=/tmp/generated_wikitext --hidden_dim=64 --num_heads=4 \
        --intermediate_dim=256 --seq_len=32 --batch_size=16 --epochs=8

The text is a sparse Markov chain over `vocab_size` made-up words: each
word (with `order=2`, each pair of preceding words) allows `branching`
next words with random probabilities. Its entropy rate is known
(`entropy_rate`), so a model's perplexity can be compared with the best
achievable (exp(entropy rate)) and with a unigram model (about
`vocab_size`).
"""

import os

import numpy as np

SPLITS = {"train": 0.9, "valid": 0.05, "test": 0.05}
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u")]


class MarkovText:
    """A sparse Markov chain of order 1 or 2 over made-up words."""

    def __init__(self, vocab_size=60, branching=3, order=1, seed=0):
        if order not in (1, 2):
            raise ValueError(f"`order` must be 1 or 2. Received: {order}")
        rng = np.random.default_rng(seed)
        self.words = _make_words(vocab_size, rng)
        self.order = order
        v = vocab_size
        contexts = (v,) * order
        # successors[context] are the words allowed after the context.
        self.successors = np.stack(
            [rng.choice(v, branching, replace=False) for _ in range(v**order)]
        ).reshape(contexts + (branching,))
        self.probs = rng.dirichlet(np.ones(branching), size=contexts)
        self.rng = rng

    def entropy_rate(self):
        """Mean next-word entropy (nats), over the contexts' frequencies."""
        p = self.probs
        per_context = -(p * np.log(p)).sum(-1)
        return float(per_context.mean())

    def sentence(self, length):
        v = len(self.words)
        out = list(self.rng.integers(v, size=self.order))
        while len(out) < length:
            context = tuple(out[-self.order :])
            out.append(
                self.rng.choice(self.successors[context], p=self.probs[context])
            )
        return [self.words[i] for i in out[:length]]


def _make_words(n, rng):
    words = set()
    while len(words) < n:
        k = rng.integers(1, 4)
        words.add("".join(rng.choice(SYLLABLES, k)))
    return sorted(words)


def article(chain, rng, paragraphs=3, words_per_paragraph=(40, 120)):
    lines = [" = " + " ".join(chain.sentence(2)).title() + " = ", ""]
    for _ in range(paragraphs):
        words = chain.sentence(int(rng.integers(*words_per_paragraph)))
        # WikiText's markers: rare words replaced by <unk>, hyphens split.
        words = ["<unk>" if rng.random() < 0.01 else w for w in words]
        if rng.random() < 0.3:
            i = int(rng.integers(1, len(words) - 1))
            words[i : i + 1] = [words[i], "@-@", words[i]]
        lines += [" " + " ".join(words) + " ", ""]
    return lines


def write_corpus(
    directory, num_words=50_000, vocab_size=60, branching=3, order=1, seed=0
):
    """Writes the three WikiText token files; returns the `MarkovText`.

    `num_words` is the approximate size of all three splits together.
    """
    os.makedirs(directory, exist_ok=True)
    chain = MarkovText(vocab_size, branching, order, seed)
    rng = np.random.default_rng(seed + 1)
    for split, share in SPLITS.items():
        lines, count = [""], 0
        while count < share * num_words:
            new = article(chain, rng)
            lines += new
            count += sum(len(line.split()) + 1 for line in new)
        path = os.path.join(directory, f"wiki.{split}.tokens")
        with open(path, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
    return chain


def main():
    from absl import app
    from absl import flags

    flags.DEFINE_string("out", None, "Directory to write the corpus to.")
    flags.DEFINE_integer("num_words", 200_000, "Approximate corpus size.")
    flags.DEFINE_integer("vocab_size", 60, "Distinct made-up words.")
    flags.DEFINE_integer("branching", 3, "Next words allowed per context.")
    flags.DEFINE_integer("order", 1, "Words of context (1 or 2).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.mark_flag_as_required("out")

    def run(argv):
        del argv
        chain = write_corpus(
            flags.FLAGS.out,
            flags.FLAGS.num_words,
            flags.FLAGS.vocab_size,
            flags.FLAGS.branching,
            flags.FLAGS.order,
            flags.FLAGS.seed,
        )
        print(
            f"wrote {flags.FLAGS.out}/wiki.{{train,valid,test}}.tokens; "
            "best achievable perplexity about "
            f"{np.exp(chain.entropy_rate()):.2f}"
        )

    app.run(run)


if __name__ == "__main__":
    main()
