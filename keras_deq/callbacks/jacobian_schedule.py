"""A linear ramp of the Jacobian penalty's γ (and p) over training."""

from collections.abc import Sequence

from keras_deq.callbacks.base import _DEQCallback
from keras_deq.callbacks.base import _ramp
from keras_deq.callbacks.base import _steer
from keras_deq.callbacks.base import _value
from keras_deq.utils import validation


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
