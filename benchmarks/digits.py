"""scikit-learn's handwritten digits as 32×32 RGB images, for the MDEQ.

The digits (`sklearn.datasets.load_digits`, 1,797 images that ship with
scikit-learn) are resized bilinearly to 32×32 and repeated to 3 channels;
a fixed permutation gives 1,397 training and 400 held-out images.
`mdeq_equilibrium.py` trains `MDEQClassifier(10, widths=WIDTHS)` on them.
"""

import numpy as np
import tensorflow as tf

WIDTHS = (16, 32, 64, 128)
NUM_TRAIN = 1397


def digits_images():
    """`((x_train, y_train), (x_test, y_test))`: 32×32×3 float32 in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "The digits benchmark needs scikit-learn, whose package holds "
            "the images: pip install scikit-learn (or the `test` extra)."
        ) from error
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    images = digits.images[order, :, :, None].astype("float32") / 16.0
    images = tf.image.resize(images, (32, 32), method="bilinear").numpy()
    images = np.repeat(images, 3, axis=-1)
    labels = digits.target[order].astype("int32")
    return (images[:NUM_TRAIN], labels[:NUM_TRAIN]), (
        images[NUM_TRAIN:],
        labels[NUM_TRAIN:],
    )
