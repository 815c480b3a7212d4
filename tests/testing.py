"""What the tests share: DEQ blocks with known behaviour, independent
numerical references, reading TensorBoard logs, and the layer contract."""

import glob
import json
import os

import keras
import numpy as np
import tensorflow as tf

import keras_deq
from tests.any_backend import LinearCell  # noqa: F401
from tests.any_backend import TanhCell  # noqa: F401
from tests.any_backend import central_differences  # noqa: F401
from tests.any_backend import contraction  # noqa: F401

# --- Blocks with known behaviour ---------------------------------------


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class TwoResolutionCell(keras.layers.Layer):
    """A two-part state: a [4, 3] "fine" map and a [5] "coarse" vector.

    fine'   = tanh(fine A + reshape(coarse C) + x P)
    coarse' = tanh(flatten(fine) D + coarse E + x Q)
    with small weights, so the joint map is a contraction.
    """

    def build(self, z_shape, x_shape):
        init = keras.initializers.RandomNormal(stddev=0.15, seed=3)
        n = x_shape[-1]
        self.a = self.add_weight(shape=(3, 3), initializer=init, name="a")
        self.c = self.add_weight(shape=(5, 12), initializer=init, name="c")
        self.p = self.add_weight(shape=(n, 12), initializer=init, name="p")
        self.d = self.add_weight(shape=(12, 5), initializer=init, name="d")
        self.e = self.add_weight(shape=(5, 5), initializer=init, name="e")
        self.q = self.add_weight(shape=(n, 5), initializer=init, name="q")

    def initial_state(self, x):
        batch = tf.shape(x)[0]
        return [tf.zeros([batch, 4, 3], x.dtype), tf.zeros([batch, 5], x.dtype)]

    def call(self, z, x, training=None):
        fine, coarse = z
        batch = tf.shape(x)[0]
        fine_new = tf.tanh(
            fine @ self.a
            + tf.reshape(coarse @ self.c, [batch, 4, 3])
            + tf.reshape(x @ self.p, [batch, 4, 3])
        )
        coarse_new = tf.tanh(
            tf.reshape(fine, [batch, 12]) @ self.d
            + coarse @ self.e
            + x @ self.q
        )
        return [fine_new, coarse_new]


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class DropoutCell(keras.layers.Layer):
    """f(z, x) = tanh(drop(z) W + x U): variational dropout on the state."""

    def __init__(self, units=6, rate=0.3, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.rate = rate
        self.seed = seed
        self.drop = keras_deq.layers.VariationalDropout(rate, seed=seed)

    def build(self, z_shape, x_shape):
        rng = np.random.default_rng(self.seed)
        w = contraction(rng, self.units, 0.5)
        u = rng.normal(size=(x_shape[-1], self.units))
        self.w = self.add_weight(
            shape=w.shape, initializer=keras.initializers.Constant(w), name="w"
        )
        self.u = self.add_weight(
            shape=u.shape, initializer=keras.initializers.Constant(u), name="u"
        )
        self.drop.build(z_shape)

    def initial_state(self, x):
        return tf.zeros([tf.shape(x)[0], self.units], x.dtype)

    def call(self, z, x, training=None):
        return tf.tanh(self.drop(z, training=training) @ self.w + x @ self.u)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, rate=self.rate, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class CausalSequenceCell(keras.layers.Layer):
    """f(z, x)_t = tanh(z_t W + cummean(z)_t V + x_t U) over `[B, T, D]`.

    Position t sees positions ≤ t only (a running mean), so f is causal;
    with ‖W‖ + ‖V‖ < 1 it is a contraction.
    """

    def __init__(self, units=5, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.seed = seed

    def build(self, z_shape, x_shape):
        rng = np.random.default_rng(self.seed)
        n = self.units
        self.w = self.add_weight(
            shape=(n, n),
            initializer=keras.initializers.Constant(contraction(rng, n, 0.5)),
            name="w",
        )
        self.v = self.add_weight(
            shape=(n, n),
            initializer=keras.initializers.Constant(contraction(rng, n, 0.4)),
            name="v",
        )
        self.u = self.add_weight(
            shape=(x_shape[-1], n),
            initializer=keras.initializers.Constant(
                rng.normal(size=(x_shape[-1], n))
            ),
            name="u",
        )

    def initial_state(self, x):
        return tf.zeros(tf.concat([tf.shape(x)[:-1], [self.units]], 0), x.dtype)

    def call(self, z, x, training=None):
        steps = tf.cast(tf.range(1, tf.shape(z)[1] + 1), z.dtype)
        running = tf.cumsum(z, axis=1) / steps[None, :, None]
        return tf.tanh(z @ self.w + running @ self.v + x @ self.u)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "seed": self.seed}


# --- Independent numerical references ----------------------------------


# --- TensorBoard logs ----------------------------------------------------


def tensorboard_tags(log_dir):
    """Every summary tag in the event files under `log_dir`."""
    tags = set()
    for path in glob.glob(
        os.path.join(log_dir, "**", "events*"), recursive=True
    ):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


# --- The layer contract --------------------------------------------------


def _without_build_config(config):
    if isinstance(config, dict):
        return {
            k: _without_build_config(v)
            for k, v in config.items()
            if k != "build_config"
        }
    return config


def check_layer_contract(
    make_layer,
    x,
    *,
    training_losses=0,
    random_in_training=False,
    xla=True,
    mixed_precision=True,
    atol=1e-5,
    fit_atol=1e-5,
):
    """What every public keras_deq layer must do, checked on one input.

    - symbolic and eager calls agree on the output shape;
    - an inference call adds no loss, a training call `training_losses`;
    - the config survives JSON and `from_config` into a layer that, given
      the same weights, gives the same output;
    - one `fit` step changes the weights, and compiled with XLA updates
      them as the graph step does (the reference, to `fit_atol`), unless
      the layer draws random numbers in training (`random_in_training`):
      XLA's stateless random kernels give other numbers than TensorFlow's,
      so there the XLA step is only checked to change the weights and
      stay finite; `xla=False` skips the XLA step (a known limitation);
    - under `mixed_float16` the layer computes in float16, within float16
      rounding of the float32 output.

    `make_layer()` returns a new, unbuilt layer; two calls after
    `keras.utils.set_random_seed` with the same seed give the same weights.
    """
    nested = isinstance(x, list | tuple)
    x = [np.asarray(t) for t in x] if nested else np.asarray(x)
    leaves = x if nested else [x]

    def inputs():
        specs = [keras.Input(t.shape[1:], dtype=str(t.dtype)) for t in leaves]
        return specs if nested else specs[0]

    def numpy(out):
        return [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(out)]

    keras.utils.set_random_seed(0)
    layer = make_layer()
    eager = numpy(layer(x))
    symbolic = keras.tree.flatten(make_layer()(inputs()))
    for s, e in zip(symbolic, eager, strict=True):
        assert tuple(s.shape) == (None,) + e.shape[1:], s.shape
    assert len(layer.losses) == 0, layer.losses
    layer(x, training=True)
    assert len(layer.losses) == training_losses, layer.losses

    config = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(config)
    clone(x)
    clone.set_weights(layer.get_weights())
    assert _without_build_config(clone.get_config()) == _without_build_config(
        layer.get_config()
    )
    for c, e in zip(numpy(clone(x)), eager, strict=True):
        np.testing.assert_allclose(c, e, atol=atol)

    y = np.ones((len(leaves[0]), 1), "float32")
    weights = {}
    for jit_compile in (False, True) if xla else (False,):
        keras.utils.set_random_seed(0)
        given = inputs()
        outputs = keras.tree.flatten(make_layer()(given))
        flat = [keras.layers.Flatten()(t) for t in outputs]
        joined = keras.layers.Concatenate()(flat) if len(flat) > 1 else flat[0]
        model = keras.Model(given, keras.layers.Dense(1)(joined))
        before = [w.copy() for w in model.get_weights()]
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss="mse",
            jit_compile=jit_compile,
        )
        model.fit(x, y, batch_size=len(y), epochs=1, verbose=0, shuffle=False)
        weights[jit_compile] = model.get_weights()
    changed = [
        not np.allclose(a, b)
        for a, b in zip(before, weights[False], strict=True)
    ]
    assert any(changed), "one fit step changed no weight"
    for old, graph, jit in zip(
        before, weights[False], weights.get(True, weights[False]), strict=True
    ):
        assert np.all(np.isfinite(jit))
        if random_in_training:
            assert np.allclose(old, graph) == np.allclose(old, jit)
        else:
            np.testing.assert_allclose(jit, graph, atol=fit_atol)

    if mixed_precision:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_float16")
        try:
            half = make_layer()
            half(x)
        finally:
            keras.config.set_dtype_policy(previous)
        half.set_weights(layer.get_weights())
        for out, e in zip(keras.tree.flatten(half(x)), eager, strict=True):
            assert keras.backend.standardize_dtype(out.dtype) == "float16"
            scale = max(1.0, float(np.abs(e).max()))
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(out).astype("float32"),
                e,
                atol=2e-2 * scale,
            )
