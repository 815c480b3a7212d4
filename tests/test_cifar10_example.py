"""examples/cifar10_mdeq.py on mock CIFAR-10: pipeline, strategies, errors."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import keras_deq
from examples import cifar10_mdeq
from tests.testing import tensorboard_tags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    epochs=1,
    batch_size=16,
    steps_per_epoch=2,
    validation_steps=1,
    widths=(8, 16),
    expansion=1,
    verbose=0,
)
# One resolution traces in well under half the time; the tests that only
# need a model to train, stop and resume, or stay in sync use it.
ONE_RESOLUTION = dict(TINY, widths=(8,))


def test_one_mirrored_epoch_through_the_real_pipeline_then_export(
    tmp_path, mirrored
):
    with tfds.testing.mock_data(num_examples=64):
        batch = next(
            iter(cifar10_mdeq.make_dataset(str(tmp_path), "train", 16, True))
        )
        result = cifar10_mdeq.run(
            str(tmp_path / "data"),
            model_dir=str(tmp_path / "run"),
            export_dir=str(tmp_path / "export"),
            strategy=mirrored,
            **ONE_RESOLUTION,
        )
    images, labels = batch
    assert images.shape == (16, 32, 32, 3) and labels.shape == (16,)
    # Normalised with the CIFAR-10 channel statistics.
    assert (
        -3 < float(tf.reduce_min(images)) < 0 < float(tf.reduce_max(images)) < 3
    )
    model = result["model"]
    assert mirrored.num_replicas_in_sync == 2
    assert model.distribute_strategy is mirrored
    # Every variable has one copy per replica.
    for w in model.deq.block.trainable_weights:
        assert len(w.value.values) == 2
    history = result["history"]
    for key in [
        "loss",
        "accuracy",
        "val_accuracy",
        "deq_forward_nfe",
        "deq_forward_residual",
        "deq_backward_nfe",
    ]:
        assert np.isfinite(history[key][0]), key
    # p = 0.05: NaN if the gate never opened in these few steps, never 0.
    penalty = history["deq_jac_loss"][0]
    assert np.isnan(penalty) or penalty > 0
    assert 1 <= history["deq_forward_nfe"][0] <= 7
    assert os.path.exists(tmp_path / "run" / "best.keras")
    tags = tensorboard_tags(str(tmp_path / "run" / "logs"))
    assert "epoch_deq_forward_nfe" in tags and "epoch_accuracy" in tags
    served = tf.saved_model.load(result["export_dir"])
    np.testing.assert_allclose(
        served.serve(images).numpy(),
        model.predict(images, verbose=0),
        atol=1e-5,
    )


def test_missing_data_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "cifar10_mdeq.py"),
            f"--data_dir={tmp_path}",
            f"--model_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"--data_dir='{tmp_path}'" in done.stderr
    assert "download_and_prepare()" in done.stderr


@pytest.mark.parametrize("flag", ["--widths=8,x", "--strategy=tpu"])
def test_bad_flags(tmp_path, flag):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "cifar10_mdeq.py"),
            flag,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode != 0
    assert flag.split("=")[0] in done.stderr


class Interrupt(keras.callbacks.Callback):
    """Stops the run like a killed job, after the backup of `epoch`."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"killed after epoch {epoch}")


@pytest.mark.large
def test_interrupted_run_resumes_from_its_backup(tmp_path):
    config = dict(ONE_RESOLUTION, epochs=3, model_dir=str(tmp_path / "run"))
    with tfds.testing.mock_data(num_examples=64):
        with pytest.raises(KeyboardInterrupt):
            cifar10_mdeq.run(
                str(tmp_path / "data"), callbacks=[Interrupt(1)], **config
            )
        assert os.listdir(tmp_path / "run" / "backup")
        result = cifar10_mdeq.run(str(tmp_path / "data"), **config)
    history = result["history"]
    # Epochs 0 and 1 came from the first run; the second ran epoch 2 only.
    assert len(history["loss"]) == 1
    assert np.isfinite(history["loss"][0])
    model = result["model"]
    assert (
        int(model.optimizer.iterations.numpy()) == 3 * TINY["steps_per_epoch"]
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_training_ends_with_identical_weights(tmp_path):
    ports = [free_port(), free_port()]
    config = dict(
        ONE_RESOLUTION,
        epochs=2,
        data_dir=str(tmp_path / "data"),
        model_dir=str(tmp_path / "run"),
        export_dir=str(tmp_path / "export"),
        strategy="multi_worker",
    )
    workers = []
    for index in range(2):
        tf_config = {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.mock_cifar_run",
                    json.dumps(config),
                    str(tmp_path / f"weights{index}.npz"),
                ],
                cwd=REPO,
                env={
                    **os.environ,
                    "TF_CPP_MIN_LOG_LEVEL": "3",
                    "TF_CONFIG": json.dumps(tf_config),
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    first = np.load(tmp_path / "weights0.npz")
    second = np.load(tmp_path / "weights1.npz")
    assert first.files == second.files
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])
    # Training moved the weights, and the chief wrote the export.
    history = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    assert os.path.exists(tmp_path / "export" / "saved_model.pb")
    assert os.path.exists(tmp_path / "run" / "worker_1_scratch")


def test_the_example_builds_the_papers_configuration_not_the_defaults():
    deq = cifar10_mdeq.build_model(widths=(8, 16), expansion=1).deq
    assert (deq.gradient, deq.max_iter, deq.backward_max_iter) == (
        "implicit",
        7,
        8,
    )
    assert float(deq.jac_weight.numpy()) == 0.5
    np.testing.assert_allclose(deq.jac_freq.numpy(), 0.05)
    assert deq.correction_weight == 0.0 and deq.random_start is None
    dropouts = keras_deq.layers.noise.noisy_layers(deq.block)
    assert all(d.rate == 0.25 for d in dropouts)
    # The model's own defaults differ on each of these.
    default = keras_deq.models.MDEQClassifier(10, widths=(8, 16)).deq
    assert default.gradient != deq.gradient
    assert default.correction_weight > 0 and default.random_start
