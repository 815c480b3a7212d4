"""DEQ-Transformer language model (Bai et al. 2019; 2021)."""

import keras
import numpy as np
import tensorflow as tf

from keras_deq.layers.deq_layer import DEQLayer
from keras_deq.layers.variational_dropout import VariationalDropout
from keras_deq.layers.weight_normalization import WeightNormalization
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
    "converge" by inflating the state rather than by finding a root
    (measured at initialisation, width 128: ‖z*‖ of 9·10³ per position with
    N(0, 0.01²) weights and 1.5·10⁶ with the default ones, at a relative
    residual of 3·10⁻⁴; the model then learned less than a unigram model).
    LN₃ keeps the equilibrium on the LayerNorm scale, as post-LN does.

    `attention` is causal multi-head scaled dot-product attention
    (`keras.ops.dot_product_attention` with `is_causal=True`), so position t
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

    def _attention(self, z, x):
        batch, length = tf.shape(z)[0], tf.shape(z)[1]
        heads, head_dim = self.num_heads, self.hidden_dim // self.num_heads
        qkv = self.qkv(z) + x
        qkv = tf.reshape(qkv, [batch, length, 3, heads, head_dim])
        q, k, v = tf.unstack(qkv, axis=2)
        out = keras.ops.dot_product_attention(q, k, v, is_causal=True)
        return tf.reshape(out, [batch, length, self.hidden_dim])

    def call(self, z, x, training=None):
        if self.norm == "post":
            a = self.attention_output(self._attention(z, x))
            h = self.norm1(z + self.attention_dropout(a, training=training))
            inner = self.ffn_dropout(self.ffn_inner(h), training=training)
            return self.norm2(h + self.ffn_output(inner))
        a = self.attention_output(self._attention(self.norm1(z), x))
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
class DEQTransformerLM(keras.Model):
    """A word-level DEQ-Transformer language model.

    Token ids `[B, T]` → logits `[B, T, vocab_size]` for the next token.
    The tokens are embedded (keras-hub `ReversibleEmbedding`, scaled by
    √hidden_dim) and given sinusoidal positions (keras-hub
    `SinePositionEncoding`), so any length works; after variational dropout
    a weight-normalised Dense projection of this sequence is the injection
    x of one `DEQLayer` (named `"deq"`) over a `DEQTransformerBlock`, whose
    equilibrium z* = f_θ(z*, x) replaces a deep stack of weight-tied
    layers. The softmax head is the embedding matrix transposed (the same
    `ReversibleEmbedding`, tied).

    Defaults follow Table 4 (WikiText-103) of Bai, Koltun & Kolter (2021)
    and the original DEQ-Transformer -- width 700, 10 heads, feed-forward
    width 48000, post-LN, variational dropout 0.06, weight normalization,
    Broyden with 12 forward / 12 backward NFEs
    and tolerances 1e-3 / 1e-4, Jacobian penalty γ = 1.6 with p = 0.35
    (`keras_deq.callbacks.JacobianSchedule(1.6, 2.5, ...)` raises γ over
    training, as the paper does), M = 1. The training sequence length (150)
    is the data pipeline's; the model takes any length. Unlike the original
    it has a full softmax (no adaptive softmax) and no Transformer-XL
    memory of the previous segment.

    Two departures from Table 4 in the defaults. The first is γ at small
    widths: `jac_weight=None` is γ = 1.6 · min(1, √(hidden_dim / 700)), the
    paper's 1.6 at its width 700 and less below it (0.68 at width 128,
    0.48 at 64), because the penalty binds harder on a narrow model. Measured
    at width 128 (post-LN, char-level text, seeds 0 / 2; an explicit
    one-layer transformer of the same width reaches 5.51 / 6.08): γ = 1.6
    ends at perplexity 6.71 / 7.68 (1.22 / 1.26 × the explicit layer),
    γ = 0.68 at 5.73 / 6.01 (1.04 / 0.99 ×), still at a lower forward NFE
    than without the penalty (10.2 against 11.7). A number sets γ as given.

    The second is initialisation: the
    paper draws every weight from N(0, 0.01²); here `init_stddev=None`
    draws each projection from N(0, 1/fan_in) and the embedding from
    N(0, 1/hidden_dim), so embedded tokens (×√hidden_dim) have unit scale
    like the sine positions. Measured at width 128 (char-level text, Adam
    1e-3, 2 epochs): with N(0, 0.01²) the injection is so small against
    the LayerNorm'd state that changing every token moves z* by 6%
    (64% with the default), and the model ends at the unigram perplexity
    (20.75 against 20.70); with the default it reaches 0.28–0.32 × unigram
    with the penalty on. The paper's configuration is
    `DEQTransformerLM(vocab_size, init_stddev=0.01, jac_weight=1.6)` with
    `keras_deq.callbacks.JacobianSchedule(1.6, 2.5, epochs=...)`.

    Causality: f_θ is causal and the `DEQLayer` solves every position as
    its own problem (`sample_axes=2`), so the output at position t depends
    on tokens ≤ t only, exactly, at any tolerance.

    Args:
        vocab_size: number of token ids.
        hidden_dim, num_heads, intermediate_dim, norm, dropout,
        weight_norm, init_stddev, layer_norm_epsilon: of the block (and
            `dropout` also on the embedded input and before the head).
        solver, max_iter, tol, backward_max_iter, backward_tol, gradient,
        jac_weight: γ of the `DEQLayer`, or `None` (the default) for
            1.6 · min(1, √(hidden_dim / 700)).
        jac_freq, jac_samples: of the `DEQLayer`.
        seed: int seed of initialisers, dropout and the penalty's draws.
        **kwargs: `keras.Model` arguments (`name`, `dtype`).
    """

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
        solver: str = "broyden",
        max_iter: int = 12,
        tol: float = 1e-3,
        backward_max_iter: int = 12,
        backward_tol: float = 1e-4,
        gradient: str = "implicit",
        jac_weight: float | None = None,
        jac_freq: float = 0.35,
        jac_samples: int = 1,
        seed: int | None = None,
        **kwargs,
    ):
        keras_hub = _keras_hub()
        validation.check_int("vocab_size", vocab_size, 2)
        hidden_dim, num_heads = _check_heads(hidden_dim, num_heads)
        init_stddev = _check_stddev(init_stddev)
        if jac_weight is None:
            jac_weight = default_jac_weight(hidden_dim)
        dtype = kwargs.pop("dtype", None)
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
        deq = DEQLayer(
            block,
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            backward_max_iter=backward_max_iter,
            backward_tol=backward_tol,
            gradient=gradient,
            jac_weight=jac_weight,
            jac_freq=jac_freq,
            jac_samples=jac_samples,
            seed=seed,
            sample_axes=2,
            dtype=dtype,
            name="deq",
        )
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
        h = keras.layers.Rescaling(np.sqrt(hidden_dim), dtype=dtype)(h)
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
            "solver": solver,
            "max_iter": max_iter,
            "tol": tol,
            "backward_max_iter": backward_max_iter,
            "backward_tol": backward_tol,
            "gradient": gradient,
            "jac_weight": jac_weight,
            "jac_freq": jac_freq,
            "jac_samples": jac_samples,
            "seed": seed,
        }
        self._next_logits = None

    def get_config(self):
        return {"name": self.name, **self._config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)

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

    def generate(
        self,
        token_ids,
        num_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> np.ndarray:
        """Continues `token_ids` (`[B, T]` or `[T]`) by `num_tokens` tokens.

        Each new token comes from a full DEQ forward pass over the sequence
        so far: the argmax of the next-token logits (`temperature=0`,
        greedy) or a draw from softmax(logits / temperature).

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
        squeeze = ids.ndim == 1
        ids = np.atleast_2d(ids).astype(np.int32)
        rng = np.random.default_rng(seed)
        for _ in range(num_tokens):
            logits = self.next_token_logits(ids).numpy().astype(np.float64)
            if temperature == 0:
                new = logits.argmax(axis=-1)
            else:
                scaled = logits / temperature
                scaled -= scaled.max(axis=-1, keepdims=True)
                probs = np.exp(scaled)
                probs /= probs.sum(axis=-1, keepdims=True)
                new = np.array([rng.choice(vocab, p=p) for p in probs])
            ids = np.concatenate([ids, new[:, None].astype(np.int32)], axis=1)
        return ids[0] if squeeze else ids
