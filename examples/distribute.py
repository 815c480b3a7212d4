"""Choosing a `tf.distribute` strategy from a name, for the examples."""

import json
import os

import tensorflow as tf

from keras_deq.utils import validation

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")


def split_cpu(num_devices: int) -> list[str]:
    """Splits the CPU into `num_devices` logical devices; returns their names.

    Must run before TensorFlow initialises its devices (before any op or
    `tf.config.list_logical_devices`), so call it first thing in a script.
    This is how multi-device code is exercised on machines without GPUs.
    """
    validation.check_int("num_devices", num_devices, 1)
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) != num_devices:
            raise RuntimeError(
                f"Cannot split the CPU into {num_devices} devices: TensorFlow "
                f"already initialised {len(existing)}. Call split_cpu before "
                "running any TensorFlow op."
            ) from None
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def make_strategy(name: str) -> tf.distribute.Strategy:
    """A strategy by name.

    - `"auto"`: `MirroredStrategy` when more than one GPU is visible, else
      the default strategy;
    - `"mirrored"`: `MirroredStrategy` over all GPUs, or over all logical
      CPUs when there is no GPU (see `split_cpu`);
    - `"multi_worker"`: `MultiWorkerMirroredStrategy`, configured by the
      `TF_CONFIG` environment variable (which must be set);
    - `"one_device"`: `OneDeviceStrategy` on the first GPU, else the CPU.
    """
    validation.check_choice("strategy", name, STRATEGIES)
    if name == "multi_worker":
        # Before anything that starts TensorFlow's runtime (even listing
        # devices): collectives can only be configured at startup.
        return _multi_worker()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    device = gpus[0].name if gpus else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)


def _multi_worker():
    if "TF_CONFIG" not in os.environ:
        example = {
            "cluster": {"worker": ["host1:12345", "host2:12345"]},
            "task": {"type": "worker", "index": 0},
        }
        raise ValueError(
            "strategy='multi_worker' needs the TF_CONFIG environment "
            "variable (the cluster and this worker's task), e.g. "
            f"TF_CONFIG='{json.dumps(example)}'"
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process should write checkpoints, logs and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (
        task_type == "worker"
        and task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )
