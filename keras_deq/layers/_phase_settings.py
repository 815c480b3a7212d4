"""A DEQLayer's settings per phase: training overrides, test-time budget."""

import keras

from keras_deq import gradients
from keras_deq.utils import validation


class PhaseSettings:
    """`override_training` and `override_inference` of `DEQLayer`.

    The layer's own settings hold for both phases; these override them in
    training calls (a pretraining phase, random starts) or in calls outside
    training (the test-time budget), and stay out of `get_config`.
    """

    def override_training(
        self,
        *,
        gradient: str | None = None,
        max_iter: int | None = None,
        random_start: float | None = None,
    ) -> None:
        """Settings for training calls only; no arguments clears them.

        A training phase (e.g. `keras_deq.callbacks.UnrolledPretraining`)
        sets these: they apply to calls with `training=True` only, so test
        and predict functions keep the layer's own settings, and they are
        not part of `get_config`, so no checkpoint records them. They take
        effect in functions traced afterwards (rebuild the train function).

        Args:
            gradient: a gradient kind for training calls. Defaults to
                `None` (the layer's).
            max_iter: forward iterations (unrolled steps) for training
                calls. Defaults to `None` (the layer's).
            random_start: σ > 0: start each training solve from the
                default first iterate plus fresh N(0, σ²) noise, so that
                the model learns to reach its fixed point from anywhere
                (Anil et al., NeurIPS 2022). Defaults to `None`.
        """
        overrides = {}
        if gradient is not None:
            overrides["gradient"] = gradients.check("gradient", gradient)
        if max_iter is not None:
            overrides["max_iter"] = validation.check_int(
                "max_iter", max_iter, 1
            )
        if random_start is not None:
            overrides["random_start"] = (
                validation.check_positive("random_start", random_start),
                self._start_seed_generator,
            )
        self._training_overrides = overrides

    @property
    def training_overrides(self) -> dict:
        """The settings `override_training` set (read-only copy)."""
        return dict(self._training_overrides)

    def override_inference(
        self,
        *,
        max_iter: int | None = None,
        tol: float | None = None,
        random_start: float | None = None,
        seed: int = 0,
    ) -> None:
        """The test-time budget: settings for calls outside training.

        An equilibrium model's output is its fixed point, so its solve can
        be given more iterations (or a tighter tolerance) at test time
        than in training, without rebuilding the model. These apply to
        every call with `training` false (`predict`, `evaluate`,
        validation, direct calls, `solve`, cached decoding) and not to
        training calls; they are not part of `get_config`. No arguments
        clears them.

        Eager calls take them at once. A `predict`, `evaluate` or `export`
        function traced before keeps the budget it was traced with: use
        `keras_deq.diagnostics.override_inference(model, ...)` (or the
        keras_deq models' `override_inference`), which also drops the
        model's traced functions. `model.export` writes the budget set
        when it runs.

        Args:
            max_iter: most block evaluations of the forward solve (plain
                steps with `gradient="unrolled"`). Defaults to `None` (the
                layer's `max_iter`).
            tol: the forward tolerance. Defaults to `None` (the layer's
                `tol`).
            random_start: σ > 0: start each solve from the default first
                iterate plus N(0, σ²) noise, to test path independence
                (an equilibrium model reaches the same fixed point from
                any start; `keras_deq.diagnostics.equilibrium_report`).
                A warm start given to the call is used as it is. Defaults
                to `None` (the default first iterate).
            seed: int seed of the `random_start` noise: one draw per
                batch shape, the same in every traced call. Defaults to
                `0`.
        """
        overrides = {}
        if max_iter is not None:
            overrides["max_iter"] = validation.check_int(
                "max_iter", max_iter, 1
            )
        if tol is not None:
            overrides["tol"] = validation.check_positive("tol", tol)
        if random_start is not None:
            overrides["random_start"] = (
                validation.check_positive("random_start", random_start),
                validation.check_int("seed", seed, 0),
            )
        self._inference_overrides = overrides

    @property
    def inference_overrides(self) -> dict:
        """The settings `override_inference` set (read-only copy)."""
        return dict(self._inference_overrides)

    def _random_start(self, training):
        """`(σ, seed)` of the first iterate's noise in a call, or `None`."""
        if not training:
            return self._inference_overrides.get("random_start")
        if "random_start" in self._training_overrides:
            return self._training_overrides["random_start"]
        if self.random_start is None:
            return None
        return (self.random_start, self._start_seed_generator)

    def _budget(self, training):
        """`(max_iter, tol)` of a call, overrides applied."""
        overrides = (
            self._training_overrides if training else self._inference_overrides
        )
        return (
            overrides.get("max_iter", self.max_iter),
            overrides.get("tol", self.tol),
        )


def perturbed(state, stddev, seed):
    """`state` plus N(0, stddev²) noise, no gradient.

    `seed` is an int (the same draw in every traced call) or a
    `SeedGenerator` (a new draw at every call).
    """
    leaves = keras.tree.flatten(state)
    fixed = not isinstance(seed, keras.random.SeedGenerator)
    noisy = [
        leaf
        + keras.ops.cast(
            keras.random.normal(
                keras.ops.shape(leaf),
                stddev=stddev,
                seed=seed + i if fixed else seed,
            ),
            leaf.dtype,
        )
        for i, leaf in enumerate(leaves)
    ]
    return keras.tree.pack_sequence_as(state, noisy)
