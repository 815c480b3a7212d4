import os
import subprocess
import sys

import numpy as np

from examples import quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_learns_and_converges():
    result = quickstart.run(epochs=10, num_samples=2000, verbose=0)
    assert result["val_accuracy"] >= 0.9
    assert 1 <= result["val_forward_nfe"] <= 20
    # The DEQ output really is a fixed point of the trained cell.
    model = result["model"]
    x, _ = quickstart.make_spirals(64, seed=5)
    injected = model.get_layer("encoder")(x)
    deq = model.get_layer("deq")
    z = deq(injected).numpy()
    fz = deq.block(z, injected).numpy()
    rel = np.linalg.norm(fz - z, axis=-1) / np.linalg.norm(fz, axis=-1)
    assert np.median(rel) < 1e-3


def run_script(*args):
    return subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "quickstart.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )


def test_quickstart_command_line():
    done = run_script("--epochs=1", "--num_samples=300", "--solver=anderson")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out accuracy" in done.stdout


def test_quickstart_rejects_stray_arguments():
    done = run_script("extra")
    assert done.returncode != 0
    assert "Unexpected arguments: ['extra']" in done.stderr
