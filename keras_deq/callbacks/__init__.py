"""Callbacks that steer and watch Jacobian regularization during `fit`.

They act on the `DEQLayer`s of the model being trained (all of them, or
those named in `layers`), writing the non-trainable variables
`layer.jac_weight` (γ) and `layer.jac_freq` (p), so the compiled training
step is not retraced. Each adds its values to the epoch logs under
`{layer name}_jac_weight` and so on: they appear in the progress bar and in
`History`, and in TensorBoard when the `keras.callbacks.TensorBoard`
callback comes after them in the `callbacks` list.
"""

from keras_deq.callbacks.adaptive_jacobian import AdaptiveJacobian
from keras_deq.callbacks.base import find_deq_layers
from keras_deq.callbacks.jacobian_schedule import JacobianSchedule
from keras_deq.callbacks.spectral_radius_monitor import SpectralRadiusMonitor
from keras_deq.callbacks.unrolled_pretraining import UnrolledPretraining

__all__ = [
    "AdaptiveJacobian",
    "JacobianSchedule",
    "SpectralRadiusMonitor",
    "UnrolledPretraining",
    "find_deq_layers",
]
