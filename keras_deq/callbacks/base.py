"""What the keras_deq callbacks share: finding DEQ layers, steering them."""

from collections.abc import Sequence

import keras

from keras_deq.layers.deq_layer import DEQLayer


class _DEQCallback(keras.callbacks.Callback):
    """Finds the model's DEQLayers (or the named ones) when training starts."""

    def __init__(self, layers: Sequence[str] | None = None):
        super().__init__()
        if layers is not None:
            if isinstance(layers, str) or not all(
                isinstance(n, str) for n in layers
            ):
                raise TypeError(
                    "`layers` must be a list of DEQLayer names or None. "
                    f"Received: layers={layers!r}"
                )
            layers = list(layers)
        self.layer_names = layers
        self._targets = None

    def targets(self) -> list[DEQLayer]:
        if self._targets is None:
            self._targets = find_deq_layers(self.model, self.layer_names)
        return self._targets

    def on_train_begin(self, logs=None):
        self._targets = None
        for layer in self.targets():
            if not layer.built:
                raise ValueError(
                    f"DEQLayer {layer.name!r} is not built. Build the model "
                    "(call it on data or give it an Input) before `fit`."
                )


def find_deq_layers(
    model: keras.layers.Layer, names: Sequence[str] | None = None
) -> list[DEQLayer]:
    """The DEQLayers inside `model` (at any depth), or those in `names`.

    Examples:

        >>> model = keras.Sequential([
        ...     keras.Input((4,)),
        ...     keras_deq.DEQLayer(keras.layers.Dense(4), name="deq_a"),
        ...     keras.layers.Dense(2),
        ... ])
        >>> [layer.name for layer in find_deq_layers(model)]
        ['deq_a']
    """
    found = [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, DEQLayer)
    ]
    if not found:
        raise ValueError(
            f"The model {model.name!r} contains no keras_deq.DEQLayer."
        )
    seen = [layer.name for layer in found]
    shared = sorted({name for name in seen if seen.count(name) > 1})
    if shared:
        # Their statistics and γ logs would share names too, and `fit`
        # keeps one value per name: one layer would go unseen.
        raise ValueError(
            f"The model {model.name!r} has several DEQLayers named "
            f"{shared}; statistics are logged by layer name, so one of "
            "them would be silently dropped. Give each DEQLayer its own "
            "name (`name=` of DEQLayer, `deq_name=` of the keras_deq "
            f"models). DEQLayer names: {seen}."
        )
    if names is None:
        return found
    by_name = {layer.name: layer for layer in found}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ValueError(
            f"No DEQLayer named {missing} in the model. Its DEQLayers are "
            f"{sorted(by_name)}."
        )
    return [by_name[name] for name in names]


def _steer(model: keras.Model, layers: Sequence[DEQLayer]) -> None:
    """Marks the layers' penalties as steered by a callback.

    From then on their training steps log the penalty's metric, also while
    γ is still 0 (a schedule that starts there); a train function traced
    before, without it, is traced again.
    """
    newly = [layer for layer in layers if not layer.jacobian_penalty.steered]
    for layer in newly:
        layer.jacobian_penalty.steered = True
    if newly and model.train_function is not None:
        model.make_train_function(force=True)


def _value(variable) -> float:
    return float(keras.ops.convert_to_numpy(variable))


def _ramp(start: float, end: float, progress: float) -> float:
    return start + (end - start) * min(max(progress, 0.0), 1.0)
