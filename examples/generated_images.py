"""Generated image data with real structure, for offline examples and tests."""

import numpy as np


def oriented_bars(num_images, num_classes=10, size=32, noise=0.15, seed=0):
    """Images of one bar each; the class is the bar's orientation.

    Class k has angle k·180°/num_classes (± 3°); position, length, width,
    colour and background vary per image, plus Gaussian pixel noise. Returns
    float32 images `[n, size, size, 3]` (roughly zero mean, unit scale) and
    int32 labels.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_images)
    angles = labels * np.pi / num_classes + rng.uniform(-1, 1, num_images) * (
        np.pi / 60
    )
    coords = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    centers = rng.uniform(-5, 5, size=(num_images, 2))
    lengths = rng.uniform(14, 26, num_images)
    widths = rng.uniform(1.5, 3.5, num_images)
    dx = xx[None] - centers[:, 0, None, None]
    dy = yy[None] - centers[:, 1, None, None]
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    along = dx * cos + dy * sin
    across = -dx * sin + dy * cos
    bar = (np.abs(across) < widths[:, None, None] / 2) & (
        np.abs(along) < lengths[:, None, None] / 2
    )
    colors = rng.uniform(0.4, 1.0, size=(num_images, 3))
    background = rng.uniform(-0.3, 0.3, size=(num_images, 3))
    images = (
        background[:, None, None, :]
        + bar[..., None] * colors[:, None, None, :]
        + noise * rng.normal(size=(num_images, size, size, 3))
    )
    return images.astype("float32"), labels.astype("int32")
