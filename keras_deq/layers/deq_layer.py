"""DEQLayer: the fixed point of a Keras layer, as a Keras layer."""

import contextlib
import functools
import inspect
import weakref

import keras
import tensorflow as tf
from tensorflow.python.eager import record

from keras_deq import gradients
from keras_deq import jacobian
from keras_deq import solvers
from keras_deq.layers.noise import noisy_layers
from keras_deq.regularizers import JacobianPenalty
from keras_deq.regularizers import fixed_point_correction
from keras_deq.solvers import _loop
from keras_deq.utils import validation
from keras_deq.utils.metrics import MeasuredMean
from keras_deq.utils.metrics import StatisticsReport
from keras_deq.utils.seeds import SavedSeedState
from keras_deq.utils.state import StateFlattener

# Eager calls run the forward solve through a `tf.function` (an eager
# `tf.while_loop` would run op by op), one per layer and solver settings, so
# that settings changed after a call take effect. Kept outside the layer so
# that SavedModel export does not try to save it; the functions reach the
# layer through a weak reference only, so the cache never keeps it alive.
_EAGER_SOLVES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@keras.saving.register_keras_serializable(package="keras_deq")
class DEQLayer(SavedSeedState, keras.layers.Layer):
    """Returns the equilibrium z* = block(z*, x) of a Keras layer.

    A deep equilibrium model replaces a stack of weight-tied layers by the
    fixed point of one of them. The forward pass finds z* with a root solver
    inside a `tf.while_loop`, each sample stopping on its own residual; the
    backward pass differentiates through z* by the implicit function theorem
    (or a phantom or unrolled approximation), so training memory does not grow
    with the number of solver iterations.

    The state can be a single tensor or a nest (list, tuple or dict) of
    tensors of different shapes; the solver sees it flattened per sample. The
    solver works in float32 (float64 when the block computes in float64),
    also under a mixed-precision policy; the output comes back in the block's
    compute dtype.

    The layer tracks Keras metrics, shown by `fit` and kept in `History`:
    `{name}_forward_nfe` and `{name}_forward_residual` (mean evaluations of
    the block per sample and mean relative residual of the forward solve),
    with implicit gradients `{name}_backward_nfe` and
    `{name}_backward_residual`, and `{name}_jac_loss`, the Jacobian penalty
    averaged over the training steps that computed it. The logs hold what
    a step can measure: `evaluate`, `predict` and validation the forward
    statistics only; training the backward ones with a gradient kind that
    solves a backward (not in an unrolled pretraining phase), and the
    penalty while γ > 0 and p > 0 or while a callback steers them (a
    `JacobianSchedule` from γ = 0 included). A statistic that could have
    been measured and was not reads NaN, never 0: the penalty while its
    gate stayed off. `model.summary()` counts γ and p (below) as the
    layer's 2 non-trainable parameters.

    Reading the residuals: a forward residual above `tol` means the solve
    stopped at `max_iter` (or blew up: a state whose norm overflows reads
    +inf, never converged) and the output is the lowest-residual iterate,
    not a fixed point. A backward residual above `backward_tol` means the
    implicit gradient's linear system was not solved: where the iteration
    diverges (ρ(J_f(z*)) ≥ 1 with `backward_solver="fixed_point"`) the
    gradient is the backward's best iterate, which can point the wrong way.
    Either is a DEQ that is not a contraction at its equilibrium: add the
    Jacobian penalty (`jac_weight`), use Broyden or Anderson for the
    backward, or train with `gradient="phantom"`, which solves no linear
    system.

    Jacobian regularization: while training, each call draws τ ~ Bernoulli(p)
    with p = `jac_freq`; when τ = 1 and γ = `jac_weight` > 0 the layer adds
    γ · mean over the batch of the Hutchinson estimate of ‖J_f(z*)‖_F² / d
    (`keras_deq.jacobian.frobenius_estimate`, `jac_samples` probes) with
    `add_loss`; otherwise the estimator is not run at all. The penalty is
    the layer's `jacobian_penalty`, a
    `keras_deq.regularizers.JacobianPenalty` whose non-trainable variables
    γ and p are also `layer.jac_weight` and `layer.jac_freq`, so callbacks
    (`keras_deq.callbacks.JacobianSchedule`, `AdaptiveJacobian`) can change
    them during `fit` without retracing the step, and `get_config` saves
    their current values.

    Randomness inside the block: a layer that implements
    `keras_deq.layers.PerSolveNoise` (such as `VariationalDropout`) gets
    one draw per training call, held for every evaluation of the block in
    that call: forward iterations, backward and penalty.

    Args:
        block: a `keras.layers.Layer` whose `call(z, x, training=None)`
            returns the next state, with the structure, shapes and dtype of
            `z`; or any layer whose `call` takes one tensor (a `Dense`, a
            `keras.Sequential`), which is applied to the injected state:
            z ← block(z + x), so z and x must have the same shape. If it
            has a method `initial_state(x)`, that gives the first iterate;
            otherwise the state is zeros shaped like `x`. The block may not
            contain `BatchNormalization` (a `ValueError` at build names the
            per-sample alternatives).
        solver: forward solver, `"broyden"`, `"anderson"`, `"fixed_point"`
            or a name registered with `keras_deq.solvers.register`. Defaults
            to `"broyden"`.
        max_iter: most block evaluations in the forward solve. Defaults to
            `30`.
        tol: forward stopping tolerance, per sample. Defaults to `1e-3`.
        stop_mode: `"rel"` (‖f(z) − z‖ / ‖f(z)‖) or `"abs"` (‖f(z) − z‖).
            Defaults to `"rel"`.
        backward_solver: solver of the implicit backward's linear fixed
            point. Defaults to `None` (the forward `solver`).
        backward_max_iter: most vector-Jacobian products in the backward,
            `0` or more. Defaults to `None` (`max_iter`). `0` takes no
            backward iterations: the backward's solution is its first
            iterate (∂ℓ/∂z* itself with `"implicit"`, Jacobian-free
            backpropagation; the forward's estimate with `"reuse"`).
        backward_tol: backward tolerance on the residual relative to
            ‖∂ℓ/∂z*‖, per sample. Defaults to `1e-4`.
        gradient: `"implicit"` (implicit function theorem), `"reuse"` (the
            implicit backward started from the forward Broyden solve's
            estimate of (I − J)⁻ᵀ, SHINE, and refined by at most
            `backward_max_iter` iterations; needs `solver="broyden"`, and
            keeps the forward's history until the backward), `"phantom"`
            (`phantom_steps` damped steps from z*, no linear solve) or
            `"unrolled"` (`max_iter` plain iterations from the initial state,
            backpropagated through; for pretraining and checks), or a kind
            registered with `keras_deq.gradients.register`. Defaults to
            `"implicit"`.
        phantom_steps: steps of the phantom gradient. Defaults to `1`.
        phantom_tau: damping τ of the phantom steps, in (0, 1]. Defaults to
            `1.0`.
        jac_weight: strength γ >= 0 of the Jacobian penalty. Defaults to
            `0.0` (off).
        jac_freq: probability p in [0, 1] that a training call computes the
            penalty. Defaults to `1.0`.
        jac_samples: Gaussian probes M of the Hutchinson estimate. Defaults
            to `1`.
        correction_weight: λ >= 0 of the fixed-point correction loss,
            `keras_deq.regularizers.fixed_point_correction`: at every
            training call, λ · Σ_k w_k ‖f(z_k) − z*‖² / ‖z*‖² over the
            first `correction_states` plain iterates z_k from the first
            iterate, added with `add_loss` and logged as
            `{name}_correction_loss`. It teaches f to reach its fixed point
            in few steps from where solves start. Defaults to `0.0` (off).
        correction_states: the iterates N it weighs. Defaults to `3`.
        correction_decay: w_k ∝ decay^(N−1−k), in (0, 1]. Defaults to
            `0.8`.
        random_start: σ > 0: every training solve starts from the default
            first iterate plus fresh N(0, σ²) noise, so that the model
            learns to reach its fixed point from anywhere (path
            independence; Anil et al., NeurIPS 2022). Calls outside
            training start as usual. `override_training(random_start=...)`
            overrides it. Defaults to `None` (no noise).
        seed: int seed of the penalty's gate and probes. Defaults to `None`
            (drawn from Keras' global seed).
        sample_axes: how many leading axes of the state index separately
            solved rows. `1` (the default): each batch element is one
            problem with its own solver state, stopping and best iterate.
            `2` for sequence states `[B, T, D]` of a causal block: every
            position gets its own quasi-Newton state, stopping and best
            iterate, so the output at position t depends on positions ≤ t
            only -- exactly, at any tolerance (with one problem per
            sequence, Broyden's and Anderson's updates mix positions and
            later tokens move earlier outputs by up to the tolerance).
            Forward statistics are then means over positions (over
            samples with `gradient="unrolled"`, which runs no solver); the
            implicit backward (whose linear system couples the positions)
            is solved per sample.
        solver_options: keyword arguments of the forward solver, e.g.
            `{"memory": 8}` (Broyden keeps at most 8 rank-one pairs, so its
            memory stops growing with `max_iter`) or `{"m": 5}` (Anderson's
            history). Defaults to `None` (the solver's defaults).
        backward_solver_options: the same for the backward solver. Defaults
            to `None`: `solver_options` when the backward solver is the
            forward one, else the backward solver's defaults.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        x: the input injected into every evaluation of the block: a tensor
            or a nest of tensors, with a leading batch dimension.
        training: Python boolean, passed on to the block.
        initial_state: the first iterate of the forward solve, with the
            structure and shapes of the state (typically this layer's output
            for a previous, similar input: consecutive frames or time
            steps), or `None` (the default) for `block.initial_state(x)` or
            zeros. A warm start only changes where the solver starts: it
            stops on the same tolerance, so the output agrees with a cold
            start's to within it, in fewer iterations when the start is
            close. No gradient flows into `initial_state`: the implicit
            gradient does not depend on the starting point, the phantom
            gradient starts from z*, and `gradient="unrolled"` unrolls its
            iterations from `initial_state`, held constant.

    Output shape:
        The state's structure and shapes: that of `block.initial_state(x)`,
        or of `x`.

    Examples:

        ```python
        @keras.saving.register_keras_serializable()
        class Cell(keras.layers.Layer):
            def build(self, z_shape, x_shape):
                self.dense = keras.layers.Dense(z_shape[-1], activation="tanh")
                self.dense.build(z_shape)

            def call(self, z, x, training=None):
                return self.dense(z) + x

        model = keras.Sequential(
            [keras.Input((64,)), keras_deq.DEQLayer(Cell())]
        )
        ```

    References:
        Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
        Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
        Regularization", ICML 2021.
    """

    # Checkpoints keep the state of the random starts' draws.
    saved_seed_generators = ("_start_seed_generator",)

    def __init__(
        self,
        block: keras.layers.Layer,
        *,
        solver: str = "broyden",
        max_iter: int = 30,
        tol: float = 1e-3,
        stop_mode: str = "rel",
        backward_solver: str | None = None,
        backward_max_iter: int | None = None,
        backward_tol: float = 1e-4,
        gradient: str = "implicit",
        phantom_steps: int = 1,
        phantom_tau: float = 1.0,
        jac_weight: float = 0.0,
        jac_freq: float = 1.0,
        jac_samples: int = 1,
        correction_weight: float = 0.0,
        correction_states: int = 3,
        correction_decay: float = 0.8,
        random_start: float | None = None,
        seed: int | None = None,
        sample_axes: int = 1,
        solver_options: dict | None = None,
        backward_solver_options: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(block, keras.layers.Layer):
            raise TypeError(
                "`block` must be a keras.layers.Layer whose call(z, x) returns "
                f"the next state. Received: block={block!r} of type "
                f"{type(block).__name__}"
            )
        self._injected = _takes_one_tensor(block)
        validation.check_choice("solver", solver, solvers.names())
        if backward_solver is not None:
            validation.check_choice(
                "backward_solver", backward_solver, solvers.names()
            )
        validation.check_int("max_iter", max_iter, 1)
        validation.check_positive("tol", tol)
        validation.check_choice("stop_mode", stop_mode, _loop.STOP_MODES)
        if backward_max_iter is not None:
            validation.check_int("backward_max_iter", backward_max_iter, 0)
        validation.check_positive("backward_tol", backward_tol)
        gradients.check("gradient", gradient)
        validation.check_int("phantom_steps", phantom_steps, 1)
        validation.check_range("phantom_tau", phantom_tau, 0, 1, low_open=True)
        validation.check_int("sample_axes", sample_axes, 1)
        validation.check_nonnegative("correction_weight", correction_weight)
        if random_start is not None:
            validation.check_positive("random_start", random_start)
        validation.check_int("correction_states", correction_states, 1)
        validation.check_range(
            "correction_decay", correction_decay, 0, 1, low_open=True
        )
        solver_options = solvers.check_options(
            "solver_options", solver, solver_options
        )
        if backward_solver_options is None and backward_solver in (
            None,
            solver,
        ):
            backward_options = solver_options
        else:
            backward_options = solvers.check_options(
                "backward_solver_options",
                backward_solver or solver,
                backward_solver_options,
            )

        self.block = block
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.stop_mode = stop_mode
        self.backward_solver = backward_solver
        self.backward_max_iter = backward_max_iter
        self.backward_tol = backward_tol
        self.gradient = gradient
        self.phantom_steps = phantom_steps
        self.phantom_tau = phantom_tau
        self.correction_weight = float(correction_weight)
        self.correction_states = correction_states
        self.correction_decay = float(correction_decay)
        self.random_start = (
            None if random_start is None else float(random_start)
        )
        self.seed = seed
        self.sample_axes = sample_axes
        self.solver_options = solver_options
        self.backward_solver_options = backward_solver_options
        self._backward_options = backward_options
        # γ and p live in the penalty's variables, and only there.
        self.jacobian_penalty = JacobianPenalty(
            jac_weight,
            jac_freq,
            jac_samples,
            seed,
            metric_name=f"{self.name}_jac_loss",
            name="jacobian_penalty",
        )

        self.forward_nfe = MeasuredMean(name=f"{self.name}_forward_nfe")
        self.forward_residual = MeasuredMean(
            name=f"{self.name}_forward_residual"
        )
        statistics = [self.forward_nfe, self.forward_residual, self.jac_loss]
        if gradients.reports_backward(gradient):
            self.backward_nfe = MeasuredMean(name=f"{self.name}_backward_nfe")
            self.backward_residual = MeasuredMean(
                name=f"{self.name}_backward_residual"
            )
            statistics += [self.backward_nfe, self.backward_residual]
        if self.correction_weight > 0:
            self.correction_loss = MeasuredMean(
                name=f"{self.name}_correction_loss"
            )
            statistics.append(self.correction_loss)
        self.jacobian_penalty.reported_by_owner = True
        self._statistics_report = StatisticsReport(
            statistics, self._shown_statistics, name=f"{self.name}_statistics"
        )
        self._traced_training = False
        self._state_spec = None
        self._training_overrides = {}
        self._inference_overrides = {}
        # Draws of `random_start` (and `override_training(random_start=...)`),
        # saved in checkpoints so a resumed run draws the same starts.
        self._start_seed_generator = keras.random.SeedGenerator(
            seed, name="start_seed_generator"
        )

    def build(self, x_shape):
        x_spec = keras.tree.map_shape_structure(
            lambda shape: tf.TensorSpec(shape, self.compute_dtype), x_shape
        )
        # The state's structure and shapes, from a trace of `initial_state`
        # (which may use TensorFlow ops, so it cannot take KerasTensors).
        z0 = (
            tf.function(self._initial_state, autograph=False)
            .get_concrete_function(x_spec)
            .structured_outputs
        )
        self._state_spec = tf.nest.map_structure(
            lambda t: tf.TensorSpec(t.shape, t.dtype), z0
        )
        # A symbolic call builds the block the way Keras builds any layer
        # (also under a distribution strategy) and gives its output shapes,
        # which are checked even when the block came built.
        z1 = self._apply_block(
            _keras_tensors(self._state_spec), _keras_tensors(x_spec), False
        )
        self.block._clear_losses()  # symbolic ones, from the call above
        self._check_block_output(self._state_spec, z1)
        self._check_no_batch_statistics()
        self._check_sample_axes(self._state_spec)
        # Keras then names this layer and both widths when a later input
        # does not fit, before any solve is traced.
        self.input_spec = keras.tree.map_shape_structure(
            lambda shape: keras.InputSpec(
                ndim=len(shape),
                axes=None if shape[-1] is None else {-1: shape[-1]},
            ),
            x_shape,
        )
        self.built = True

    @property
    def metrics(self):
        # The statistics go through one report, which logs those that the
        # call being traced (or run) can measure; see `_shown_statistics`.
        own = [self._statistics_report]
        return own + [
            metric
            for layer in self._layers
            if layer is not self.jacobian_penalty
            for metric in layer.metrics
        ]

    def _shown_statistics(self):
        shown = [self.forward_nfe, self.forward_residual]
        if not self._traced_training:
            return shown
        gradient = self._training_overrides.get("gradient", self.gradient)
        if hasattr(self, "backward_nfe") and gradients.reports_backward(
            gradient
        ):
            shown += [self.backward_nfe, self.backward_residual]
        if self.jacobian_penalty.may_be_on():
            shown.append(self.jac_loss)
        if self.correction_weight > 0:
            shown.append(self.correction_loss)
        return shown

    @property
    def jac_weight(self):
        """γ, the penalty's non-trainable float32 variable."""
        return self.jacobian_penalty.weight

    @property
    def jac_freq(self):
        """p, the penalty's non-trainable float32 variable."""
        return self.jacobian_penalty.freq

    @property
    def jac_samples(self) -> int:
        return self.jacobian_penalty.num_samples

    @property
    def jac_loss(self):
        """The penalty's metric, `{name}_jac_loss`."""
        return self.jacobian_penalty.metric

    def _initial_state(self, x):
        if hasattr(self.block, "initial_state"):
            z0 = self.block.initial_state(x)
        else:
            z0 = tf.nest.map_structure(tf.zeros_like, x)
        dtype = self.block.compute_dtype
        return tf.nest.map_structure(lambda t: tf.cast(t, dtype), z0)

    def _given_state(self, initial_state, x):
        """`initial_state`, checked against the state and cast, no gradient."""
        try:
            tf.nest.assert_same_structure(self._state_spec, initial_state)
        except (ValueError, TypeError):
            raise ValueError(
                "`initial_state` must have the structure of the state. "
                f"State: {_describe(self._state_spec)}. Received: "
                f"initial_state={_describe(initial_state)}."
            ) from None
        batch = tf.nest.flatten(x)[0].shape[0]
        dtype = self.block.compute_dtype
        given = []
        for path, spec, t in zip(
            _paths(self._state_spec),
            tf.nest.flatten(self._state_spec),
            tf.nest.flatten(initial_state),
            strict=True,
        ):
            t = tf.convert_to_tensor(t)
            expected = tf.TensorShape([batch]).concatenate(spec.shape[1:])
            if not t.shape.is_compatible_with(expected):
                where = f" at {path}" if path else ""
                raise ValueError(
                    f"`initial_state`{where} must have the state's shape "
                    f"{tuple(expected.as_list())} (batch first). Received "
                    f"shape {_shape(t)}."
                )
            given.append(tf.stop_gradient(tf.cast(t, dtype)))
        return tf.nest.pack_sequence_as(self._state_spec, given)

    def _apply_block(self, z, x, training):
        if not self._injected:
            return self.block(z, x, training=training)
        try:
            tf.nest.assert_same_structure(z, x)
            same = all(
                tf.TensorShape(a.shape).is_compatible_with(b.shape)
                for a, b in zip(
                    tf.nest.flatten(z), tf.nest.flatten(x), strict=True
                )
            )
        except (ValueError, TypeError):
            same = False
        if not same:
            raise ValueError(
                f"The block {self.block.name!r} takes one tensor, so it is "
                "applied to z + x, which needs a state with the structure "
                f"and shapes of the input. State: {_describe(z)}, input: "
                f"{_describe(x)}."
            )
        # The input joins the state in the state's dtype, as a Keras layer
        # casts its inputs to its compute dtype: an integer input, or a
        # float16 one from a mixed-precision DEQLayer around a float32 block.
        injected = tf.nest.map_structure(
            lambda a, b: a + keras.ops.cast(b, a.dtype), z, x
        )
        return self.block(injected, training=training)

    def _check_block_output(self, z0, z1):
        try:
            tf.nest.assert_same_structure(z0, z1)
        except (ValueError, TypeError):
            raise ValueError(
                "The block must return a state with the structure of its "
                f"input state. State: {_describe(z0)}. Block output: "
                f"{_describe(z1)}."
            ) from None
        for path, a, b in zip(
            _paths(z0), tf.nest.flatten(z0), tf.nest.flatten(z1), strict=True
        ):
            where = f" at {path}" if path else ""
            if tf.as_dtype(a.dtype) != tf.as_dtype(b.dtype):
                # A block that rounds the state to a narrower dtype limits
                # the solve to that precision; a wider one changes it.
                raise ValueError(
                    f"The block must return a state with the dtype of its "
                    f"input state{where}. State dtype: "
                    f"{tf.as_dtype(a.dtype).name}, block output dtype: "
                    f"{tf.as_dtype(b.dtype).name}. Cast the block's output "
                    "to the state's dtype (the block's compute dtype)."
                )
            a_shape, b_shape = tf.TensorShape(a.shape), tf.TensorShape(b.shape)
            if not a_shape[1:].is_compatible_with(b_shape[1:]):
                raise ValueError(
                    f"The block must return a state with the shape of its "
                    f"input state{where}. State shape: {_shape(a)}, block "
                    f"output shape: {_shape(b)}."
                )

    def _check_no_batch_statistics(self):
        for layer in self.block._flatten_layers(include_self=True):
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

    def _check_sample_axes(self, state_spec):
        if self.sample_axes == 1:
            return
        shapes = [tuple(s.shape) for s in tf.nest.flatten(state_spec)]
        leading = {shape[: self.sample_axes] for shape in shapes}
        if any(len(shape) <= self.sample_axes for shape in shapes) or (
            len(leading) > 1
        ):
            raise ValueError(
                f"`sample_axes`={self.sample_axes} needs every state tensor "
                f"to have more than {self.sample_axes} axes and the same "
                f"first {self.sample_axes}. State shapes: {shapes}"
            )

    @property
    def _solver_dtype(self):
        if self.block.compute_dtype == "float64":
            return tf.float64
        return tf.float32

    def _draw_noise(self, x, training):
        """One draw per noisy layer of the block, for this call."""
        if not training:
            return None
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        draws = [layer.draw_noise(batch) for layer in noisy_layers(self.block)]
        return draws or None

    def _flat_block(self, x, z0, training, noise=None, sample_axes=None):
        flattener = StateFlattener(
            z0, self._solver_dtype, sample_axes or self.sample_axes
        )
        noisy = noisy_layers(self.block) if noise is not None else []

        def f(z):
            # The block's own losses (activity regularizers, add_loss) of
            # the previous evaluation are dropped: only those of the last
            # one stay, which `call` takes at z* (see `_take_block_losses`).
            self.block._clear_losses()
            with contextlib.ExitStack() as stack:
                for layer, draw in zip(noisy, noise or [], strict=True):
                    stack.enter_context(layer.fixed_noise(draw))
                out = self._apply_block(flattener.unflatten(z), x, training)
            return flattener.flatten(out)

        return f, flattener

    def _forward_solve(self, x, z0, training, noise, max_iter, tol):
        f, flattener = self._flat_block(x, z0, training, noise)
        return self._run_solver(f, flattener.flatten(z0), max_iter, tol)

    def _solve_per_sample(self, x, z0, training, noise, max_iter, tol):
        """The forward solve, z* flattened per sample `[B, d]`.

        Rows are solved per `sample_axes`; `nstep` and the residuals stay
        per row.
        """
        if tf.executing_eagerly():
            result = self._eager_solve(
                x, z0, bool(training), noise, max_iter, tol
            )
        else:
            result = self._forward_solve(x, z0, training, noise, max_iter, tol)
        if self.sample_axes == 1:
            return result
        return result._replace(z=self._row_maps(z0)["from_rows"](result.z))

    def solve(self, f, z0):
        """z* = f(z*) from `z0` with this layer's forward solver settings.

        For a map the layer's `call` cannot express: the block with extra
        arguments bound, say (`DEQTransformerLM.decode_step` solves new
        positions against remembered ones this way). The solver, `max_iter`,
        `tol` (as `override_inference` sets them), `stop_mode`,
        `solver_options` and `sample_axes` are the layer's; nothing is
        recorded for gradients and no metric is updated.

        Args:
            f: maps a state (a nest shaped like `z0`) to a state.
            z0: the first iterate.

        Returns:
            `(z_star, result)`: z* with the structure of `z0`, and the
            `keras_deq.solvers.SolverResult` of the flat solve (per-row
            `nstep` and residuals).
        """
        flattener = StateFlattener(z0, self._solver_dtype, self.sample_axes)

        def flat_f(z):
            return flattener.flatten(f(flattener.unflatten(z)))

        result = self._run_solver(
            flat_f, flattener.flatten(z0), *self._budget(training=False)
        )
        return flattener.unflatten(result.z), result

    def _run_solver(self, f, z0, max_iter, tol):
        solve = solvers.get(self.solver)
        # No tape may record the solve (persistent and nested ones
        # included): its in-place histories have no gradient, and the
        # gradient of z* is the backward's, never the iterations'. This is
        # the scope `tf.recompute_grad` uses for the same purpose.
        with record.stop_recording():
            result = solve(
                f,
                z0,
                max_iter,
                tol,
                self.stop_mode,
                **self.solver_options,
            )
        return tf.nest.map_structure(
            lambda t: None if t is None else tf.stop_gradient(t), result
        )

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

    def call(self, x, training=None, initial_state=None):
        # The phase whose statistics the metrics report logs (the report is
        # read in the same traced step as this call).
        self._traced_training = bool(training)
        overrides = self._training_overrides if training else {}
        gradient = overrides.get("gradient", self.gradient)
        max_iter, tol = self._budget(training)
        if initial_state is None:
            z0 = self._initial_state(x)
            start = self._random_start(training)
            if start is not None:
                z0 = _perturbed(z0, *start)
        else:
            z0 = self._given_state(initial_state, x)
        # Every evaluation of the block in this call (forward iterations,
        # the one at z* that the backward uses, the Jacobian penalty) sees
        # the same draw of its per-solve noise (dropout masks).
        noise = self._draw_noise(x, training)
        # The gradient kinds see whole samples: the implicit backward's
        # linear system couples the rows of a sample (anti-causally, for a
        # causal f), even when the forward solves them one by one.
        f, flattener = self._flat_block(x, z0, training, noise, 1)

        def solve():
            return self._solve_per_sample(x, z0, training, noise, max_iter, tol)

        problem = gradients.Problem(
            f=f,
            z0=flattener.flatten(z0),
            solve=solve,
            max_iter=max_iter,
            backward_solver=functools.partial(
                solvers.get(self.backward_solver or self.solver),
                **self._backward_options,
            ),
            backward_max_iter=(
                max_iter
                if self.backward_max_iter is None
                else self.backward_max_iter
            ),
            backward_tol=self.backward_tol,
            phantom_steps=self.phantom_steps,
            phantom_tau=self.phantom_tau,
            # Backward statistics describe training; outside it the
            # gradient function must capture no metric variables, since a
            # SavedModel serializes it with the forward.
            on_backward=(
                self._record_backward
                if training and hasattr(self, "backward_nfe")
                else None
            ),
            **self._row_maps(z0),
        )
        z, forward = gradients.get(gradient)(problem)
        # Losses the block added at the evaluation that gives the output (at
        # z*): the solve's are inside its loop and the penalty's inside a
        # cond, where nothing outside may read them.
        block_losses = self._take_block_losses()
        if block_losses:
            self.add_loss(block_losses)
        if training:
            penalty = self.jacobian_penalty.loss(f, forward.z)
            self.add_loss(tf.cast(penalty, self.variable_dtype))
            if self.correction_weight > 0:
                correction = self.correction_weight * fixed_point_correction(
                    f,
                    problem.z0,
                    z,
                    self.correction_states,
                    self.correction_decay,
                )
                self.correction_loss.update_state(
                    tf.cast(correction, tf.float32)
                )
                self.add_loss(tf.cast(correction, self.variable_dtype))
            self.block._clear_losses()
        self.forward_nfe.update_state(tf.cast(forward.nstep, tf.float32))
        self.forward_residual.update_state(
            tf.cast(forward.rel_residual, tf.float32)
        )
        return flattener.unflatten(z)

    def _row_maps(self, z0):
        """`Problem.to_rows` and `from_rows`: per-sample vectors ↔ rows."""
        if self.sample_axes == 1:
            return {}
        # The state's own dtype in between: the per-sample vectors it maps
        # are the backward's, in the solver dtype, so only a float16 state
        # would round them (a first iterate there, which the backward
        # iterations refine).
        samples = StateFlattener(z0, self._solver_dtype, 1)
        rows = StateFlattener(z0, self._solver_dtype, self.sample_axes)
        return {
            "to_rows": lambda v: rows.flatten(samples.unflatten(v)),
            "from_rows": lambda v: samples.flatten(rows.unflatten(v)),
        }

    def _take_block_losses(self):
        """The losses the block's layers added in their last call."""
        losses = [
            loss
            for layer in self.block._flatten_layers(include_self=True)
            for loss in layer._get_own_losses()
        ]
        self.block._clear_losses()
        return losses

    def _eager_solve(self, x, z0, training, noise, max_iter, tol):
        settings = repr(
            (
                self.solver,
                max_iter,
                tol,
                self.stop_mode,
                sorted(self.solver_options.items()),
            )
        )
        functions = _EAGER_SOLVES.setdefault(self, {})
        if settings not in functions:
            layer = weakref.ref(self)

            def solve(x, z0, training, noise):
                return layer()._forward_solve(
                    x, z0, training, noise, max_iter, tol
                )

            functions[settings] = tf.function(solve, reduce_retracing=True)
        # A variable given as the input would be captured by reference in
        # the trace, which then fails once that variable is deleted; the
        # solve needs its value only.
        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        return functions[settings](x, z0, training, noise)

    def spectral_radius(self, x, num_iters: int = 50) -> tf.Tensor:
        """Power-method estimate of ρ(J_f(z*)) at the equilibrium of `x`.

        Solves the forward problem for `x` (in inference mode) and runs
        `keras_deq.jacobian.spectral_radius` at z*. Values below 1 mean
        that plain fixed-point iteration converges locally.

        Args:
            x: a batch of inputs of this layer.
            num_iters: power-method iterations. Defaults to `50`.

        Returns:
            `[B]` estimates, in the solver's dtype (float32 or float64).
        """
        x = tf.nest.map_structure(
            lambda t: tf.convert_to_tensor(t, self.compute_dtype), x
        )
        if not self.built:
            self.build(tf.nest.map_structure(lambda t: t.shape, x))
        z0 = self._initial_state(x)
        # Whole samples, also when the solve ran per position.
        result = self._solve_per_sample(
            x, z0, False, None, *self._budget(training=False)
        )
        f, _ = self._flat_block(x, z0, False, sample_axes=1)
        return jacobian.spectral_radius(f, result.z, num_iters)

    def _record_backward(self, result):
        self.backward_nfe.update_state(tf.cast(result.nstep, tf.float32))
        self.backward_residual.update_state(
            tf.cast(result.rel_residual, tf.float32)
        )

    def compute_output_spec(self, x, training=None, initial_state=None):
        batch = tf.nest.flatten(x)[0].shape[0]
        return tf.nest.map_structure(
            lambda spec: keras.KerasTensor(
                (batch,) + tuple(spec.shape[1:]), dtype=spec.dtype
            ),
            self._state_spec,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block": keras.saving.serialize_keras_object(self.block),
                "solver": self.solver,
                "max_iter": self.max_iter,
                "tol": self.tol,
                "stop_mode": self.stop_mode,
                "backward_solver": self.backward_solver,
                "backward_max_iter": self.backward_max_iter,
                "backward_tol": self.backward_tol,
                "gradient": self.gradient,
                "phantom_steps": self.phantom_steps,
                "phantom_tau": self.phantom_tau,
                **self.jacobian_penalty.settings(),
                "correction_weight": self.correction_weight,
                "correction_states": self.correction_states,
                "correction_decay": self.correction_decay,
                "random_start": self.random_start,
                "seed": self.seed,
                "sample_axes": self.sample_axes,
                "solver_options": dict(self.solver_options),
                "backward_solver_options": self.backward_solver_options,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        block = keras.saving.deserialize_keras_object(
            config.pop("block"), custom_objects=custom_objects
        )
        return cls(block, **config)


def _takes_one_tensor(block):
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


def _perturbed(state, stddev, seed):
    """`state` plus N(0, stddev²) noise, no gradient.

    `seed` is an int (the same draw in every traced call) or a
    `SeedGenerator` (a new draw at every call).
    """
    leaves = tf.nest.flatten(state)
    fixed = not isinstance(seed, keras.random.SeedGenerator)
    noisy = [
        leaf
        + tf.cast(
            keras.random.normal(
                tf.shape(leaf), stddev=stddev, seed=seed + i if fixed else seed
            ),
            leaf.dtype,
        )
        for i, leaf in enumerate(leaves)
    ]
    return tf.nest.pack_sequence_as(state, noisy)


def _keras_tensors(specs):
    return tf.nest.map_structure(
        lambda spec: keras.KerasTensor(spec.shape, dtype=spec.dtype), specs
    )


def _paths(nest):
    return [
        "/".join(map(str, p)) for p, _ in keras.tree.flatten_with_path(nest)
    ]


def _shape(tensor):
    return tuple(tf.TensorShape(tensor.shape).as_list())


def _describe(nest):
    return str(tf.nest.map_structure(lambda t: f"<{list(_shape(t))}>", nest))
