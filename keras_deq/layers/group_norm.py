"""Group normalization computed in fewer passes than Keras' layer."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_deq")
class GroupNorm(keras.layers.GroupNormalization):
    """Keras' `GroupNormalization`, computed as fewer passes TF runs fast.

    The same arithmetic (per sample and group: the mean, then the mean of
    squared deviations, both over positions and the group's channels), with
    the same weights and configuration. For channels-last inputs it sums
    over the positions first (`[B, H·W, C]` → `[B, C]`, a contiguous
    reduction) and over each group's channels second, where Keras reduces a
    `[B, H, W, G, C/G]` tensor over three axes at once; the deviations are
    squared in one op (`squared_difference`), and the output is one affine
    map per sample and channel, x·a + b, so no centred copy of the input is
    kept (the timings against Keras' layer are in `docs/benchmarks.md`).
    Other axes fall back to Keras' computation.

    Examples:

        >>> x = tf.random.stateless_normal([2, 4, 4, 8], seed=[0, 1])
        >>> ours = GroupNorm(4)(x)
        >>> theirs = keras.layers.GroupNormalization(4)(x)
        >>> bool(np.allclose(ours, theirs, atol=1e-5))
        True
    """

    def call(self, inputs):
        rank = len(inputs.shape)
        if self.axis not in (-1, rank - 1) or rank < 3:
            return super().call(inputs)
        compute = "float64" if inputs.dtype == "float64" else "float32"
        x = ops.cast(inputs, compute)
        shape = ops.shape(x)
        channels, groups = x.shape[-1], self.groups
        per_group = channels // groups
        flat = ops.reshape(x, (shape[0], -1, channels))
        count = ops.cast(ops.shape(flat)[1] * per_group, compute)

        def group_mean(channel_sums):
            """[B, C] sums → [B, C], each channel its group's mean."""
            sums = ops.reshape(channel_sums, (-1, groups, per_group))
            mean = ops.sum(sums, axis=-1, keepdims=True) / count
            mean = ops.broadcast_to(mean, ops.shape(sums))
            return ops.reshape(mean, (-1, channels))

        mean = group_mean(ops.sum(flat, axis=1))
        deviations = ops.square(flat - mean[:, None])
        variance = group_mean(ops.sum(deviations, axis=1))
        scale = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, compute)
        shift = -mean * scale
        if self.center:
            shift = shift + ops.cast(self.beta, compute)
        outputs = flat * scale[:, None] + shift[:, None]
        return ops.cast(ops.reshape(outputs, shape), self.compute_dtype)
