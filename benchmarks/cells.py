"""The reference DEQ cells the benchmarks run, with their inputs.

Fixed definitions (float32, z0 = 0) so that numbers can be compared with other
DEQ libraries doing identical work. Written with `keras.ops`, they run on
TensorFlow and JAX:

- mlp: z, x ∈ R^256, batch 128, f(z, x) = tanh(z Wᵀ + x Uᵀ + b) with
  W = 0.9·Q (Q orthogonal), U ~ N(0, 1)/16, b ~ 0.1·N(0, 1).
- conv: NHWC 32×32×64, batch 32,
  f(z, x) = GN₃(ReLU(z + GN₂(conv₂(ReLU(GN₁(conv₁(z))))) + x)), 3×3 convs
  without bias, weights N(0, 1)/24, GroupNorm with 8 groups and ε = 1e-5
  (keras_deq's `GroupNorm`, the MDEQ's: Keras' `GroupNormalization` in
  arithmetic and weights, computed in fewer passes).
- transformer: batch 16, length 128, width 256, 4 heads, FFN 1024 (ReLU),
  post-LN: u = z + x, h = LN₁(u + MHA(u)), f = LN₂(h + FFN(h)), weights
  N(0, 1)/16 (the FFN's second matrix N(0, 1)/32), zero biases, no mask.
"""

import keras
import numpy as np
from keras import ops

import keras_deq
from keras_deq.layers import GroupNorm


@keras.saving.register_keras_serializable(package="keras_deq_benchmarks")
class MLPCell(keras.layers.Layer):
    def __init__(self, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def build(self, z_shape, x_shape):
        rng = np.random.default_rng(self.seed)
        d = z_shape[-1]
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        const = keras.initializers.Constant
        self.w = self.add_weight(
            shape=(d, d), initializer=const(0.9 * q), name="w"
        )
        self.u = self.add_weight(
            shape=(x_shape[-1], d),
            initializer=const(rng.normal(size=(x_shape[-1], d)) / 16),
            name="u",
        )
        self.b = self.add_weight(
            shape=(d,), initializer=const(0.1 * rng.normal(size=d)), name="b"
        )

    def call(self, z, x, training=None):
        return ops.tanh(
            ops.matmul(z, ops.transpose(self.w))
            + ops.matmul(x, ops.transpose(self.u))
            + self.b
        )

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_deq_benchmarks")
class ConvCell(keras.layers.Layer):
    def __init__(self, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        init = keras.initializers.RandomNormal(stddev=1 / 24, seed=seed)
        self.conv1, self.conv2 = (
            keras.layers.Conv2D(
                64,
                3,
                padding="same",
                use_bias=False,
                kernel_initializer=init,
                name=f"conv{i}",
            )
            for i in (1, 2)
        )
        self.norm1, self.norm2, self.norm3 = (
            GroupNorm(8, epsilon=1e-5, name=f"gn{i}") for i in (1, 2, 3)
        )

    def build(self, z_shape, x_shape):
        for layer in (
            self.conv1,
            self.conv2,
            self.norm1,
            self.norm2,
            self.norm3,
        ):
            layer.build(z_shape)

    def call(self, z, x, training=None):
        h = ops.relu(self.norm1(self.conv1(z)))
        h = self.norm2(self.conv2(h))
        return self.norm3(ops.relu(z + h + x))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_deq_benchmarks")
class TransformerCell(keras.layers.Layer):
    def __init__(self, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

        def init(scale, offset):
            return keras.initializers.RandomNormal(
                stddev=1 / scale, seed=seed + offset
            )

        self.attention = keras.layers.MultiHeadAttention(
            4, 64, kernel_initializer=init(16, 0), name="attention"
        )
        self.ffn1 = keras.layers.Dense(
            1024, activation="relu", kernel_initializer=init(16, 1), name="ffn1"
        )
        self.ffn2 = keras.layers.Dense(
            256, kernel_initializer=init(32, 2), name="ffn2"
        )
        self.norm1, self.norm2 = (
            keras.layers.LayerNormalization(epsilon=1e-5, name=f"ln{i}")
            for i in (1, 2)
        )

    def build(self, z_shape, x_shape):
        self.attention.build(z_shape, z_shape)
        self.ffn1.build(z_shape)
        self.ffn2.build(tuple(z_shape[:-1]) + (1024,))
        self.norm1.build(z_shape)
        self.norm2.build(z_shape)

    def call(self, z, x, training=None):
        u = z + x
        h = self.norm1(u + self.attention(u, u))
        return self.norm2(h + self.ffn2(self.ffn1(h)))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


CELLS = {
    "mlp": (MLPCell, (128, 256)),
    "conv": (ConvCell, (32, 32, 32, 64)),
    "transformer": (TransformerCell, (16, 128, 256)),
}


def make(name, batch_size=None, seed=0):
    """Returns `(cell, x)`; `batch_size` overrides the cell's default."""
    cls, shape = CELLS[name]
    if batch_size is not None:
        shape = (batch_size,) + shape[1:]
    x = ops.convert_to_tensor(
        np.random.default_rng(seed + 1).normal(size=shape), "float32"
    )
    cell = cls(seed=seed)
    cell.build(x.shape, x.shape)
    return cell, x


def weight_names(cell, variables):
    """Each variable's path inside the cell (`conv1/kernel`), the keys the
    workers exchange weights and gradients under."""
    prefix = cell.name + "/"
    return [v.path[v.path.index(prefix) + len(prefix) :] for v in variables]


# Per mode, the DEQLayer arguments over the step's own. The reuse modes
# start the backward from the forward Broyden's estimate and refine it
# with 0, 2 or 4 iterations.
MODES = {
    "implicit": dict(gradient="implicit"),
    "reuse0": dict(gradient="reuse", backward_max_iter=0),
    "reuse2": dict(gradient="reuse", backward_max_iter=2),
    "reuse4": dict(gradient="reuse", backward_max_iter=4),
    "phantom": dict(gradient="phantom", phantom_steps=1),
    "unrolled": dict(gradient="unrolled"),
}


def make_layer(
    cell, x, mode, solver, iters, jacobian=False, solver_options=None, **extra
):
    """The benchmarks' DEQLayer: exactly `iters` forward evaluations (a
    tolerance that never triggers), and as many backward iterations unless
    the mode or `extra` says otherwise."""
    settings = dict(
        solver=solver,
        solver_options=solver_options,
        max_iter=iters,
        tol=1e-30,
        backward_max_iter=iters,
        backward_tol=1e-30,
        jac_weight=1.0 if jacobian else 0.0,
        jac_freq=1.0,
        jac_samples=1,
    )
    layer = keras_deq.DEQLayer(cell, **{**settings, **MODES[mode], **extra})
    layer.build(x.shape)
    return layer
