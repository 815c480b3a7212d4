"""Test setup: quiet TensorFlow, two logical CPUs, opt-in slow tests.

The suite runs on TensorFlow. `KERAS_BACKEND=jax python -m pytest` runs
the tests that are written for every backend (`ANY_BACKEND_TESTS`), in
float64 where they ask for it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

# Test modules that import nothing backend-specific and run on any backend.
ANY_BACKEND_TESTS = (
    "solvers/test_solvers.py",
    "test_jacobian.py",
    "layers/test_deq_layer_any_backend.py",
    "test_diagnostics.py",
    "test_callbacks.py",
    "models/test_mdeq_any_backend.py",
    "models/test_cached_decoding.py",
    "models/test_deq_transformer_lm.py",
    "test_jax_steps.py",
)

if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf

    # MirroredStrategy tests need two devices; they must exist before
    # TensorFlow initialises its runtime, so the split happens at import,
    # before any test.
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
else:
    if os.environ["KERAS_BACKEND"] == "jax":
        import jax

        # The dense references compare in float64, as they do on TensorFlow.
        jax.config.update("jax_enable_x64", True)

    def pytest_ignore_collect(collection_path, config):
        if collection_path.is_dir() or collection_path.suffix != ".py":
            return None
        relative = collection_path.relative_to(config.rootpath / "tests")
        if relative.name.startswith("test_"):
            return relative.as_posix() not in ANY_BACKEND_TESTS
        return None


def pytest_addoption(parser):
    parser.addoption(
        "--run-large",
        action="store_true",
        help="also run tests marked @pytest.mark.large",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-large"):
        return
    skip = pytest.mark.skip(reason="large test: pass --run-large to run it")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the two logical CPUs for the whole run.

    Several strategies over the same devices in one process reuse collective
    keys, and their all-reduces then meet the wrong partners ("Shape
    mismatch in the collective instance"); tests share this one instead.
    """
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def suite_seed() -> int:
    """KERAS_DEQ_TEST_SEED, or 0: the seed of this run of the suite."""
    return int(os.environ.get("KERAS_DEQ_TEST_SEED", 0))


@pytest.fixture
def seed():
    """This run's seed, for tests that seed their own data or model.

    A test that trains must pass from any seed; it records what it
    measured with `record_property`, so a sweep over seeds
    (`KERAS_DEQ_TEST_SEED=N pytest --junitxml=...`) shows each margin.
    """
    return suite_seed()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    import keras

    # Without free_memory=False this runs a full gc.collect before every
    # test, which takes seconds once the suite has traced many graphs;
    # Python's own collector still runs.
    keras.utils.clear_session(free_memory=False)
    # KERAS_DEQ_TEST_SEED reruns the suite from other seeds: a test that
    # trains must pass from any of them, not ride one trajectory.
    keras.utils.set_random_seed(suite_seed())
    yield
    keras.mixed_precision.set_global_policy("float32")
