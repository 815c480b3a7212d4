"""The `DEQLayer` settings of a model: its defaults, the user's, the config."""

import inspect

import keras

from keras_deq import diagnostics
from keras_deq.layers.deq_layer import DEQLayer

# Set by the models themselves (the seed from the model's `seed`).
_OWN = ("seed",)


def option_names() -> list[str]:
    """The `DEQLayer` arguments a model passes through (all but `seed`)."""
    params = inspect.signature(DEQLayer.__init__).parameters.values()
    return [
        p.name
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.name not in _OWN
    ]


def take(defaults: dict, kwargs: dict) -> dict:
    """`defaults` updated with the `DEQLayer` arguments popped from `kwargs`.

    What stays in `kwargs` goes to `keras.Model`, which refuses what it
    does not know.
    """
    options = dict(defaults)
    for name in option_names():
        if name in kwargs:
            options[name] = kwargs.pop(name)
    return options


def current(deq: DEQLayer) -> dict:
    """The layer's settings as they are now (γ and p from their variables)."""
    config = deq.get_config()
    return {name: config[name] for name in option_names()}


_BASE = ("name", "trainable")


def check_base(model_name: str, kwargs: dict) -> None:
    """What is left of `kwargs` must be `keras.Model` arguments.

    Functional models drop unknown keyword arguments silently; a typo in a
    setting must not.
    """
    unknown = sorted(set(kwargs) - set(_BASE))
    if unknown:
        raise TypeError(
            f"{model_name} got unexpected keyword arguments {unknown}. It "
            f"takes its own arguments, any DEQLayer argument but `seed` "
            f"({', '.join(option_names())}) and {list(_BASE)} and `dtype`. "
            f"Received: {', '.join(f'{k}={kwargs[k]!r}' for k in unknown)}"
        )


def dtype_policy(dtype):
    """`dtype` (a name, a policy or its serialized config) as a policy."""
    return None if dtype is None else keras.dtype_policies.get(dtype)


def deq_layer(block, seed, dtype, deq_name, options) -> DEQLayer:
    """A model's DEQLayer over `block`, named by `deq_layer_name`."""
    return DEQLayer(
        block, seed=seed, dtype=dtype, name=deq_layer_name(deq_name), **options
    )


def deq_layer_name(deq_name: str | None) -> str:
    """`deq_name`, or "deq", "deq_1", ... as Keras names unnamed layers.

    Two models in one process (an ensemble, a teacher and a student) thus
    get DEQLayers of different names, and so statistics of different names:
    `fit` logs metrics by name and keeps one of two that share it.
    """
    if deq_name is not None:
        if not isinstance(deq_name, str) or not deq_name:
            raise ValueError(
                "`deq_name` must be a non-empty string or None. Received: "
                f"deq_name={deq_name!r}"
            )
        return deq_name
    uid = keras.backend.get_uid("deq")
    return "deq" if uid == 1 else f"deq_{uid - 1}"


class ConfigMixin:
    """`get_config` / `from_config` of a model over one `DEQLayer`.

    As keras-hub's backbones: the base config (name, trainable, dtype
    policy) and the layer's name and DEQ settings as they are now; each
    model adds its own arguments, one attribute each.
    """

    # The model's own traced functions, which keep the budget they were
    # traced with.
    _TRACED = ()

    @property
    def deq(self) -> DEQLayer:
        """The model's `DEQLayer`."""
        return self.get_layer(self._deq_name)

    def override_inference(
        self, *, max_iter: int | None = None, tol: float | None = None
    ) -> None:
        """The test-time budget of the model's DEQLayer.

        `keras_deq.diagnostics.override_inference` on this model: `predict`,
        `evaluate`, `generate` and `export` solve with `max_iter` and `tol`
        from now on, training with the layer's own settings. No arguments
        goes back to the trained budget.

        Args:
            max_iter: forward iterations at test time. Defaults to `None`
                (the layer's).
            tol: forward tolerance at test time. Defaults to `None` (the
                layer's).
        """
        diagnostics.override_inference(self, max_iter=max_iter, tol=tol)
        for name in self._TRACED:
            setattr(self, name, None)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "deq_name": self._deq_name,
            **current(self.deq),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)
