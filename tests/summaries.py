"""Reading what TensorBoard callbacks wrote."""

import glob
import os

import tensorflow as tf


def tensorboard_tags(log_dir):
    """Every summary tag in the event files under `log_dir`."""
    tags = set()
    for path in glob.glob(
        os.path.join(log_dir, "**", "events*"), recursive=True
    ):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags
