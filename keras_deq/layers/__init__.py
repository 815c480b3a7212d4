"""Keras layers: the DEQ layer and the pieces DEQ blocks are built from."""

from keras_deq.layers.deq_layer import DEQLayer

__all__ = ["DEQLayer"]
