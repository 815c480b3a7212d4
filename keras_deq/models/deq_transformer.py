"""DEQ-Transformer language model (Bai et al. 2019; 2021)."""

import keras
import numpy as np
import tensorflow as tf

from keras_deq.layers.variational_dropout import VariationalDropout
from keras_deq.layers.weight_normalization import WeightNormalization
from keras_deq.models import _deq_options
from keras_deq.utils import validation

NORMS = ("post", "pre")


def _keras_hub():
    try:
        import keras_hub
    except ImportError:
        raise ImportError(
            "DEQTransformerLM takes its embedding and positions from "
            "keras-hub, which is not installed. Install it with "
            "`pip install keras-hub` (or `pip install keras-deq[examples]`)."
        ) from None
    return keras_hub


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
        return tf.zeros_like(x[..., : self.hidden_dim])

    def _heads(self, z, x):
        """Queries, keys and values `[B, T, heads, head_dim]` at (z, x)."""
        batch, length = tf.shape(z)[0], tf.shape(z)[1]
        heads, head_dim = self.num_heads, self.hidden_dim // self.num_heads
        qkv = self.qkv(self.norm1(z) if self.norm == "pre" else z) + x
        qkv = tf.reshape(qkv, [batch, length, 3, heads, head_dim])
        return tf.unstack(qkv, axis=2)

    def _attention(self, z, x, memory, memory_length):
        q, k, v = self._heads(z, x)
        old = 0
        if memory is not None:
            old_k, old_v = tf.unstack(self._split_memory(memory), axis=2)
            k = tf.concat([tf.cast(old_k, k.dtype), k], axis=1)
            v = tf.concat([tf.cast(old_v, v.dtype), v], axis=1)
            old = tf.shape(old_k)[1]
        # New position i reads the remembered positions and the new ones up
        # to itself. (One mask for both cases, rather than `is_causal`
        # without memory, so that a prompt decoded from empty memory runs
        # the same computation as the full forward pass.)
        new = tf.shape(q)[1]
        keys = tf.range(old + new)[None, :]
        mask = keys <= old + tf.range(new)[:, None]
        if memory_length is not None:
            mask &= (keys < memory_length) | (keys >= old)
        out = keras.ops.dot_product_attention(q, k, v, mask=mask[None, None])
        return tf.reshape(out, tf.shape(z))

    def _split_memory(self, memory):
        shape = tf.shape(memory)
        heads, head_dim = self.num_heads, self.hidden_dim // self.num_heads
        return tf.reshape(memory, [shape[0], shape[1], 2, heads, head_dim])

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
        batch, length = tf.shape(z)[0], tf.shape(z)[1]
        return tf.reshape(
            tf.stack([k, v], axis=2), [batch, length, 2 * self.hidden_dim]
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


# generate's memory grows in blocks of this many positions.
_MEMORY_BLOCK = 64


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
class DEQTransformerLM(_deq_options.ConfigMixin, keras.Model):
    """A word-level DEQ-Transformer language model.

    Token ids `[B, T]` → logits `[B, T, vocab_size]` for the next token.
    The tokens are embedded (keras-hub `ReversibleEmbedding`, scaled by
    √hidden_dim) and given sinusoidal positions (keras-hub
    `SinePositionEncoding`), so any length works; after variational dropout
    a weight-normalised Dense projection of this sequence is the injection
    x of one `DEQLayer` (`model.deq`) over a `DEQTransformerBlock`, whose
    equilibrium z* = f_θ(z*, x) replaces a deep stack of weight-tied
    layers. The softmax head is the embedding matrix transposed (the same
    `ReversibleEmbedding`, tied).

    Defaults follow Table 4 (WikiText-103) of Bai, Koltun & Kolter (2021)
    and the original DEQ-Transformer -- width 700, 10 heads, feed-forward
    width 48000, post-LN, variational dropout 0.06, weight normalization,
    Broyden with 12 forward / 12 backward NFEs and tolerances 1e-3 / 1e-4,
    Jacobian penalty with p = 0.35, M = 1. The training sequence length
    (150) is the data pipeline's; the model takes any length. Unlike the
    original it has a full softmax (no adaptive softmax) and no
    Transformer-XL memory of the previous segment. Two departures from
    Table 4, whose measurements are on the docs' Models page:

    - γ follows the width: `jac_weight=None` is
      γ = 1.6 · min(1, √(hidden_dim / 700)), the paper's 1.6 at its width
      700 and less below it (0.68 at width 128), because the penalty binds
      harder on a narrow model. A number sets γ as given.
    - initialisation: `init_stddev=None` draws each projection from
      N(0, 1/fan_in) and the embedding from N(0, 1/hidden_dim), so
      embedded tokens (×√hidden_dim) have unit scale like the sine
      positions; with the paper's N(0, 0.01²) a small model's injection
      hardly moves z* and it learns little beyond token frequencies.

    Train width 700 at Table 4's learning rate 2.5e-4 (the WikiText
    example's default). The paper's configuration is
    `DEQTransformerLM(vocab_size, init_stddev=0.01, jac_weight=1.6)` with
    `keras_deq.callbacks.JacobianSchedule(1.6, 2.5, epochs=...)`.

    Causality: f_θ is causal and the `DEQLayer` solves every position as
    its own problem (`sample_axes=2`), so the output at position t depends
    on tokens ≤ t only, exactly, at any tolerance.

    DEQ settings: the `DEQLayer` arguments default to `DEQ_DEFAULTS`, and
    every `DEQLayer` argument is a keyword argument of the model too
    (`DEQTransformerLM(vocab_size, max_iter=30, solver_options={"memory":
    8})`); `get_config` saves them with their current values (γ and p as
    callbacks left them). `sample_axes=2` is what makes the output causal
    exactly and the cached decoding (`decode_step`, `generate`) equal to a
    full re-solve; with 1, both hold to within the tolerance only.

    Args:
        vocab_size: number of token ids.
        hidden_dim: width of the state and the embedding. Defaults to 700.
        num_heads: attention heads; must divide `hidden_dim`. Defaults to
            10.
        intermediate_dim: hidden width of the feed-forward block. Defaults
            to 48000.
        norm: `"post"` or `"pre"` LayerNorm placement in the block.
            Defaults to `"post"`.
        dropout: variational dropout rate in the block, on the embedded
            input and before the head. Defaults to 0.06.
        weight_norm: wrap every projection in `WeightNormalization`.
            Defaults to `True`.
        init_stddev: standard deviation of the initial weights, or `None`
            for 1/√fan_in per projection. Defaults to `None`.
        layer_norm_epsilon: LayerNormalization ε. Defaults to 1e-5.
        seed: int seed of initialisers, dropout and the `DEQLayer`'s
            penalty draws. Defaults to `None`.
        deq_name: name of the model's `DEQLayer`, which prefixes its
            statistics (`{deq_name}_forward_nfe`, ...). Defaults to `None`:
            `"deq"`, or `"deq_1"`, `"deq_2"`, ... for later models in the
            process, so that two models trained together (an ensemble, a
            teacher and a student) log both layers' statistics.
        **kwargs: any `DEQLayer` argument but `seed` (`solver`, `max_iter`,
            `tol`, `gradient`, `jac_weight`, ...; see `DEQ_DEFAULTS`), and
            `keras.Model` arguments (`name`, `dtype`, `trainable`).

    Examples:

        ```python
        model = keras_deq.models.DEQTransformerLM(
            vocab_size, hidden_dim=128, num_heads=4, intermediate_dim=256
        )
        model.compile(
            optimizer=keras.optimizers.Adam(2.5e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(inputs, targets, batch_size=16, epochs=8)
        continuation = model.generate(prompt_ids, 64)
        ```
    """

    _TRACED = ("_next_logits", "_decode", "_decode_compiled")

    DEQ_DEFAULTS = {
        "solver": "broyden",
        "max_iter": 12,
        "tol": 1e-3,
        "backward_max_iter": 12,
        "backward_tol": 1e-4,
        "jac_weight": None,
        "jac_freq": 0.35,
        "jac_samples": 1,
        "sample_axes": 2,
    }

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int = 700,
        num_heads: int = 10,
        intermediate_dim: int = 48000,
        norm: str = "post",
        dropout: float = 0.06,
        weight_norm: bool = True,
        init_stddev: float | None = None,
        layer_norm_epsilon: float = 1e-5,
        seed: int | None = None,
        deq_name: str | None = None,
        **kwargs,
    ):
        keras_hub = _keras_hub()
        deq_options = _deq_options.take(self.DEQ_DEFAULTS, kwargs)
        validation.check_int("vocab_size", vocab_size, 2)
        hidden_dim, num_heads = _check_heads(hidden_dim, num_heads)
        init_stddev = _check_stddev(init_stddev)
        if deq_options["jac_weight"] is None:
            deq_options["jac_weight"] = default_jac_weight(hidden_dim)
        dtype = _deq_options.dtype_policy(kwargs.pop("dtype", None))
        _deq_options.check_base("DEQTransformerLM", kwargs)
        block = DEQTransformerBlock(
            hidden_dim,
            num_heads,
            intermediate_dim,
            norm=norm,
            dropout=dropout,
            weight_norm=weight_norm,
            init_stddev=init_stddev,
            layer_norm_epsilon=layer_norm_epsilon,
            seed=seed,
            dtype=dtype,
            name="transformer_block",
        )
        deq = _deq_options.deq_layer(block, seed, dtype, deq_name, deq_options)
        embedding = keras_hub.layers.ReversibleEmbedding(
            vocab_size,
            hidden_dim,
            tie_weights=True,
            embeddings_initializer=_normal(init_stddev, hidden_dim, seed),
            dtype=dtype,
            name="token_embedding",
        )

        def dropout_layer(name, index):
            return VariationalDropout(
                dropout,
                seed=None if seed is None else seed + 10 + index,
                dtype=dtype,
                name=name,
            )

        tokens = keras.Input((None,), dtype="int32", name="tokens")
        h = embedding(tokens)
        h = keras.layers.Rescaling(
            np.sqrt(hidden_dim), dtype=dtype, name="embedding_scale"
        )(h)
        positions = keras_hub.layers.SinePositionEncoding(
            dtype=dtype, name="positions"
        )(h)
        h = keras.layers.Add(dtype=dtype, name="embedded")([h, positions])
        h = dropout_layer("input_dropout", 0)(h)
        injection = keras.layers.Dense(
            3 * hidden_dim,
            kernel_initializer=_normal(
                init_stddev, hidden_dim, None if seed is None else seed + 1
            ),
            dtype=dtype,
            name="injection",
        )
        if weight_norm:
            injection = WeightNormalization(
                injection, dtype=dtype, name="injection"
            )
        z_star = deq(injection(h))
        z_star = dropout_layer("output_dropout", 1)(z_star)
        logits = embedding(z_star, reverse=True)
        logits = keras.layers.Activation(
            "linear", dtype="float32", name="logits"
        )(logits)
        super().__init__(tokens, logits, **kwargs)
        self._deq_name = deq.name
        if dtype is not None:  # Functional drops it, as keras-hub notes
            self.dtype_policy = dtype
        self._config = {
            "vocab_size": vocab_size,
            "hidden_dim": hidden_dim,
            "num_heads": num_heads,
            "intermediate_dim": intermediate_dim,
            "norm": norm,
            "dropout": dropout,
            "weight_norm": weight_norm,
            "init_stddev": init_stddev,
            "layer_norm_epsilon": layer_norm_epsilon,
            "seed": seed,
        }
        self._next_logits = None
        self._decode = None
        self._decode_compiled = None

    def next_token_logits(self, token_ids):
        """Logits `[B, vocab_size]` for the token after `token_ids` `[B, T]`.

        Runs the DEQ over the whole sequence (no cache: the equilibrium of
        every position is solved again), traced once for all lengths.
        """
        if self._next_logits is None:

            @tf.function(
                input_signature=[tf.TensorSpec([None, None], tf.int32)],
                reduce_retracing=True,
            )
            def next_logits(ids):
                return self(ids, training=False)[:, -1]

            self._next_logits = next_logits
        return self._next_logits(tf.convert_to_tensor(token_ids, tf.int32))

    def _memory_spec(self):
        dtype = self.deq.block.compute_dtype
        return tf.TensorSpec(
            [None, None, 2 * self._config["hidden_dim"]], dtype, name="memory"
        )

    def _solve_new(self, token_ids, memory, memory_length=None):
        """Logits `[B, S, vocab]` of new positions and their memory."""
        deq = self.deq
        block = deq.block
        if memory_length is None:
            start = tf.shape(memory)[1]
        else:
            start = memory_length
        h = self.get_layer("token_embedding")(token_ids)
        h = self.get_layer("embedding_scale")(h)
        positions = self.get_layer("positions")(h, start_index=start)
        h = self.get_layer("embedded")([h, positions])
        x = self.get_layer("injection")(h)

        def f(z):
            return block(
                z,
                x,
                training=False,
                memory=memory,
                memory_length=memory_length,
            )

        z_star, _ = deq.solve(f, block.initial_state(x))
        logits = self.get_layer("token_embedding")(z_star, reverse=True)
        return tf.cast(logits, tf.float32), block.attention_memory(z_star, x)

    def _decode_step(self, token_ids, memory):
        """`decode_step` in graph form: both arguments given, no checks."""
        logits, new = self._solve_new(token_ids, memory)
        return logits, tf.concat([memory, tf.cast(new, memory.dtype)], 1)

    def _decode_into(self, token_ids, memory, memory_length):
        """One new token per row into a preallocated memory (generate's).

        `memory` `[B, C, 2 · hidden_dim]` holds `memory_length` filled
        positions; the new one's keys and values go to the next slot.
        Shapes do not change from token to token, so this compiles once
        (XLA) per batch size and capacity C.
        """
        logits, new = self._solve_new(token_ids, memory, memory_length)
        slot = tf.range(tf.shape(memory)[1])[None, :, None] == memory_length
        memory = tf.where(slot, tf.cast(new, memory.dtype), memory)
        return logits[:, -1], memory

    def _decode_function(self):
        if self._decode is None:
            self._decode = tf.function(
                self._decode_step,
                input_signature=[
                    tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                    self._memory_spec(),
                ],
                reduce_retracing=True,
            )
        return self._decode

    def empty_memory(self, batch_size: int) -> tf.Tensor:
        """The memory of no positions, `[batch_size, 0, 2 · hidden_dim]`."""
        validation.check_int("batch_size", batch_size, 1)
        spec = self._memory_spec()
        return tf.zeros([batch_size, 0, spec.shape[-1]], spec.dtype)

    def decode_step(self, token_ids, memory=None):
        """Logits of tokens that continue a remembered prefix, and new memory.

        The DEQ analogue of a key/value cache. With `sample_axes=2` the
        equilibrium at a position depends on the positions before it only,
        so once solved it can be kept: `memory` holds, for every earlier
        position, the attention keys and values of its equilibrium
        (`DEQTransformerBlock.attention_memory`). This solves only the new
        positions, with the `DEQLayer`'s solver settings, attending to the
        remembered ones, so a new token costs one position's solve instead
        of the whole sequence's.

        The result equals the full forward pass (`model(ids)`) up to the
        solver tolerance, not bit for bit: the full pass solves every
        position together, each against the current iterates of the
        earlier ones, while this solves against their equilibria.

        Args:
            token_ids: `[B, S]` ids of positions M, ..., M + S − 1 (a prompt
                when `memory` is empty, then one new token at a time).
            memory: `[B, M, 2 · hidden_dim]` from an earlier call, or `None`
                for none (M = 0).

        Returns:
            `(logits, memory)`: float32 logits `[B, S, vocab_size]` for the
            token after each of the S positions, and the memory of all
            M + S positions.
        """
        ids = tf.convert_to_tensor(token_ids)
        if ids.shape.rank != 2 or not ids.dtype.is_integer:
            raise ValueError(
                "`token_ids` must be a [batch, length] integer tensor. "
                f"Received: shape {tuple(ids.shape)}, dtype {ids.dtype.name}"
            )
        spec = self._memory_spec()
        if memory is None:
            memory = tf.zeros([tf.shape(ids)[0], 0, spec.shape[-1]], spec.dtype)
        memory = tf.convert_to_tensor(memory, spec.dtype)
        if (
            memory.shape.rank != 3
            or memory.shape[-1] != spec.shape[-1]
            or (memory.shape[0] != ids.shape[0])
        ):
            raise ValueError(
                "`memory` must be [batch, positions, "
                f"{spec.shape[-1]}] with the batch of `token_ids` "
                f"({ids.shape[0]}). Received shape {tuple(memory.shape)}"
            )
        return self._decode_function()(tf.cast(ids, tf.int32), memory)

    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=None,
        input_signature=None,
        **kwargs,
    ):
        """`keras.Model.export`, plus a `decode_step` endpoint.

        The SavedModel has `serve(token_ids)` (`[B, T]` → logits `[B, T,
        vocab]`, the full forward pass) and `decode_step(token_ids,
        memory)`, the incremental decoding of `decode_step` (start it with
        a `[B, 0, 2 · hidden_dim]` memory). Other formats export `serve`
        only, as Keras does.
        """
        if format != "tf_saved_model":
            return super().export(
                filepath,
                format=format,
                verbose=verbose,
                input_signature=input_signature,
                **kwargs,
            )
        if kwargs:
            raise TypeError(
                f"Unexpected export arguments: {sorted(kwargs)}. "
                "DEQTransformerLM.export takes filepath, format, verbose "
                "and input_signature."
            )
        archive = keras.export.ExportArchive()
        archive.track_and_add_endpoint(
            "serve",
            self,
            input_signature
            or [tf.TensorSpec([None, None], tf.int32, name="tokens")],
        )
        archive.add_endpoint(
            "decode_step",
            self._decode_step,
            input_signature=[
                tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                self._memory_spec(),
            ],
        )
        archive.write_out(
            filepath, verbose=True if verbose is None else verbose
        )

    def _cached_decoder(self, ids, num_tokens):
        """The prompt's next-token logits, and `decode(new) -> logits`.

        The prompt is solved at once (`decode_step`); every later token
        through `_decode_into`, compiled with XLA, on a memory with room
        for `num_tokens` more positions.
        """
        logits, memory = self._decode_function()(
            ids, self.empty_memory(len(ids))
        )
        # Room for every position that will be decoded, rounded up so that
        # generations of similar lengths share one compilation.
        filled = ids.shape[1]
        capacity = -(-(filled + num_tokens) // _MEMORY_BLOCK) * _MEMORY_BLOCK
        state = {
            "memory": tf.pad(memory, [[0, 0], [0, capacity - filled], [0, 0]]),
            "filled": filled,
        }
        if self._decode_compiled is None:
            self._decode_compiled = tf.function(
                self._decode_into, jit_compile=True
            )

        def decode(new):
            if state["filled"] >= capacity:
                raise ValueError(
                    f"This decoder has room for {num_tokens} new tokens."
                )
            logits, state["memory"] = self._decode_compiled(
                new, state["memory"], tf.constant(state["filled"], tf.int32)
            )
            state["filled"] += 1
            return logits

        return logits[:, -1], decode

    def generate(
        self,
        token_ids,
        num_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        cache: bool = True,
    ) -> np.ndarray:
        """Continues `token_ids` (`[B, T]` or `[T]`) by `num_tokens` tokens.

        Each new token is the argmax of the next-token logits
        (`temperature=0`, greedy) or a draw from softmax(logits /
        temperature). With `cache=True` (the default) the prompt is solved
        once and each new token costs one position's solve against the
        remembered equilibria (`decode_step`, with the memory preallocated
        and the step compiled with XLA, once per batch size and length
        rounded up to 64); with `cache=False` every
        token comes from a full forward pass over the sequence so far
        (`next_token_logits`). The two agree up to the solver tolerance, so
        a greedy continuation can differ only where two tokens' logits are
        that close.

        Returns:
            The prompt and its continuation, int32, `[B, T + num_tokens]`
            (or `[T + num_tokens]` for a 1-D prompt).
        """
        ids = np.asarray(token_ids)
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise ValueError(
                "`token_ids` must be a non-empty [length] or [batch, length] "
                f"array of token ids. Received shape {ids.shape}"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(
                f"`token_ids` must hold integers. Received dtype {ids.dtype}"
            )
        vocab = self._config["vocab_size"]
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(
                f"`token_ids` must be in [0, {vocab}). Received values in "
                f"[{ids.min()}, {ids.max()}]"
            )
        validation.check_int("num_tokens", num_tokens, 0)
        temperature = validation.check_nonnegative("temperature", temperature)
        if not isinstance(cache, bool):
            raise TypeError(f"`cache` must be a bool. Received: {cache!r}")
        squeeze = ids.ndim == 1
        ids = np.atleast_2d(ids).astype(np.int32)
        rng = np.random.default_rng(seed)
        if cache:
            logits, decode = self._cached_decoder(ids, num_tokens)
        for step in range(num_tokens):
            if not cache:
                logits = self.next_token_logits(ids)
            scores = logits.numpy().astype(np.float64)
            if temperature == 0:
                new = scores.argmax(axis=-1)
            else:
                scaled = scores / temperature
                scaled -= scaled.max(axis=-1, keepdims=True)
                probs = np.exp(scaled)
                probs /= probs.sum(axis=-1, keepdims=True)
                new = np.array([rng.choice(vocab, p=p) for p in probs])
            new = new[:, None].astype(np.int32)
            ids = np.concatenate([ids, new], axis=1)
            if cache and step < num_tokens - 1:
                logits = decode(new)
        return ids[0] if squeeze else ids
