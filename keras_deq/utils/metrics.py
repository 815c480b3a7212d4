"""Metrics shared by the layers."""

import keras
import tensorflow as tf


class MeasuredMean(keras.metrics.Mean):
    """A mean that reads NaN, not 0, when it has no values to average."""

    def result(self):
        return tf.where(
            self.count > 0,
            tf.math.divide_no_nan(self.total, self.count),
            tf.constant(float("nan"), self.dtype),
        )
