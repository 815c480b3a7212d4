"""A spectral-norm bound on the kernels of a DEQ block."""

import keras
from keras import ops

from keras_deq.utils import validation


@keras.saving.register_keras_serializable(package="keras_deq")
class SpectralNormBound(keras.constraints.Constraint):
    """Scales a kernel down, when needed, to spectral norm `max_norm`.

    The kernel is read as the matrix `[-1, kernel.shape[-1]]` (inputs by
    output units; for a convolution the patch by the filters, as in
    Miyato et al. and TorchDEQ), and multiplied by
    min(1, max_norm / σ_max). A block f(z) = φ(W z + U x) with a
    1-Lipschitz φ and ‖W‖₂ ≤ max_norm < 1 is then a contraction, with one
    fixed point that plain iteration reaches from any start.

    Args:
        max_norm: the bound on the largest singular value, > 0. Defaults
            to `1.0`.

    Examples:

        >>> w = tf.constant([[3.0, 0.0], [0.0, 0.5]])
        >>> bounded = SpectralNormBound(0.9)(w).numpy()
        >>> s = np.linalg.svd(bounded, compute_uv=False)
        >>> [round(float(v), 4) for v in s]
        [0.9, 0.15]
    """

    def __init__(self, max_norm: float = 1.0):
        self.max_norm = validation.check_positive("max_norm", max_norm)

    def __call__(self, w):
        matrix = ops.reshape(w, (-1, ops.shape(w)[-1]))
        sigma = ops.norm(matrix, ord=2)
        scale = ops.minimum(1.0, self.max_norm / (sigma + 1e-12))
        return w * ops.cast(scale, w.dtype)

    def get_config(self):
        return {"max_norm": self.max_norm}


def apply_spectral_norm(
    layer: keras.layers.Layer, max_norm: float = 1.0
) -> list[str]:
    """Bounds the spectral norm of every kernel in a (built) layer.

    TorchDEQ's `apply_norm` for Keras: each `kernel` variable of `layer`
    and of the layers inside it (Dense, the convolutions, EinsumDense, ...)
    gets a `SpectralNormBound(max_norm)` constraint, which the optimizer
    applies after every update, and is projected once now. The layers'
    `kernel_constraint` is set too, so a saved model keeps the bound where
    the layers come from their configs; a block that makes its layers
    in `build` makes them anew on loading, so it takes the bound as an
    argument instead (`MDEQBlock(spectral_norm=...)`).
    Kernels that are computed rather than stored (inside
    `keras_deq.layers.WeightNormalization`) are left alone.

    Args:
        layer: a built layer, typically a DEQ block.
        max_norm: the bound, > 0. Defaults to `1.0`.

    Returns:
        The paths of the bounded kernels.

    Examples:

        ```python
        block.build(z_shape, x_shape)
        keras_deq.layers.apply_spectral_norm(block, max_norm=0.9)
        ```

    Reference:
        Miyato et al., "Spectral Normalization for Generative Adversarial
        Networks", ICLR 2018.
    """
    bound = SpectralNormBound(max_norm)
    if not layer.built:
        raise ValueError(
            f"apply_spectral_norm needs a built layer; {layer.name!r} is not "
            "built. Build it (or call it once) first."
        )
    bounded = []
    for sub in layer._flatten_layers(include_self=True):
        kernel = getattr(sub, "kernel", None)
        if not isinstance(kernel, keras.Variable) or not kernel.trainable:
            continue
        kernel.constraint = bound
        if hasattr(sub, "kernel_constraint"):
            sub.kernel_constraint = bound
        kernel.assign(bound(kernel))
        bounded.append(kernel.path)
    if not bounded:
        raise ValueError(
            f"The layer {layer.name!r} has no trainable kernel variable to "
            "bound."
        )
    return bounded
