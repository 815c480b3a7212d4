"""Keras layers: the DEQ layer and the pieces DEQ blocks are built from."""

from keras_deq.layers.deq_layer import DEQLayer
from keras_deq.layers.group_norm import GroupNorm
from keras_deq.layers.noise import PerSolveNoise
from keras_deq.layers.spectral_norm import SpectralNormBound
from keras_deq.layers.spectral_norm import apply_spectral_norm
from keras_deq.layers.variational_dropout import VariationalDropout
from keras_deq.layers.weight_normalization import WeightNormalization

__all__ = [
    "DEQLayer",
    "GroupNorm",
    "PerSolveNoise",
    "SpectralNormBound",
    "VariationalDropout",
    "WeightNormalization",
    "apply_spectral_norm",
]
