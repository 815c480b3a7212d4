"""Flattening a nest of per-sample state tensors into one `[B, d]` tensor."""

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
    """

    def __init__(self, template, dtype: tf.DType):
        self.structure = template
        leaves = tf.nest.flatten(template)
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.shapes = [tf.shape(leaf) for leaf in leaves]
        self.static_shapes = [leaf.shape for leaf in leaves]
        self.sizes = [tf.reduce_prod(shape[1:]) for shape in self.shapes]
        self.dtype = dtype

    def flatten(self, nest) -> tf.Tensor:
        leaves = tf.nest.flatten(nest)
        flat = [
            tf.cast(tf.reshape(leaf, [tf.shape(leaf)[0], -1]), self.dtype)
            for leaf in leaves
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
            leaf = tf.reshape(
                part, tf.concat([tf.shape(part)[:1], shape[1:]], 0)
            )
            leaf = tf.ensure_shape(leaf, [None] + static[1:].as_list())
            leaves.append(tf.cast(leaf, dtype))
        return tf.nest.pack_sequence_as(self.structure, leaves)
