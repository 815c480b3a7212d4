"""The DEQ-Transformer's block: one causal transformer layer f(z, x)."""

import keras
import numpy as np
from keras import ops

from keras_deq.layers.variational_dropout import VariationalDropout
from keras_deq.layers.weight_normalization import WeightNormalization
from keras_deq.utils import validation

NORMS = ("post", "pre")


def _check_stddev(init_stddev):
    if init_stddev is None:
        return None
    return validation.check_positive("init_stddev", init_stddev)


def _normal(stddev, fan_in, seed):
    """N(0, σ²) with σ = `stddev`, or 1/√fan_in when `stddev` is None."""
    if stddev is None:
        stddev = 1.0 / np.sqrt(fan_in)
    return keras.initializers.RandomNormal(stddev=float(stddev), seed=seed)


def default_jac_weight(hidden_dim):
    """γ of `DEQTransformerLM(jac_weight=None)`: 1.6 · min(1, √(d / 700))."""
    return 1.6 * min(1.0, float(np.sqrt(hidden_dim / 700)))


def _check_heads(hidden_dim, num_heads):
    hidden_dim = validation.check_int("hidden_dim", hidden_dim, 1)
    num_heads = validation.check_int("num_heads", num_heads, 1)
    if hidden_dim % num_heads:
        raise ValueError(
            "`num_heads` must divide `hidden_dim`. Received: "
            f"hidden_dim={hidden_dim}, num_heads={num_heads}"
        )
    return hidden_dim, num_heads


@keras.saving.register_keras_serializable(package="keras_deq")
class DEQTransformerBlock(keras.layers.Layer):
    """f_θ of a DEQ-Transformer: one causal transformer layer with injection.

    The state z is `[B, T, hidden_dim]`; the injection x is `[B, T,
    3 · hidden_dim]`, a projection of the embedded sequence made once per
    forward pass (outside the solver) and added to the query, key and value
    projections of every iteration, as in the original DEQ-Transformer.
    With `norm="post"` (Figure 2 of Bai, Koltun & Kolter, 2021, left):

        q, k, v = W_qkv z + x
        h = LN₁(z + drop(W_o · attention(q, k, v)))
        f = LN₂(h + W₂ drop(ReLU(W₁ h)))

    and with `norm="pre"` (right, with LayerNorm on the branch inputs, plus
    an output LayerNorm LN₃):

        q, k, v = W_qkv LN₁(z) + x
        h = z + drop(W_o · attention(q, k, v))
        f = LN₃(h + W₂ drop(ReLU(W₁ LN₂(h))))

    Why LN₃: without it the branches see z only through LN₁(z) and LN₂(h),
    which ignore its scale, so ‖f(z) − z‖ stays bounded while ‖f(z)‖ grows
    with ‖z‖. The relative residual then falls as ‖z‖ grows, and solvers
    "converge" by inflating the state rather than by finding a root (the
    docs' Models page has the measurement). LN₃ keeps the equilibrium on
    the LayerNorm scale, as post-LN does.

    `attention` is causal multi-head scaled dot-product attention
    (`keras.ops.dot_product_attention` with a causal mask), so position t
    of f depends on positions ≤ t of z and x only. The projections are
    `keras.layers.Dense` layers wrapped in `WeightNormalization` (when
    `weight_norm`) and start from N(0, σ²) weights, σ = 1/√fan_in unless
    `init_stddev` fixes it; `drop` is a
    `VariationalDropout` whose per-sequence, per-channel mask stays fixed
    for a whole solve.

    Why not `keras.layers.MultiHeadAttention` or keras-hub's
    `TransformerDecoder` / `TransformerEncoder`: f_θ must be the same
    function at every solver iteration, and those layers draw new standard
    dropout masks on each call and keep their projections (EinsumDense)
    inside, where neither weight normalization nor an injection added to
    q, k and v can reach. This block composes Keras' attention kernel,
    `Dense`, `LayerNormalization` and this package's `WeightNormalization`
    and `VariationalDropout` instead; the model takes its embedding,
    tied softmax head and positions from keras-hub.

    Args:
        hidden_dim: width of the state. Defaults to 700.
        num_heads: attention heads; must divide `hidden_dim`. Defaults to 10.
        intermediate_dim: hidden width of the feed-forward block. Defaults
            to 48000 (the original DEQ-Transformer's WikiText-103 setting).
        norm: `"post"` or `"pre"` LayerNorm placement. Defaults to `"post"`.
        dropout: variational dropout rate. Defaults to 0.06.
        weight_norm: wrap every projection in `WeightNormalization`.
            Defaults to `True`.
        init_stddev: standard deviation of the initial weights, or `None`
            for 1/√fan_in per projection. Defaults to `None`.
        layer_norm_epsilon: LayerNormalization ε. Defaults to 1e-5.
        seed: int seed of the initialisers and dropout. Defaults to `None`.

    Examples:

        ```python
        block = keras_deq.models.DEQTransformerBlock(
            hidden_dim=128, num_heads=4, intermediate_dim=256
        )
        deq = keras_deq.DEQLayer(block, sample_axes=2)
        z_star = deq(injection)  # [B, T, 128]
        ```
    """

    def __init__(
        self,
        hidden_dim: int = 700,
        num_heads: int = 10,
        intermediate_dim: int = 48000,
        norm: str = "post",
        dropout: float = 0.06,
        weight_norm: bool = True,
        init_stddev: float | None = None,
        layer_norm_epsilon: float = 1e-5,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim, self.num_heads = _check_heads(hidden_dim, num_heads)
        self.intermediate_dim = validation.check_int(
            "intermediate_dim", intermediate_dim, 1
        )
        self.norm = validation.check_choice("norm", norm, NORMS)
        self.dropout = validation.check_range("dropout", dropout, 0, 1)
        self.weight_norm = bool(weight_norm)
        self.init_stddev = _check_stddev(init_stddev)
        self.layer_norm_epsilon = validation.check_positive(
            "layer_norm_epsilon", layer_norm_epsilon
        )
        self.seed = seed

    def _dense(
        self, units, fan_in, name, index, activation=None, use_bias=True
    ):
        dense = keras.layers.Dense(
            units,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=_normal(
                self.init_stddev,
                fan_in,
                None if self.seed is None else self.seed * 100 + index,
            ),
            dtype=self.dtype_policy,
            name=name,
        )
        if self.weight_norm:
            return WeightNormalization(
                dense, dtype=self.dtype_policy, name=name
            )
        return dense

    def _layer_norm(self, name):
        return keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name=name
        )

    def _dropout(self, name, index):
        return VariationalDropout(
            self.dropout,
            seed=None if self.seed is None else self.seed + index,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, z_shape, x_shape):
        d = self.hidden_dim
        if len(z_shape) != 3 or z_shape[-1] != d:
            raise ValueError(
                f"DEQTransformerBlock expects a state of shape [batch, length, "
                f"{d}]. Received: {tuple(z_shape)}"
            )
        if len(x_shape) != 3 or x_shape[-1] != 3 * d:
            raise ValueError(
                "DEQTransformerBlock expects an injection of shape [batch, "
                f"length, {3 * d}] (added to q, k and v). Received: "
                f"{tuple(x_shape)}"
            )
        z_shape = tuple(z_shape)
        inner_shape = z_shape[:-1] + (self.intermediate_dim,)
        self.qkv = self._dense(3 * d, d, "qkv", 1, use_bias=False)
        self.attention_output = self._dense(d, d, "attention_output", 2)
        self.ffn_inner = self._dense(
            self.intermediate_dim, d, "ffn_inner", 3, activation="relu"
        )
        self.ffn_output = self._dense(d, self.intermediate_dim, "ffn_output", 4)
        self.norm1 = self._layer_norm("norm1")
        self.norm2 = self._layer_norm("norm2")
        norms = [self.norm1, self.norm2]
        if self.norm == "pre":
            self.norm3 = self._layer_norm("norm3")
            norms.append(self.norm3)
        self.attention_dropout = self._dropout("attention_dropout", 1)
        self.ffn_dropout = self._dropout("ffn_dropout", 2)
        for layer, shape in [
            (self.qkv, z_shape),
            (self.attention_output, z_shape),
            (self.ffn_inner, z_shape),
            (self.ffn_output, inner_shape),
            *((norm, z_shape) for norm in norms),
            (self.attention_dropout, z_shape),
            (self.ffn_dropout, inner_shape),
        ]:
            layer.build(shape)
        self.built = True

    def initial_state(self, x):
        """z₀ = 0, `[B, T, hidden_dim]`."""
        return ops.zeros_like(x[..., : self.hidden_dim])

    def _heads(self, z, x):
        """Queries, keys and values `[B, T, heads, head_dim]` at (z, x)."""
        heads, head_dim = self.num_heads, self.hidden_dim // self.num_heads
        qkv = self.qkv(self.norm1(z) if self.norm == "pre" else z) + x
        qkv = ops.reshape(qkv, (ops.shape(z)[0], -1, 3, heads, head_dim))
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def _attention(self, z, x, memory, memory_length):
        q, k, v = self._heads(z, x)
        old = 0
        if memory is not None:
            old_kv = self._split_memory(memory)
            old_k, old_v = old_kv[:, :, 0], old_kv[:, :, 1]
            k = ops.concatenate([ops.cast(old_k, k.dtype), k], axis=1)
            v = ops.concatenate([ops.cast(old_v, v.dtype), v], axis=1)
            old = ops.shape(old_k)[1]
        # New position i reads the remembered positions and the new ones up
        # to itself. (One mask for both cases, rather than `is_causal`
        # without memory, so that a prompt decoded from empty memory runs
        # the same computation as the full forward pass.)
        new = ops.shape(q)[1]
        keys = ops.arange(old + new)[None, :]
        mask = keys <= old + ops.arange(new)[:, None]
        if memory_length is not None:
            mask = ops.logical_and(
                mask,
                ops.logical_or(keys < memory_length, keys >= old),
            )
        out = ops.dot_product_attention(q, k, v, mask=mask[None, None])
        return ops.reshape(out, ops.shape(z))

    def _split_memory(self, memory):
        heads, head_dim = self.num_heads, self.hidden_dim // self.num_heads
        return ops.reshape(
            memory, (ops.shape(memory)[0], -1, 2, heads, head_dim)
        )

    def attention_memory(self, z, x):
        """What later positions read of positions (z, x): their keys and values.

        Args:
            z: `[B, T, hidden_dim]` states (equilibria, for a cache).
            x: `[B, T, 3 · hidden_dim]` their injections.

        Returns:
            `[B, T, 2 · hidden_dim]`: the attention keys, then the values,
            of every position (heads concatenated). Pass it (concatenated
            along the positions with earlier memory) as `memory` to `call`.
        """
        _, k, v = self._heads(z, x)
        return ops.reshape(
            ops.stack([k, v], axis=2),
            (ops.shape(z)[0], -1, 2 * self.hidden_dim),
        )

    def call(self, z, x, training=None, *, memory=None, memory_length=None):
        """f(z, x); with `memory`, the positions continue a remembered prefix.

        `memory` (`[B, M, 2 · hidden_dim]`, from `attention_memory`) holds
        the keys and values of M earlier positions; z and x are then the
        positions after them and attend to those M as well as (causally) to
        each other. Without it z and x are the whole sequence.
        `memory_length` (a scalar) says that only the first
        `memory_length` of the M are filled (a preallocated memory, as a
        compiled decoding loop needs); the others are not read.
        """
        if self.norm == "post":
            a = self.attention_output(
                self._attention(z, x, memory, memory_length)
            )
            h = self.norm1(z + self.attention_dropout(a, training=training))
            inner = self.ffn_dropout(self.ffn_inner(h), training=training)
            return self.norm2(h + self.ffn_output(inner))
        a = self.attention_output(self._attention(z, x, memory, memory_length))
        h = z + self.attention_dropout(a, training=training)
        inner = self.ffn_dropout(
            self.ffn_inner(self.norm2(h)), training=training
        )
        return self.norm3(h + self.ffn_output(inner))

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "norm": self.norm,
            "dropout": self.dropout,
            "weight_norm": self.weight_norm,
            "init_stddev": self.init_stddev,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "seed": self.seed,
        }
