"""Runs examples/cifar10_mdeq.run on mock CIFAR-10 in a separate process.

    python -m tests.mock_cifar_run '{"model_dir": ..., ...}' weights.npz

Used by the multi-worker test: each worker process runs this with its own
TF_CONFIG, then saves its final weights for comparison.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from examples import cifar10_mdeq  # noqa: E402
from examples import common  # noqa: E402


def main(config_json, weights_path):
    config = json.loads(config_json)
    num_examples = config.pop("num_examples", 64)
    config["widths"] = tuple(config["widths"])
    # A multi-worker strategy must exist before TensorFlow's runtime starts,
    # which mock_data does; the example's own main creates it first too.
    config["strategy"] = common.make_strategy(config.get("strategy", "auto"))
    with tfds.testing.mock_data(num_examples=num_examples):
        result = cifar10_mdeq.run(**config)
    weights = result["model"].get_weights()
    np.savez(weights_path, *weights)
    history = {k: [float(v) for v in vs] for k, vs in result["history"].items()}
    print(json.dumps(history))


if __name__ == "__main__":
    main(*sys.argv[1:])
