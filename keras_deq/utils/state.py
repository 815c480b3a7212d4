"""Flattening a nest of per-sample state tensors into one `[N, d]` tensor."""

import tensorflow as tf


class StateFlattener:
    """Maps a state nest to `[B, d]` and back, for one batch of states.

    The solvers work on `[B, d]`; a DEQ state may be a list, tuple or dict of
    tensors of different shapes (an MDEQ's resolutions). Shapes are read with
    `tf.shape`, so batch size and other dimensions may be dynamic.

    Args:
        template: a nest of tensors with a leading batch dimension; its
            structure, per-sample shapes and dtypes are what `unflatten`
            returns.
        dtype: the dtype of the flat tensor (the solver's).
        sample_axes: how many leading axes index separate rows of the flat
            tensor. With 2, a `[B, T, D]` state becomes `[B·T, D]` (every
            leaf must then share its first two dimensions). Defaults to 1.
    """

    def __init__(self, template, dtype: tf.DType, sample_axes: int = 1):
        self.structure = template
        leaves = tf.nest.flatten(template)
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.shapes = [tf.shape(leaf) for leaf in leaves]
        self.static_shapes = [leaf.shape for leaf in leaves]
        self.sample_axes = sample_axes
        self.sizes = [
            tf.reduce_prod(shape[sample_axes:]) for shape in self.shapes
        ]
        self.dtype = dtype

    def flatten(self, nest) -> tf.Tensor:
        leaves = tf.nest.flatten(nest)
        if self.sample_axes == 1:
            shapes = [[tf.shape(leaf)[0], -1] for leaf in leaves]
        else:
            shapes = [[-1, size] for size in self.sizes]
        flat = [
            tf.cast(tf.reshape(leaf, shape), self.dtype)
            for leaf, shape in zip(leaves, shapes, strict=True)
        ]
        return flat[0] if len(flat) == 1 else tf.concat(flat, axis=-1)

    def unflatten(self, flat: tf.Tensor):
        parts = (
            [flat] if len(self.sizes) == 1 else tf.split(flat, self.sizes, -1)
        )
        leaves = []
        for part, shape, static, dtype in zip(
            parts, self.shapes, self.static_shapes, self.dtypes, strict=True
        ):
            if self.sample_axes == 1:
                shape = tf.concat([tf.shape(part)[:1], shape[1:]], 0)
            leaf = tf.ensure_shape(
                tf.reshape(part, shape), [None] + static[1:].as_list()
            )
            leaves.append(tf.cast(leaf, dtype))
        return tf.nest.pack_sequence_as(self.structure, leaves)
