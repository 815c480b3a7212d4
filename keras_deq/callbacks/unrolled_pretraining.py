"""The first training steps with unrolled gradients, as the MDEQ does."""

from collections.abc import Sequence

from keras_deq.callbacks.base import _DEQCallback
from keras_deq.callbacks.base import _value
from keras_deq.utils import validation


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
