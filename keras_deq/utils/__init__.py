"""Internal helpers: state flattening."""

from keras_deq.utils.state import StateFlattener

__all__ = ["StateFlattener"]
