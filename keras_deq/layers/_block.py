"""A DEQ block and its state: what the block must be, the first iterate,
one evaluation."""

import inspect

import keras


def takes_one_tensor(block):
    """Whether `block.call` takes one tensor (else it takes `z, x`)."""
    params = inspect.signature(block.call).parameters.values()
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.name not in ("training", "mask")
    ]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    if len(positional) == 2 or (len(positional) < 2 and variadic):
        return False
    if len(positional) == 1:
        return True
    raise TypeError(
        "The block's `call` must take the state and the input, "
        "`call(z, x, training=None)`, or one tensor, `call(inputs)` (it is "
        "then applied to z + x). Received: a block of type "
        f"{type(block).__name__} with call{inspect.signature(block.call)}"
    )


def keras_tensors(specs):
    return keras.tree.map_structure(
        lambda spec: keras.KerasTensor(spec.shape, dtype=spec.dtype), specs
    )


def paths(nest):
    return [
        "/".join(map(str, p)) for p, _ in keras.tree.flatten_with_path(nest)
    ]


def shape(tensor):
    """The static shape, `None` for unknown sizes."""
    return tuple(None if d is None else int(d) for d in tensor.shape)


def compatible(a, b) -> bool:
    """Whether two static shapes can be the same (`None` fits any size)."""
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b, strict=True)
    )


def dtype_name(tensor) -> str:
    return keras.backend.standardize_dtype(tensor.dtype)


def same_structure(a, b) -> bool:
    try:
        keras.tree.assert_same_structure(a, b)
    except (ValueError, TypeError):
        return False
    return True


def describe(nest):
    return str(keras.tree.map_structure(lambda t: f"<{list(shape(t))}>", nest))


def check_block_output(z0, z1):
    if not same_structure(z0, z1):
        raise ValueError(
            "The block must return a state with the structure of its "
            f"input state. State: {describe(z0)}. Block output: "
            f"{describe(z1)}."
        )
    for path, a, b in zip(
        paths(z0), keras.tree.flatten(z0), keras.tree.flatten(z1), strict=True
    ):
        where = f" at {path}" if path else ""
        if dtype_name(a) != dtype_name(b):
            # A block that rounds the state to a narrower dtype limits
            # the solve to that precision; a wider one changes it.
            raise ValueError(
                f"The block must return a state with the dtype of its "
                f"input state{where}. State dtype: "
                f"{dtype_name(a)}, block output dtype: "
                f"{dtype_name(b)}. Cast the block's output "
                "to the state's dtype (the block's compute dtype)."
            )
        if not compatible(shape(a)[1:], shape(b)[1:]):
            raise ValueError(
                f"The block must return a state with the shape of its "
                f"input state{where}. State shape: {shape(a)}, block "
                f"output shape: {shape(b)}."
            )


def check_no_batch_statistics(block):
    for layer in block._flatten_layers(include_self=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            raise ValueError(
                f"The block contains BatchNormalization ({layer.name!r}), "
                "which a DEQ cannot use: it would update its moving "
                "statistics at every solver iteration, mostly at states "
                "far from the equilibrium, and its batch statistics "
                "couple the samples that the solver treats as "
                "independent. Use keras.layers.GroupNormalization or "
                "keras.layers.LayerNormalization, which normalize each "
                "sample on its own."
            )


def check_sample_axes(sample_axes, state_spec):
    if sample_axes == 1:
        return
    shapes = [tuple(s.shape) for s in keras.tree.flatten(state_spec)]
    leading = {shape[:sample_axes] for shape in shapes}
    if any(len(shape) <= sample_axes for shape in shapes) or (len(leading) > 1):
        raise ValueError(
            f"`sample_axes`={sample_axes} needs every state tensor "
            f"to have more than {sample_axes} axes and the same "
            f"first {sample_axes}. State shapes: {shapes}"
        )


class BlockState:
    """The block's side of `DEQLayer`: the first iterate, a given one
    checked, one evaluation f(z, x), and the losses the block added."""

    def _initial_state(self, x):
        if hasattr(self.block, "initial_state"):
            z0 = self.block.initial_state(x)
        else:
            z0 = keras.tree.map_structure(keras.ops.zeros_like, x)
        dtype = self.block.compute_dtype
        return keras.tree.map_structure(lambda t: keras.ops.cast(t, dtype), z0)

    def _given_state(self, initial_state, x):
        """`initial_state`, checked against the state and cast, no gradient."""
        if not same_structure(self._state_spec, initial_state):
            raise ValueError(
                "`initial_state` must have the structure of the state. "
                f"State: {describe(self._state_spec)}. Received: "
                f"initial_state={describe(initial_state)}."
            )
        batch = shape(keras.tree.flatten(x)[0])[0]
        dtype = self.block.compute_dtype
        given = []
        for path, spec, t in zip(
            paths(self._state_spec),
            keras.tree.flatten(self._state_spec),
            keras.tree.flatten(initial_state),
            strict=True,
        ):
            t = keras.ops.convert_to_tensor(t)
            expected = (batch, *shape(spec)[1:])
            if not compatible(shape(t), expected):
                where = f" at {path}" if path else ""
                raise ValueError(
                    f"`initial_state`{where} must have the state's shape "
                    f"{expected} (batch first). Received "
                    f"shape {shape(t)}."
                )
            given.append(keras.ops.stop_gradient(keras.ops.cast(t, dtype)))
        return keras.tree.pack_sequence_as(self._state_spec, given)

    def _apply_block(self, z, x, training):
        if not self._injected:
            return self.block(z, x, training=training)
        same = same_structure(z, x) and all(
            compatible(shape(a), shape(b))
            for a, b in zip(
                keras.tree.flatten(z), keras.tree.flatten(x), strict=True
            )
        )
        if not same:
            raise ValueError(
                f"The block {self.block.name!r} takes one tensor, so it is "
                "applied to z + x, which needs a state with the structure "
                "and shapes of the input. State: "
                f"{describe(z)}, input: "
                f"{describe(x)}."
            )
        # The input joins the state in the state's dtype, as a Keras layer
        # casts its inputs to its compute dtype: an integer input, or a
        # float16 one from a mixed-precision DEQLayer around a float32 block.
        injected = keras.tree.map_structure(
            lambda a, b: a + keras.ops.cast(b, a.dtype), z, x
        )
        return self.block(injected, training=training)

    def _take_block_losses(self):
        """The losses the block's layers added in their last call."""
        losses = [
            loss
            for layer in self.block._flatten_layers(include_self=True)
            for loss in layer._get_own_losses()
        ]
        self.block._clear_losses()
        return losses
