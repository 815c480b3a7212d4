"""DEQ-Transformer language model (Bai et al. 2019; 2021)."""

import keras
import numpy as np

from keras_deq import backend as _backend
from keras_deq.layers.variational_dropout import VariationalDropout
from keras_deq.layers.weight_normalization import WeightNormalization
from keras_deq.models import _deq_options
from keras_deq.models.cached_decoding import CachedDecoding
from keras_deq.models.deq_transformer_block import DEQTransformerBlock
from keras_deq.models.deq_transformer_block import _check_heads
from keras_deq.models.deq_transformer_block import _check_stddev
from keras_deq.models.deq_transformer_block import _normal
from keras_deq.models.deq_transformer_block import default_jac_weight
from keras_deq.utils import validation


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
class DEQTransformerLM(CachedDecoding, _deq_options.ConfigMixin, keras.Model):
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
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.norm = norm
        self.dropout = dropout
        self.weight_norm = weight_norm
        self.init_stddev = init_stddev
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed
        self._next_logits = None
        self._decode = None
        self._decode_compiled = None

    def next_token_logits(self, token_ids):
        """Logits `[B, vocab_size]` for the token after `token_ids` `[B, T]`.

        Runs the DEQ over the whole sequence (no cache: the equilibrium of
        every position is solved again), traced once for all lengths.
        """
        if self._next_logits is None:

            def next_logits(ids):
                return self(ids, training=False)[:, -1]

            self._next_logits = _backend.function(
                next_logits, [((None, None), "int32", "token_ids")], state=self
            )
        return self._next_logits(
            keras.ops.convert_to_tensor(token_ids, "int32")
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocab_size": self.vocab_size,
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
        )
        return config
