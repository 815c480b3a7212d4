"""The code the README and the getting-started page show does what they say."""

import pathlib
import re

import keras
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(path):
    text = (ROOT / path).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _relative_residual(z, fz):
    z, fz = np.asarray(z), np.asarray(fz)
    return np.linalg.norm(fz - z, axis=-1) / np.linalg.norm(fz, axis=-1)


def test_readme_quickstart_returns_the_cells_fixed_point():
    namespace = {}
    exec(_python_blocks("README.md")[0], namespace)
    model = namespace["model"]
    deq = model.layers[0]
    x = np.random.default_rng(0).normal(size=(16, 64)).astype("float32")
    z = deq(x)
    cell = deq.block
    # The quickstart's tol is 1e-3 on the relative residual, per sample.
    assert np.all(_relative_residual(z, cell(z, x)) <= 1e-3)
    assert model(x).shape == (16, 10)


def test_getting_started_one_tensor_block_is_applied_to_the_injection():
    blocks = _python_blocks("docs/getting-started.md")
    namespace = {}
    exec(blocks[0], namespace)  # the imports
    exec(blocks[1], namespace)
    deq = namespace["model"].layers[0]
    x = np.random.default_rng(1).normal(size=(8, 64)).astype("float32")
    z = deq(x)
    # z* = block(z* + x): the block sees the injected state.
    fz = deq.block(keras.ops.convert_to_tensor(z) + x)
    assert np.all(_relative_residual(z, fz) <= 1e-3)
