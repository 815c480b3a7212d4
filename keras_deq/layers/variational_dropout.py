"""Variational (recurrent) dropout: one mask for a whole fixed-point solve."""

import contextlib

import keras
from keras import ops

from keras_deq.utils import validation
from keras_deq.utils.seeds import SavedSeedState


@keras.saving.register_keras_serializable(package="keras_deq")
class VariationalDropout(SavedSeedState, keras.layers.Layer):
    """Dropout whose mask stays fixed for a whole DEQ solve.

    Ordinary dropout draws a new mask on every call, so inside a DEQ block
    the map f would change from one solver iteration to the next and have
    no fixed point. This layer implements `keras_deq.layers.PerSolveNoise`:
    inside a `DEQLayer`, its mask is drawn once per `DEQLayer` call and
    used by every evaluation of the block in it: each forward iteration,
    the evaluation at z* that the backward pass differentiates, and the
    Jacobian penalty. The next call draws a new mask. Used outside a
    `DEQLayer`, it draws a mask per call.

    The mask is per sample and per channel (the last axis) and shared over
    the other axes, as in the variational dropout of DEQ-Transformer and
    MDEQ: `[B, C]` for 2-D inputs, `[B, 1, C]` for sequences, `[B, 1, 1, C]`
    for images. Kept units are scaled by 1 / (1 − rate). At inference
    (`training` false) the layer is the identity. Checkpoints save the
    state of its mask draws, so a resumed run draws the masks an
    uninterrupted one would.

    Args:
        rate: fraction of channels to drop, in [0, 1).
        seed: int seed of the masks. Defaults to `None`.
        **kwargs: base layer arguments.

    Examples:

        >>> drop = VariationalDropout(0.5, seed=0)
        >>> x = tf.ones([2, 3, 4])
        >>> bool(np.all(drop(x, training=False) == x))  # identity at inference
        True
        >>> mask = drop(x, training=True)[0]  # one mask for all 3 positions
        >>> bool(np.all(mask == mask[0]))
        True

    Reference:
        Gal & Ghahramani, "A Theoretically Grounded Application of Dropout
        in Recurrent Neural Networks", NeurIPS 2016.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = validation.check_range("rate", rate, 0, 1)
        if self.rate == 1:
            raise ValueError(
                "`rate` must be in [0, 1): a rate of 1 drops everything. "
                f"Received: rate={rate}"
            )
        if seed is not None:
            validation.check_int("seed", seed, 0)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._fixed_mask = None
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                "VariationalDropout needs inputs of rank >= 2 (batch and "
                f"channels). Received input shape {input_shape}."
            )
        self._rank = len(input_shape)
        self._channels = input_shape[-1]
        self.built = True

    def draw_noise(self, batch_size):
        """A new mask, `[batch_size, 1, ..., 1, channels]`, scaled.

        `None` when the rate is 0. With `fixed_noise`, the
        `keras_deq.layers.PerSolveNoise` protocol.
        """
        if self.rate == 0:
            return None
        shape = (batch_size, *[1] * (self._rank - 2), self._channels)
        keep = 1.0 - self.rate
        draw = keras.random.uniform(shape, seed=self.seed_generator)
        dtype = self.compute_dtype
        return ops.cast(draw < keep, dtype) / ops.cast(keep, dtype)

    @contextlib.contextmanager
    def fixed_noise(self, mask):
        """Makes every call inside the context use `mask`."""
        previous, self._fixed_mask = self._fixed_mask, mask
        try:
            yield
        finally:
            self._fixed_mask = previous

    def call(self, inputs, training=None):
        if not training or self.rate == 0:
            return inputs
        mask = self._fixed_mask
        if mask is None:
            mask = self.draw_noise(ops.shape(inputs)[0])
        return inputs * ops.cast(mask, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
