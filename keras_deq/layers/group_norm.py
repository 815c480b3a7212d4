"""Group normalization computed in fewer passes than Keras' layer."""

import keras
import tensorflow as tf


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
        compute = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        x = tf.cast(inputs, compute)
        shape = tf.shape(x)
        channels, groups = x.shape[-1], self.groups
        per_group = channels // groups
        flat = tf.reshape(x, [shape[0], -1, channels])
        count = tf.cast(tf.shape(flat)[1] * per_group, compute)

        def group_mean(channel_sums):
            """[B, C] sums → [B, C], each channel its group's mean."""
            sums = tf.reshape(channel_sums, [-1, groups, per_group])
            mean = tf.reduce_sum(sums, axis=-1, keepdims=True) / count
            mean = tf.broadcast_to(mean, tf.shape(sums))
            return tf.reshape(mean, [-1, channels])

        mean = group_mean(tf.reduce_sum(flat, axis=1))
        deviations = tf.math.squared_difference(flat, mean[:, None])
        variance = group_mean(tf.reduce_sum(deviations, axis=1))
        scale = tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * tf.cast(self.gamma, compute)
        shift = -mean * scale
        if self.center:
            shift = shift + tf.cast(self.beta, compute)
        outputs = flat * scale[:, None] + shift[:, None]
        return tf.cast(tf.reshape(outputs, shape), self.compute_dtype)
