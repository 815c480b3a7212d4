"""Weight normalization: w = g · v / ‖v‖ per output unit."""

import keras
from keras import ops

_SUPPORTED = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)


@keras.saving.register_keras_serializable(package="keras_deq")
class WeightNormalization(keras.layers.Wrapper):
    """Reparameterizes a Dense or convolution kernel as w = g · v / ‖v‖.

    The wrapped layer's kernel becomes the direction v; a new vector g (one
    entry per output unit, i.e. the kernel's last axis) holds the norms,
    initialised to ‖v‖ so that the wrapped layer starts out computing
    exactly what it computed before. Gradients reach g and v through the
    normalization (unlike `keras.layers.SpectralNormalization`, which
    rewrites the kernel in place), which is what makes the
    reparameterization condition the optimisation. Keras 3 has no weight
    normalization and TensorFlow Addons is archived, hence this layer.

    Supports `keras.layers.Dense` and the Keras convolutions `Conv1D`,
    `Conv2D` and `Conv3D` (and their subclasses).

    Args:
        layer: the `Dense` or convolution layer to wrap.
        **kwargs: base layer arguments.

    Examples:

        ```python
        conv = keras_deq.layers.WeightNormalization(
            keras.layers.Conv2D(64, 3, padding="same"))
        ```

    Reference:
        Salimans & Kingma, "Weight Normalization: A Simple
        Reparameterization to Accelerate Training of Deep Neural Networks",
        NeurIPS 2016.
    """

    def __init__(self, layer, **kwargs):
        if not isinstance(layer, _SUPPORTED):
            raise TypeError(
                "`layer` must be a keras.layers.Dense or a Keras convolution "
                f"layer (Conv1D/2D/3D). Received: layer={layer!r} of type "
                f"{type(layer).__name__}"
            )
        super().__init__(layer, **kwargs)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        if getattr(self.layer, "lora_enabled", False):
            raise ValueError(
                "WeightNormalization does not support a layer with LoRA "
                f"enabled ({self.layer.name!r})."
            )
        kernel = self.layer.kernel
        self._axes = tuple(range(len(kernel.shape) - 1))
        self.g = self.add_weight(
            shape=(kernel.shape[-1],),
            initializer=lambda shape, dtype: ops.cast(
                self._norm(kernel), dtype
            ),
            name="g",
        )
        self.built = True

    def _norm(self, v):
        return ops.sqrt(ops.sum(ops.square(v), axis=self._axes))

    def normalized_kernel(self):
        """The kernel the wrapped layer uses: g · v / ‖v‖."""
        v = ops.cast(self.layer.kernel, self.compute_dtype)
        g = ops.cast(self.g, self.compute_dtype)
        scale = g / ops.maximum(self._norm(v), 1e-12)
        return v * scale

    def call(self, inputs, training=None):
        layer = self.layer
        kernel = self.normalized_kernel()
        if isinstance(layer, keras.layers.Dense):
            outputs = ops.matmul(inputs, kernel)
            if layer.bias is not None:
                outputs = outputs + layer.bias
        else:
            outputs = layer.convolution_op(inputs, kernel)
            if layer.use_bias:
                if layer.data_format == "channels_last":
                    shape = (1,) * (layer.rank + 1) + (layer.filters,)
                else:
                    shape = (1, layer.filters) + (1,) * layer.rank
                outputs = outputs + ops.reshape(layer.bias, shape)
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)
