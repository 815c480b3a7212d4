"""Callbacks that steer and watch Jacobian regularization during `fit`.

They act on the `DEQLayer`s of the model being trained (all of them, or
those named in `layers`), writing the non-trainable variables
`layer.jac_weight` (γ) and `layer.jac_freq` (p), so the compiled training
step is not retraced. Each adds its values to the epoch logs under
`{layer name}_jac_weight` and so on: they appear in the progress bar and in
`History`, and in TensorBoard when the `keras.callbacks.TensorBoard`
callback comes after them in the `callbacks` list.
"""

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_deq.layers.deq_layer import DEQLayer
from keras_deq.utils import validation


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


class JacobianSchedule(_DEQCallback):
    """Ramps the Jacobian penalty strength γ (and optionally p) linearly.

    With `epochs=N`, at the start of epoch e (counting from 0, and from
    `initial_epoch` when resuming) γ = A + (B − A) · min(1, e / N); with
    `steps=N` the same with e the optimizer's step count, updated before
    every batch. From epoch `stop_epoch` on, γ = 0 and the penalty is off
    (the estimator is not computed). Table 4 of Bai et al. (2021), "1.6 →
    2.5" over training, is `JacobianSchedule(1.6, 2.5, epochs=num_epochs)`.

    Args:
        start: γ at the start of the ramp (A), >= 0.
        end: γ at its end (B), >= 0.
        steps: length of the ramp in optimizer steps.
        epochs: length of the ramp in epochs. Give exactly one of `steps`
            and `epochs`.
        freq_start: p at the start of the ramp, in [0, 1]. Defaults to
            `None` (p is left alone).
        freq_end: p at its end. Defaults to `freq_start`.
        stop_epoch: first epoch (0-based) with the penalty off. Defaults to
            `None` (never).
        layers: names of the DEQLayers to steer. Defaults to all of them.

    Examples:

        ```python
        model.fit(ds, epochs=23, callbacks=[
            keras_deq.callbacks.JacobianSchedule(1.6, 2.5, epochs=23)])
        ```
    """

    def __init__(
        self,
        start: float,
        end: float,
        *,
        steps: int | None = None,
        epochs: int | None = None,
        freq_start: float | None = None,
        freq_end: float | None = None,
        stop_epoch: int | None = None,
        layers: Sequence[str] | None = None,
    ):
        super().__init__(layers)
        self.start = validation.check_nonnegative("start", start)
        self.end = validation.check_nonnegative("end", end)
        if (steps is None) == (epochs is None):
            raise ValueError(
                "Give exactly one of `steps` and `epochs`, the length of the "
                f"ramp. Received: steps={steps!r}, epochs={epochs!r}"
            )
        self.steps = (
            None if steps is None else validation.check_int("steps", steps, 1)
        )
        self.epochs = (
            None
            if epochs is None
            else validation.check_int("epochs", epochs, 1)
        )
        if freq_start is None and freq_end is not None:
            raise ValueError(
                "`freq_end` needs `freq_start`. Received: freq_start=None, "
                f"freq_end={freq_end!r}"
            )
        if freq_start is not None:
            freq_start = validation.check_range("freq_start", freq_start, 0, 1)
            freq_end = validation.check_range(
                "freq_end", freq_start if freq_end is None else freq_end, 0, 1
            )
        self.freq_start = freq_start
        self.freq_end = freq_end
        self.stop_epoch = (
            None
            if stop_epoch is None
            else validation.check_int("stop_epoch", stop_epoch, 0)
        )
        self._epoch = 0

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        _steer(self.model, self.targets())

    def _apply(self, progress: float):
        stopped = self.stop_epoch is not None and self._epoch >= self.stop_epoch
        weight = 0.0 if stopped else _ramp(self.start, self.end, progress)
        for layer in self.targets():
            layer.jac_weight.assign(weight)
            if self.freq_start is not None:
                layer.jac_freq.assign(
                    _ramp(self.freq_start, self.freq_end, progress)
                )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self.epochs is not None:
            self._apply(epoch / self.epochs)

    def on_train_batch_begin(self, batch, logs=None):
        if self.steps is not None:
            # The optimizer's count survives BackupAndRestore and counts
            # every step when `steps_per_execution` > 1.
            step = _value(self.model.optimizer.iterations)
            self._apply(step / self.steps)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for layer in self.targets():
            logs[f"{layer.name}_jac_weight"] = _value(layer.jac_weight)
            logs[f"{layer.name}_jac_freq"] = _value(layer.jac_freq)

    def get_config(self):
        return {
            "start": self.start,
            "end": self.end,
            "steps": self.steps,
            "epochs": self.epochs,
            "freq_start": self.freq_start,
            "freq_end": self.freq_end,
            "stop_epoch": self.stop_epoch,
            "layers": self.layer_names,
        }


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
    ):
        super().__init__(layers)
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

    def on_train_batch_begin(self, batch, logs=None):
        self._before = {
            layer.name: self._read(layer) for layer in self.targets()
        }

    def on_train_batch_end(self, batch, logs=None):
        for layer in self.targets():
            total, count = self._read(layer)
            total0, count0 = self._before.get(layer.name, (0.0, 0.0))
            if count < count0:  # the metric was reset during the batch
                total0 = count0 = 0.0
            sums = self._sums[layer.name]
            sums[0] += total - total0
            sums[1] += count - count0
        self._batches += 1
        if self.update_every and self._batches >= self.update_every:
            self._update()

    def _update(self):
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


class UnrolledPretraining(_DEQCallback):
    """Trains the first `steps` steps with unrolled gradients, then implicit.

    The original MDEQ warms up its DEQs this way: for the first steps the
    DEQLayers run `iters` plain iterations of the block and backpropagate
    through them (`gradient="unrolled"`), which is stable from any
    initialisation; after that they switch back to the gradient, solver
    settings and `max_iter` they were built with. Each switch retraces the
    training step once. The switch is a training-only override
    (`DEQLayer.override_training`): validation, `evaluate`, `predict` and
    every saved config (`ModelCheckpoint`, `BackupAndRestore`) see the
    layers' own settings throughout. The switch follows the optimizer's
    step count, so a resumed run picks up in the right phase.

    Args:
        steps: number of unrolled steps.
        iters: unrolled iterations per step. Defaults to `None` (each
            layer's `max_iter`).
        layers: names of the DEQLayers to pretrain. Defaults to all.

    Examples:

        ```python
        # The first 500 steps backpropagate through 7 plain iterations.
        model.fit(x, y, epochs=20, callbacks=[
            keras_deq.callbacks.UnrolledPretraining(steps=500, iters=7)
        ])
        ```
    """

    def __init__(
        self,
        steps: int,
        iters: int | None = None,
        layers: Sequence[str] | None = None,
    ):
        super().__init__(layers)
        self.steps = validation.check_int("steps", steps, 0)
        self.iters = (
            None if iters is None else validation.check_int("iters", iters, 1)
        )
        self._pretraining = False

    def _switch(self, unrolled: bool, rebuild: bool = True):
        # Training-only overrides: test and predict functions, validation
        # during `fit` and every saved config keep the layers' own settings.
        for layer in self.targets():
            if unrolled:
                layer.override_training(
                    gradient="unrolled", max_iter=self.iters or layer.max_iter
                )
            else:
                layer.override_training()
        self._pretraining = unrolled
        if rebuild:  # `fit` calls model.train_function afresh every step
            self.model.make_train_function(force=True)
        else:  # rebuilt lazily by the next `fit`
            self.model.train_function = None

    def _step(self):
        return int(_value(self.model.optimizer.iterations))

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._pretraining = False
        if self._step() < self.steps:
            self._switch(True)

    def on_train_batch_begin(self, batch, logs=None):
        if self._pretraining and self._step() >= self.steps:
            self._switch(False)

    def on_train_end(self, logs=None):
        if self._pretraining:
            self._switch(False, rebuild=False)

    @property
    def pretraining(self) -> bool:
        """Whether the layers currently use unrolled gradients."""
        return self._pretraining


class SpectralRadiusMonitor(_DEQCallback):
    """Logs the mean ρ(J_f(z*)) on a held-out batch every few epochs.

    For each DEQLayer it solves for z* on `x` (a batch of *model* inputs)
    and runs `keras_deq.jacobian.spectral_radius` there, writing the mean
    over the batch to the epoch logs as `{layer name}_spectral_radius`.
    Place it before `keras.callbacks.TensorBoard` in the callbacks list so
    that TensorBoard records it (as `epoch_{layer name}_spectral_radius`).

    The model must be functional or `Sequential` (the callback needs each
    DEQLayer's input for `x`).

    Args:
        x: a batch of model inputs (array, tensor or nest of them).
        every: epochs between measurements. Defaults to `1`.
        num_iters: power-method iterations. Defaults to `50`.
        layers: names of the DEQLayers to watch. Defaults to all of them.

    Examples:

        ```python
        monitor = keras_deq.callbacks.SpectralRadiusMonitor(x_val[:64], every=5)
        history = model.fit(x, y, epochs=20, callbacks=[monitor])
        ```
    """

    def __init__(
        self,
        x,
        *,
        every: int = 1,
        num_iters: int = 50,
        layers: Sequence[str] | None = None,
    ):
        super().__init__(layers)
        self.x = tf.nest.map_structure(tf.convert_to_tensor, x)
        self.every = validation.check_int("every", every, 1)
        self.num_iters = validation.check_int("num_iters", num_iters, 2)
        self._functions = {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._functions = {}
        for layer in self.targets():
            try:
                layer_input = layer.input
                inputs = self.model.inputs
            except (AttributeError, ValueError):
                raise ValueError(
                    "SpectralRadiusMonitor needs a functional or Sequential "
                    f"model to find the input of DEQLayer {layer.name!r}; "
                    f"{self.model.name!r} does not expose it. Call "
                    "`layer.spectral_radius(layer_input)` yourself instead."
                ) from None
            encoder = keras.Model(inputs, layer_input)

            def measure(x, layer=layer, encoder=encoder):
                return layer.spectral_radius(
                    encoder(x, training=False), self.num_iters
                )

            self._functions[layer.name] = tf.function(measure)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or logs is None:
            return
        for layer in self.targets():
            radius = self._functions[layer.name](self.x)
            logs[f"{layer.name}_spectral_radius"] = float(
                np.mean(keras.ops.convert_to_numpy(radius))
            )


__all__ = [
    "AdaptiveJacobian",
    "JacobianSchedule",
    "SpectralRadiusMonitor",
    "UnrolledPretraining",
    "find_deq_layers",
]
