"""MDEQClassifier on every backend, and one `.keras` file across them."""

import json
import sys

import keras
import numpy as np
import pytest

from keras_deq.models import MDEQBlock
from keras_deq.models import MDEQClassifier
from tests.any_backend import BACKEND
from tests.any_backend import gradients
from tests.any_backend import run_module
from tests.any_backend import to_numpy

SMALL = dict(
    widths=(8, 16),
    expansion=1,
    num_groups=4,
    input_shape=(16, 16, 3),
    seed=0,
)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 16, 16, 3)).astype("float32")


def test_the_output_is_a_fixed_point_of_the_block():
    # The paper's initialisation, where f is a contraction.
    model = MDEQClassifier(3, max_iter=60, tol=1e-5, init_stddev=0.01, **SMALL)
    deq = model.deq
    injections = keras.Model(model.input, deq.input)(images(4))
    z = deq(injections)
    fz = deq.block(z, injections)
    for a, b in zip(z, fz, strict=True):
        a, b = to_numpy(a), to_numpy(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4


@pytest.mark.parametrize("branch_norm", [True, False])
def test_one_resolution_block_is_its_formula(branch_norm):
    """`MDEQBlock` with one resolution (no fusion paths) against its
    docstring's formula, written with Keras' own convolution and
    GroupNormalization: GN(ReLU(y)) with y = GN₃(ReLU(z + h)), or
    ReLU(z + h) without the branch norm."""
    block = MDEQBlock(
        (8,), expansion=2, weight_norm=False, branch_norm=branch_norm, seed=1
    )
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 6, 6, 8)).astype("float32")
    x = rng.normal(size=(2, 6, 6, 8)).astype("float32")
    block([z], [x])  # builds it

    conv1, gn1, _, conv2, gn2, gn3 = block.branches[0]
    assert (gn3 is None) == (not branch_norm)
    norms = [gn1, gn2, gn3, block.post_norms[0]]
    reference_norms = []
    for norm, width in zip(norms, (16, 8, 8, 8), strict=True):
        if norm is None:
            reference_norms.append(None)
            continue
        reference = keras.layers.GroupNormalization(4, epsilon=1e-5)
        reference.build((None, 6, 6, width))
        # Scales and offsets other than 1 and 0, so that each one counts.
        gamma = rng.uniform(0.5, 1.5, width).astype("float32")
        beta = rng.normal(scale=0.1, size=width).astype("float32")
        for layer in (norm, reference):
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)
        reference_norms.append(reference)
    out = to_numpy(block([z], [x])[0])
    ref1, ref2, ref3, ref_post = reference_norms

    def conv(inputs, layer):
        return keras.ops.conv(inputs, layer.kernel, padding="same")

    h = keras.ops.relu(ref1(conv(z, conv1)))
    h = ref2(conv(h, conv2) + x)
    y = keras.ops.relu(z + h)
    if ref3 is not None:
        y = ref3(y)
    expected = to_numpy(ref_post(keras.ops.relu(y)))
    np.testing.assert_allclose(out, expected, atol=1e-5)

    again = MDEQBlock.from_config(block.get_config())
    assert again.branch_norm is branch_norm


def test_branch_norm_must_be_a_bool():
    with pytest.raises(TypeError, match="branch_norm.*Received: branch_norm=1"):
        MDEQBlock((8,), branch_norm=1)


def block_kernel_norms(model):
    """The largest singular value of each block kernel, by numpy's SVD."""
    return [
        np.linalg.norm(to_numpy(w).reshape(-1, w.shape[-1]), 2)
        for w in model.deq.block.weights
        if w.path.endswith("kernel")
    ]


def test_spectral_norm_bounds_every_block_kernel_through_training_and_saving(
    tmp_path,
):
    """Bounded at build and after every update (a step of SGD at rate 10
    takes them far past it: without the bound the same step does leave
    it). A reloaded model's kernels keep the constraint."""
    # A short solve without the penalty and the correction: a cheap trace.
    kwargs = dict(
        SMALL,
        weight_norm=False,
        branch_norm=False,
        max_iter=2,
        jac_weight=0.0,
        correction_weight=0.0,
    )
    x = images(8)
    y = np.arange(8) % 3

    def trained(model):
        model.compile(
            optimizer=keras.optimizers.SGD(10.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        return model

    free = trained(MDEQClassifier(3, **kwargs))
    assert max(block_kernel_norms(free)) > 1.5
    model = MDEQClassifier(3, spectral_norm=0.5, **kwargs)
    norms = block_kernel_norms(model)
    assert len(norms) == 2 * 2 + 1 + 1 and max(norms) <= 0.5 + 1e-5
    trained(model)
    norms = np.array(block_kernel_norms(model))
    # The bound binds on every kernel the step moved: all but the fusion
    # path whose GroupNorm starts at scale 0 and so passes no gradient.
    assert np.all(norms <= 0.5 + 1e-4) and np.sum(norms > 0.5 - 1e-4) >= 5

    path = tmp_path / "bounded.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    assert again.spectral_norm == 0.5
    np.testing.assert_allclose(
        to_numpy(again.predict(x, verbose=0)),
        to_numpy(model.predict(x, verbose=0)),
        atol=1e-5,
    )
    constraints = [
        w.constraint
        for w in again.deq.block.weights
        if w.path.endswith("kernel")
    ]
    assert len(constraints) == 6
    assert all(c is not None and c.max_norm == 0.5 for c in constraints)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(spectral_norm=1.0), ValueError, "needs `weight_norm=False`"),
        (
            dict(spectral_norm=0.0, weight_norm=False),
            ValueError,
            "spectral_norm.*> 0",
        ),
        (
            dict(spectral_norm="1", weight_norm=False),
            TypeError,
            "spectral_norm",
        ),
    ],
)
def test_bad_spectral_norm(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        MDEQBlock((8,), **kwargs)


def stripes(n, seed):
    """Noisy images of stripes, class 1 along rows, class 0 along columns
    (period 4, random phase, amplitude 1 in N(0, 1) noise)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1))
    grid = np.arange(16)[:, None] * np.ones((1, 16))
    rows = np.sin(np.pi / 2 * grid[None, :, :, None] + phase)
    cols = np.sin(np.pi / 2 * grid.T[None, :, :, None] + phase)
    x = rng.normal(size=(n, 16, 16, 3))
    x += np.where(y[:, None, None, None] == 1, rows, cols)
    return x.astype("float32"), y


def test_it_learns_the_orientation_of_stripes(seed, record_property):
    """Held-out accuracy after 5 epochs of 4 steps, against the 50% of
    chance."""
    x, y = stripes(192, seed=seed)
    model = MDEQClassifier(2, **{**SMALL, "seed": seed})
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x[:128], y[:128], epochs=5, batch_size=32, verbose=0)
    held_out = model.evaluate(x[128:], y[128:], verbose=0, return_dict=True)
    record_property("held_out_accuracy", held_out["accuracy"])
    assert held_out["accuracy"] >= 0.75, held_out


def test_a_keras_file_predicts_and_trains_alike_on_both_backends(tmp_path):
    """Saved here, loaded by TensorFlow and by JAX (each in a subprocess):
    float32 logits within 1e-5 and the training gradient of every weight
    within 1e-4 relative. Training mode without its random parts (random
    first iterates, the penalty's gate) so both see the same function."""
    model = MDEQClassifier(3, random_start=None, jac_weight=0.0, **SMALL)
    x = images(4, seed=1)
    model(x)
    model.save(tmp_path / "mdeq.keras")
    np.save(tmp_path / "x.npy", x)
    results = {}
    for backend in ("tensorflow", "jax"):
        stdout = run_module(
            "tests.models.test_mdeq_any_backend",
            tmp_path / "mdeq.keras",
            tmp_path / "x.npy",
            backend=backend,
        )
        results[backend] = json.loads(stdout.strip().splitlines()[-1])
    here = to_numpy(model.predict(x, verbose=0))
    for result in results.values():
        np.testing.assert_allclose(result["logits"], here, atol=1e-5)
    tf_run, jax_run = results["tensorflow"], results["jax"]
    assert tf_run["names"] == jax_run["names"]
    for a, b in zip(jax_run["grads"], tf_run["grads"], strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def _one_backend_run(model_path, x_path):
    """Prints this backend's logits and training gradients as JSON."""
    model = keras.saving.load_model(model_path)
    assert isinstance(model, MDEQClassifier), type(model)
    x = np.load(x_path)
    y = np.arange(len(x)) % 3
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = gradients(
        lambda: cross_entropy(y, model(x, training=True)),
        model.trainable_variables,
    )
    print(
        json.dumps(
            {
                "backend": BACKEND,
                "logits": to_numpy(model.predict(x, verbose=0)).tolist(),
                "names": [v.path for v in model.trainable_variables],
                "grads": [to_numpy(g).tolist() for g in grads],
            }
        )
    )


if __name__ == "__main__":
    _one_backend_run(sys.argv[1], sys.argv[2])
