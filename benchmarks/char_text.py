"""Real text for char-level language models: Keras' own source code.

The Python files of Keras' `layers` package ship with every install of
keras_deq (Keras is a dependency), so this text is there offline on any
machine; its exact content follows the installed Keras version.
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
