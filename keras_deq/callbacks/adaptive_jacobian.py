"""γ raised while the forward NFE is above a target, lowered below it."""

import math
from collections.abc import Sequence

from keras_deq import backend as _backend
from keras_deq.callbacks.base import _DEQCallback
from keras_deq.callbacks.base import _steer
from keras_deq.callbacks.base import _value
from keras_deq.utils import validation


class AdaptiveJacobian(_DEQCallback):
    """Adapts γ so that the forward solve needs about `target_nfe` steps.

    The paper fixes γ by hand (its §5.5 and B.3 name an adaptive γ as future
    work). This callback watches each DEQLayer's forward NFE during
    training, averaged over the batches since its last update, and then
    multiplies γ by `factor` if that average is above `target_nfe`, divides
    it by `factor` if it is below `target_nfe − margin`, and otherwise
    leaves it. A raise stops at `max_weight` (from γ = 0 it sets
    `min_weight`), a cut stops at `min_weight`, and γ never moves against
    the NFE: below the target a γ under `min_weight` (e.g. 0, the penalty
    off) stays where it is. Updates come at the end of every
    epoch, or every `update_every` batches. Each layer is steered by its own
    NFE. The penalty only acts on the steps its gate p = `layer.jac_freq`
    lets through, so p must be > 0.

    Where the NFE comes from: by default, the layer's own `forward_nfe`
    over the training steps. Given `probe` (a batch of the model's
    inputs), a training-mode call on it made by the callback at each
    update instead. On JAX a layer records no statistics inside `fit`'s
    step (Keras' trainer maps a layer's weights there, not its metrics:
    keras-team/keras#21639), so there `probe` is required.

    Args:
        target_nfe: forward NFE to aim for, >= 1.
        factor: multiplicative step of γ, > 1. Defaults to `1.5`.
        margin: how far below the target the NFE must be before γ is
            lowered, >= 0. Defaults to `1.0`.
        min_weight: smallest γ, > 0. Defaults to `1e-3`.
        max_weight: largest γ. Defaults to `10.0`.
        update_every: batches between updates. Defaults to `None` (once per
            epoch).
        layers: names of the DEQLayers to steer. Defaults to all of them.
        probe: inputs to measure the NFE on, with a training-mode call at
            each update. Defaults to `None` (the training steps' NFE;
            required on JAX).

    Examples:

        ```python
        model.fit(x, y, epochs=20, callbacks=[
            keras_deq.callbacks.AdaptiveJacobian(target_nfe=6)
        ])
        ```
    """

    def __init__(
        self,
        target_nfe: float,
        *,
        factor: float = 1.5,
        margin: float = 1.0,
        min_weight: float = 1e-3,
        max_weight: float = 10.0,
        update_every: int | None = None,
        layers: Sequence[str] | None = None,
        probe=None,
    ):
        if probe is None and not _backend.LAYER_METRICS:
            raise ValueError(
                "AdaptiveJacobian steers γ by the forward NFE, and on the "
                f"{_backend.BACKEND!r} backend a DEQLayer cannot record it "
                "inside a training step (Keras' trainer maps only its "
                "weights there: keras-team/keras#21639). Pass `probe`, a "
                "batch of the model's inputs, to measure the NFE on at each "
                "update. Received: probe=None"
            )
        super().__init__(layers)
        self.probe = probe
        self.target_nfe = validation.check_range(
            "target_nfe", target_nfe, 1, math.inf
        )
        self.factor = validation.check_range(
            "factor", factor, 1, math.inf, low_open=True
        )
        self.margin = validation.check_nonnegative("margin", margin)
        self.min_weight = validation.check_positive("min_weight", min_weight)
        self.max_weight = validation.check_positive("max_weight", max_weight)
        if self.max_weight < self.min_weight:
            raise ValueError(
                "`max_weight` must be >= `min_weight`. Received: "
                f"min_weight={min_weight}, max_weight={max_weight}"
            )
        self.update_every = (
            None
            if update_every is None
            else validation.check_int("update_every", update_every, 1)
        )
        self._sums = {}
        self._before = {}
        self._batches = 0

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for layer in self.targets():
            if _value(layer.jac_freq) <= 0:
                raise ValueError(
                    f"AdaptiveJacobian cannot act on DEQLayer {layer.name!r}: "
                    "its jac_freq is 0, so the penalty is never computed. "
                    "Construct it with jac_freq > 0."
                )
        _steer(self.model, self.targets())
        self._reset()

    def _reset(self):
        self._sums = {layer.name: [0.0, 0.0] for layer in self.targets()}
        self._batches = 0

    @staticmethod
    def _read(layer):
        metric = layer.forward_nfe
        return _value(metric.total), _value(metric.count)

    def _begin(self):
        self._before = {
            layer.name: self._read(layer) for layer in self.targets()
        }

    def _end(self):
        for layer in self.targets():
            total, count = self._read(layer)
            total0, count0 = self._before.get(layer.name, (0.0, 0.0))
            if count < count0:  # the metric was reset in between
                total0 = count0 = 0.0
            sums = self._sums[layer.name]
            sums[0] += total - total0
            sums[1] += count - count0

    def on_train_batch_begin(self, batch, logs=None):
        if self.probe is None:
            self._begin()

    def on_train_batch_end(self, batch, logs=None):
        if self.probe is None:
            self._end()
        self._batches += 1
        if self.update_every and self._batches >= self.update_every:
            self._update()

    def _update(self):
        if self.probe is not None:
            self._begin()
            self.model(self.probe, training=True)
            self._end()
        for layer in self.targets():
            total, count = self._sums[layer.name]
            if count <= 0:
                continue
            nfe = total / count
            weight = _value(layer.jac_weight)
            if nfe > self.target_nfe:
                weight = min(
                    max(weight * self.factor, self.min_weight),
                    max(weight, self.max_weight),
                )
            elif nfe < self.target_nfe - self.margin:
                # Lowering never raises: a γ already under `min_weight`
                # (e.g. 0, the penalty off) stays where it is.
                weight = max(weight / self.factor, min(weight, self.min_weight))
            layer.jac_weight.assign(weight)
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_every is None:
            self._update()
        if logs is None:
            return
        for layer in self.targets():
            logs[f"{layer.name}_jac_weight"] = _value(layer.jac_weight)

    def get_config(self):
        return {
            "target_nfe": self.target_nfe,
            "factor": self.factor,
            "margin": self.margin,
            "min_weight": self.min_weight,
            "max_weight": self.max_weight,
            "update_every": self.update_every,
            "layers": self.layer_names,
        }
