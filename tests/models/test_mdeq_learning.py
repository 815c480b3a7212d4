"""MDEQClassifier is an equilibrium model of real digits at its defaults,
and learns a generated image task at the paper's settings, where the
penalty lowers NFE.

Trainings of several CPU minutes each: marked large, run with
`python -m pytest -q --run-large tests/models/test_mdeq_learning.py`.
"""

import os

import keras
import numpy as np
import pytest

from examples.generated_images import oriented_bars
from keras_deq.models import MDEQClassifier

NUM_TRAIN, NUM_TEST = 2000, 1000
# The paper's gradient, dropout and initialisation, small and converged.
CONFIG = dict(
    MDEQClassifier.PAPER_CIFAR10,
    widths=(8, 16, 32, 64),
    expansion=1,
    max_iter=30,
    tol=1e-3,
)


# One 8-epoch training and its report, ~10 minutes on 2 cores.
@pytest.mark.large
@pytest.mark.xfail(
    strict=False,
    reason="Not yet on every seed (docs/benchmarks.md, 'Is it an "
    "equilibrium model?'): seeds 1 and 2 lose 0.75 and 1.75 points at 4x "
    "the budget (the bound is 0.5).",
)
def test_defaults_are_an_equilibrium_model_on_real_digits(record_property):
    """The protocol of `benchmarks/mdeq_equilibrium.py`: widths 16-128, all
    else default, Adam 1e-3, batch 64, 8 epochs; the report on the 400
    held-out images at 1x and 4x the trained budget and from 2 random
    first iterates. The figures per seed are in docs/benchmarks.md."""
    pytest.importorskip("sklearn")
    from benchmarks import mdeq_equilibrium

    seed = int(os.environ.get("KERAS_DEQ_TEST_SEED", 0))
    run = mdeq_equilibrium.train("defaults", seed, 8, (1, 4), 2)
    one, four = run["report"]["rows"]
    path = run["report"]["path"]
    for key, value in [
        ("accuracy_1x", one["metric"]),
        ("accuracy_4x", four["metric"]),
        ("within_1e-2_4x", four["within_1e-2"]),
        ("path_agreement", path["agreement"]),
        ("train_seconds", run["train_seconds"]),
    ]:
        record_property(key, value)
    assert one["metric"] >= 0.97, one
    assert four["metric"] >= one["metric"] - 0.005, (one, four)
    assert four["within_1e-2"] >= 0.9, four
    assert path["agreement"] >= 0.99, path
    # Not unrolled: the gradient treats z* as an equilibrium.
    assert run["model_kwargs"] == {}
    assert MDEQClassifier(10).deq.gradient in ("implicit", "reuse", "phantom")


def train(jac_weight, x, y, epochs=2, batch_size=32):
    keras.utils.set_random_seed(0)
    model = MDEQClassifier(
        10, jac_weight=jac_weight, jac_freq=0.5, seed=0, **CONFIG
    )
    steps = epochs * -(-NUM_TRAIN // batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(2e-3, steps)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x[:NUM_TRAIN],
        y[:NUM_TRAIN],
        validation_data=(x[NUM_TRAIN:], y[NUM_TRAIN:]),
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
    ).history
    return {k: v[-1] for k, v in history.items()}


@pytest.mark.large
def test_mdeq_learns_oriented_bars_and_the_penalty_lowers_nfe():
    x, y = oriented_bars(NUM_TRAIN + NUM_TEST, seed=0)
    plain = train(0.0, x, y)
    regularized = train(5.0, x, y)
    print(f"without penalty: {plain}\nwith penalty: {regularized}")
    for logs in (plain, regularized):
        assert logs["val_accuracy"] >= 0.95
        # The solves end converged: residual under tol = 1e-3.
        assert logs["val_deq_forward_residual"] < 1e-3
        assert logs["deq_forward_residual"] < 1e-3
        assert np.isfinite(logs["loss"])
    assert (
        regularized["val_deq_forward_nfe"] < 0.9 * plain["val_deq_forward_nfe"]
    )


def test_oriented_bars_are_learnable_structure():
    """The labels follow the images: a bar's angle from its pixels."""
    x, y = oriented_bars(200, noise=0.0, seed=1)
    # Principal axis of the bright pixels gives the orientation class.
    predicted = []
    for image in x:
        mask = image.mean(-1) > np.median(image.mean(-1)) + 0.2
        rows, cols = np.nonzero(mask)
        cov = np.cov(np.stack([cols, rows]))
        vals, vecs = np.linalg.eigh(cov)
        angle = np.arctan2(vecs[1, -1], vecs[0, -1]) % np.pi
        predicted.append(int(np.round(angle / (np.pi / 10))) % 10)
    assert np.mean(np.array(predicted) == y) > 0.9
