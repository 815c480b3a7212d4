"""Flattening a nest of per-sample state tensors into one `[N, d]` tensor."""

import math

import keras

from keras_deq import backend as _backend


class StateFlattener:
    """Maps a state nest to `[B, d]` and back, for one batch of states.

    The solvers work on `[B, d]`; a DEQ state may be a list, tuple or dict of
    tensors of different shapes (an MDEQ's resolutions). Shapes are read with
    `keras.ops.shape`, so batch size and other dimensions may be dynamic
    where the backend has dynamic shapes.

    Args:
        template: a nest of tensors with a leading batch dimension; its
            structure, per-sample shapes and dtypes are what `unflatten`
            returns.
        dtype: the dtype of the flat tensor (the solver's).
        sample_axes: how many leading axes index separate rows of the flat
            tensor. With 2, a `[B, T, D]` state becomes `[B·T, D]` (every
            leaf must then share its first two dimensions). Defaults to 1.
    """

    def __init__(self, template, dtype, sample_axes: int = 1):
        self.structure = template
        leaves = keras.tree.flatten(template)
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.shapes = [keras.ops.shape(leaf) for leaf in leaves]
        self.static_shapes = [tuple(leaf.shape) for leaf in leaves]
        self.sample_axes = sample_axes
        self.sizes = [math.prod(shape[sample_axes:]) for shape in self.shapes]
        self.dtype = dtype

    def flatten(self, nest):
        leaves = keras.tree.flatten(nest)
        if self.sample_axes == 1:
            shapes = [(keras.ops.shape(leaf)[0], -1) for leaf in leaves]
        else:
            shapes = [(-1, size) for size in self.sizes]
        flat = [
            keras.ops.cast(keras.ops.reshape(leaf, shape), self.dtype)
            for leaf, shape in zip(leaves, shapes, strict=True)
        ]
        return flat[0] if len(flat) == 1 else keras.ops.concatenate(flat, -1)

    def unflatten(self, flat):
        if len(self.sizes) == 1:
            parts = [flat]
        else:
            parts, start = [], 0
            for size in self.sizes:
                parts.append(flat[:, start : start + size])
                start = start + size
        leaves = []
        for part, shape, static, dtype in zip(
            parts, self.shapes, self.static_shapes, self.dtypes, strict=True
        ):
            if self.sample_axes == 1:
                shape = (keras.ops.shape(part)[0], *shape[1:])
            leaf = _backend.fix_shape(
                keras.ops.reshape(part, shape), (None, *static[1:])
            )
            leaves.append(keras.ops.cast(leaf, dtype))
        return keras.tree.pack_sequence_as(self.structure, leaves)
