"""The Jacobian penalty of a DEQ: its settings, its gate and its metric."""

from collections.abc import Callable

import keras
from keras import ops

from keras_deq import backend as _backend
from keras_deq import jacobian
from keras_deq.backend import Tensor
from keras_deq.utils import validation
from keras_deq.utils.metrics import MeasuredMean
from keras_deq.utils.seeds import SavedSeedState


@keras.saving.register_keras_serializable(package="keras_deq")
class JacobianPenalty(SavedSeedState, keras.layers.Layer):
    """γ · mean ‖J_f(z*)‖_F² / d, computed with probability p per step.

    Each call of `loss` draws τ ~ Bernoulli(p); when τ = 1 and γ > 0 it
    returns γ times the batch mean of the Hutchinson estimate of
    ‖J_f(z*)‖_F² / d (`keras_deq.jacobian.frobenius_estimate` with
    `num_samples` probes), else 0 without running the estimator. The value
    also goes into the metric `metric` (a mean over the calls whose gate
    was on; NaN when none was).

    γ and p are the non-trainable float32 variables `weight` and `freq`,
    created with the layer: callbacks assign them during `fit` without
    retracing, checkpoints save them, and `get_config` reports their
    current values. Checkpoints also save the state of the gate's and
    probes' draws, so a resumed run draws what an uninterrupted one would.
    A `DEQLayer` owns one (`layer.jacobian_penalty`) and
    calls `loss` once per training call, at z*.

    Args:
        weight: γ >= 0. Defaults to `0.0` (off).
        freq: p in [0, 1]. Defaults to `1.0`.
        num_samples: Gaussian probes M. Defaults to `1`.
        seed: int seed of the gate and the probes. Defaults to `None`
            (drawn from Keras' global seed).
        metric_name: name of the metric. Defaults to `None`
            (`"{name}_value"`).
        **kwargs: base layer arguments (`name`).

    Examples:

        A `DEQLayer` builds its own (`layer.jacobian_penalty`); callbacks steer
        its γ and p during `fit`:

        ```python
        layer = keras_deq.DEQLayer(block, jac_weight=1.0, jac_freq=0.5)
        layer.jacobian_penalty.weight.assign(2.0)  # what JacobianSchedule does
        ```

    Reference:
        Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
        Regularization", ICML 2021, eq. 3–4.
    """

    def __init__(
        self,
        weight: float = 0.0,
        freq: float = 1.0,
        num_samples: int = 1,
        seed: int | None = None,
        metric_name: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        weight = validation.check_nonnegative("jac_weight", weight)
        freq = validation.check_range("jac_freq", freq, 0, 1)
        self.num_samples = validation.check_int("jac_samples", num_samples, 1)
        if seed is not None:
            validation.check_int("seed", seed, 0)
        self.seed = seed
        self.metric_name = metric_name
        self.weight = self._variable("jac_weight", weight)
        self.freq = self._variable("jac_freq", freq)
        self.seed_generator = keras.random.SeedGenerator(
            seed, name="jac_seed_generator"
        )
        self.metric = MeasuredMean(name=metric_name or f"{self.name}_value")
        # Set by a DEQLayer that logs `metric` through its own report, and
        # by callbacks that may turn the penalty on during `fit`.
        self.reported_by_owner = False
        self.steered = False
        self.built = True

    @property
    def metrics(self):
        if self.reported_by_owner or not _backend.LAYER_METRICS:
            return []
        return [self.metric]

    def may_be_on(self) -> bool:
        """Whether a training step can compute the penalty.

        True while γ > 0 and p > 0, or once a callback steers γ and p
        (`steered`, set by `keras_deq.callbacks.JacobianSchedule` and
        `AdaptiveJacobian`). Read when a training step is traced: the
        penalty's metric is logged by steps that can compute it.
        """
        if self.steered:
            return True
        # The variables' current values, also while a step is traced.
        weight, freq = map(_backend.current_value, (self.weight, self.freq))
        return weight > 0 and freq > 0

    def _variable(self, name, value):
        return self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(value),
            dtype="float32",
            trainable=False,
            autocast=False,
            name=name,
        )

    def loss(self, f: Callable[[Tensor], Tensor], z_star: Tensor) -> Tensor:
        """The penalty at `z_star` for this step (0 when the gate is off).

        Args:
            f: maps `[B, d]` to `[B, d]`, each sample on its own.
            z_star: `[B, d]` equilibrium, without gradient.

        Returns:
            A scalar in the dtype of `z_star`, differentiable with respect
            to the variables of f.
        """
        dtype = z_star.dtype
        gamma = ops.cast(self.weight, dtype)
        draw = keras.random.uniform(
            (), dtype="float32", seed=self.seed_generator
        )
        gate = ops.logical_and(draw < self.freq, gamma > 0)
        # The probes' seed is drawn here, outside the branch: a generator
        # advanced inside a `cond` would leave its new state in the branch
        # (on JAX, a value of the branch's trace).
        probe_seed = keras.random.randint(
            (), 0, 2**31 - 1, dtype="int32", seed=self.seed_generator
        )

        def penalty():
            estimate = jacobian.frobenius_estimate(
                f, z_star, self.num_samples, seed=probe_seed
            )
            # An empty batch adds 0, not the NaN of an empty mean.
            size = ops.cast(ops.size(estimate), dtype)
            return gamma * ops.divide_no_nan(ops.sum(estimate), size)

        value = ops.cond(gate, penalty, lambda: ops.zeros((), dtype))
        if _backend.LAYER_METRICS:
            self.metric.update_state(
                ops.cast(value, "float32"),
                sample_weight=ops.cast(gate, "float32"),
            )
        return value

    def settings(self) -> dict:
        """γ and p as they are now, and M: `DEQLayer`'s `jac_*` arguments."""
        return {
            "jac_weight": float(keras.ops.convert_to_numpy(self.weight)),
            "jac_freq": float(keras.ops.convert_to_numpy(self.freq)),
            "jac_samples": self.num_samples,
        }

    def get_config(self):
        settings = self.settings()
        return {
            **super().get_config(),
            "weight": settings["jac_weight"],
            "freq": settings["jac_freq"],
            "num_samples": self.num_samples,
            "seed": self.seed,
            "metric_name": self.metric_name,
        }


def fixed_point_correction(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    z_star: Tensor,
    num_states: int = 3,
    decay: float = 0.8,
) -> Tensor:
    """How far one step of f from each early iterate lands from z*.

    The iterates are the plain iteration's from the first one,
    z₀, z₁ = f(z₀), …, z_{N−1} (N = `num_states`), held constant; from each
    one step ẑ_k = f(z_k) is taken with its gradient, and the loss is

        Σ_k w_k · mean over the batch of ‖ẑ_k − z*‖² / ‖z*‖²,

    with weights w_k ∝ `decay`^(N−1−k) that sum to 1 (the latest iterate
    weighs most), i.e. the error of the iterates 1…N of the solve from
    z₀. The gradient flows through ẑ_k and through `z_star`, so pass the
    equilibrium with its gradient (a `DEQLayer` passes its output): held
    constant, z* is a target that moves away as f changes, and the loss
    would teach f to jump further rather than to converge sooner (only the
    normalising ‖z*‖² is held constant). Minimising it teaches f to reach
    its fixed point in few steps from where solves start: what the
    fixed-point correction of Bai et al. (2022) does with the task loss on
    the solver's states, here with the distance to z* instead, so that it
    needs no labels and works as an `add_loss` of any DEQ.

    Args:
        f: maps `[B, d]` to `[B, d]`, each sample on its own.
        z0: `[B, d]` first iterate.
        z_star: `[B, d]` equilibrium, with its gradient.
        num_states: N >= 1.
        decay: in (0, 1].

    Returns:
        A scalar in the dtype of `z_star`, differentiable with respect to
        the variables of f.

    Examples:

        For f(z) = z/2 + 1 (z* = 2) from z₀ = 0, one step lands at 1:
        (1 − 2)² / 2² = 0.25.

        >>> f = lambda z: 0.5 * z + 1.0
        >>> z_star = tf.constant([[2.0]])
        >>> z0 = tf.zeros([1, 1])
        >>> float(fixed_point_correction(f, z0, z_star, num_states=1))
        0.25

    Reference:
        Bai, Ramachandran, Lee, Kolter & Koltun, "Deep Equilibrium Optical
        Flow Estimation", CVPR 2022, section 3.3.
    """
    validation.check_int("correction_states", num_states, 1)
    validation.check_range("correction_decay", decay, 0, 1, low_open=True)
    dtype = z_star.dtype
    scale = ops.stop_gradient(ops.sum(ops.square(z_star), axis=-1))
    scale += 1e-12
    weights = [decay ** (num_states - 1 - k) for k in range(num_states)]
    total = sum(weights)
    z = ops.stop_gradient(ops.cast(z0, dtype))
    value = ops.zeros((), dtype)
    for k, weight in enumerate(weights):
        step = f(z)
        distance = ops.sum(ops.square(step - z_star), axis=-1) / scale
        # An empty batch adds 0, not the NaN of an empty mean.
        size = ops.cast(ops.size(distance), dtype)
        mean = ops.divide_no_nan(ops.sum(distance), size)
        value += (weight / total) * mean
        if k + 1 < num_states:
            z = ops.stop_gradient(step)
    return value
