"""DEQLayer: the fixed point of a Keras layer, as a Keras layer."""

import functools

import keras

from keras_deq import backend as _backend
from keras_deq import gradients
from keras_deq import solvers
from keras_deq.layers import _block
from keras_deq.layers import _phase_settings
from keras_deq.layers import _solving
from keras_deq.layers import _statistics
from keras_deq.regularizers import JacobianPenalty
from keras_deq.regularizers import fixed_point_correction
from keras_deq.solvers import _loop
from keras_deq.utils import validation
from keras_deq.utils.seeds import SavedSeedState


@keras.saving.register_keras_serializable(package="keras_deq")
class DEQLayer(
    _block.BlockState,
    _phase_settings.PhaseSettings,
    _solving.Solving,
    _statistics.Statistics,
    SavedSeedState,
    keras.layers.Layer,
):
    """Returns the equilibrium z* = block(z*, x) of a Keras layer.

    A deep equilibrium model replaces a stack of weight-tied layers by the
    fixed point of one of them. The forward pass finds z* with a root solver
    inside a `tf.while_loop`, each sample stopping on its own residual; the
    backward pass differentiates through z* by the implicit function theorem
    (or a phantom or unrolled approximation), so training memory does not grow
    with the number of solver iterations.

    The state can be a single tensor or a nest (list, tuple or dict) of
    tensors of different shapes; the solver sees it flattened per sample,
    in float32 (float64 when the block computes in float64), also under a
    mixed-precision policy.

    Statistics (Keras metrics, shown by `fit` and kept in `History`):
    `{name}_forward_nfe` and `{name}_forward_residual`, with a backward
    solve `{name}_backward_nfe` and `{name}_backward_residual`, and the
    losses `{name}_jac_loss` and `{name}_correction_loss`. A statistic that
    a phase could measure and did not reads NaN, never 0. A forward
    residual above `tol` means the solve stopped at `max_iter` and the
    output is the lowest-residual iterate, not a fixed point; the user
    guide's troubleshooting page says what to do.

    Jacobian regularization: in training, each call draws τ ~ Bernoulli(p),
    p = `jac_freq`; when τ = 1 and γ = `jac_weight` > 0 the layer adds
    γ times the Hutchinson estimate of ‖J_f(z*)‖_F² / d with `add_loss`,
    and otherwise does not run the estimator. γ and p are non-trainable
    variables of `layer.jacobian_penalty` (`layer.jac_weight`,
    `layer.jac_freq`), which callbacks change during `fit` without
    retracing. A layer of the block that implements
    `keras_deq.layers.PerSolveNoise` (`VariationalDropout`) gets one draw
    per call, held for every evaluation of the block in it.

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
            registered with `keras_deq.gradients.register`: each built from
            this layer's `backward_*` and `phantom_*` arguments. Or a
            `keras_deq.gradients.GradientKind` with settings of its own
            (`Implicit(solver=..., max_iter=..., tol=...)`,
            `Phantom(steps=..., tau=...)`, `Reuse`, `Unrolled(steps=...)`),
            which those arguments do not touch. Defaults to `"implicit"`.
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
        gradient: str | gradients.GradientKind = "implicit",
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
        self._injected = _block.takes_one_tensor(block)
        solvers.get(solver, "solver")
        if backward_solver is not None:
            solvers.get(backward_solver, "backward_solver")
        validation.check_int("max_iter", max_iter, 1)
        validation.check_positive("tol", tol)
        validation.check_choice("stop_mode", stop_mode, _loop.STOP_MODES)
        if backward_max_iter is not None:
            validation.check_int("backward_max_iter", backward_max_iter, 0)
        validation.check_positive("backward_tol", backward_tol)
        gradient = gradients.check("gradient", gradient)
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
        # What a kind named by a string is built from.
        self._gradient_settings = gradients.LayerSettings(
            backward_solver or solver,
            backward_max_iter,
            backward_tol,
            backward_options,
            phantom_steps,
            phantom_tau,
        )
        # γ and p live in the penalty's variables, and only there.
        self.jacobian_penalty = JacobianPenalty(
            jac_weight,
            jac_freq,
            jac_samples,
            seed,
            metric_name=f"{self.name}_jac_loss",
            name="jacobian_penalty",
        )

        self._make_statistics(gradient)
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
            lambda shape: keras.KerasTensor(shape, self.compute_dtype), x_shape
        )
        # The state's structure and shapes, from a trace of `initial_state`
        # (which may use the backend's own ops).
        # Set past Keras' attribute tracking, which would make a list state
        # a `TrackedList`, a structure other than the block's list.
        object.__setattr__(
            self,
            "_state_spec",
            _backend.output_spec(self._initial_state, x_spec),
        )
        # A symbolic call builds the block the way Keras builds any layer
        # (also under a distribution strategy) and gives its output shapes,
        # which are checked even when the block came built.
        z1 = self._apply_block(
            _block.keras_tensors(self._state_spec),
            _block.keras_tensors(x_spec),
            False,
        )
        self.block._clear_losses()  # symbolic ones, from the call above
        _block.check_block_output(self._state_spec, z1)
        _block.check_no_batch_statistics(self.block)
        _block.check_sample_axes(self.sample_axes, self._state_spec)
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

    def call(self, x, training=None, initial_state=None):
        # The phase whose statistics the metrics report logs (the report is
        # read in the same traced step as this call).
        self._traced_training = bool(training)
        overrides = self._training_overrides if training else {}
        gradient = overrides.get("gradient", self.gradient)
        max_iter, tol = self._budget(training)
        z0 = self._first_iterate(x, training, initial_state)
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

        problem = self._problem(f, flattener, z0, solve, max_iter, training)
        kind = gradients.get(gradient, self._gradient_settings)
        z, forward = kind(problem)
        self._add_losses(f, problem.z0, z, forward, training)
        self._record_forward(forward)
        return flattener.unflatten(z)

    def _first_iterate(self, x, training, initial_state):
        """z₀: the given state, or the block's first iterate (perturbed
        where `random_start` asks for it)."""
        if initial_state is not None:
            return self._given_state(initial_state, x)
        z0 = self._initial_state(x)
        start = self._random_start(training)
        if start is not None:
            z0 = _phase_settings.perturbed(z0, *start)
        return z0

    def _problem(self, f, flattener, z0, solve, max_iter, training):
        """The `gradients.Problem` of this call's solve and backward."""
        return gradients.Problem(
            f=f,
            z0=flattener.flatten(z0),
            solve=solve,
            solver=functools.partial(
                solvers.get(self.solver), **self.solver_options
            ),
            max_iter=max_iter,
            # Backward statistics describe training; outside it the
            # gradient function must capture no metric variables, since a
            # SavedModel serializes it with the forward.
            on_backward=(
                self._record_backward
                if training
                and hasattr(self, "backward_nfe")
                and _backend.LAYER_METRICS
                else None
            ),
            **self._row_maps(z0),
        )

    def _add_losses(self, f, z0, z, forward, training):
        """The block's losses at z*; in training, the penalty and the
        fixed-point correction."""
        # Losses the block added at the evaluation that gives the output (at
        # z*): the solve's are inside its loop and the penalty's inside a
        # cond, where nothing outside may read them.
        block_losses = self._take_block_losses()
        if block_losses:
            self.add_loss(block_losses)
        if not training:
            return
        penalty = self.jacobian_penalty.loss(f, forward.z)
        self.add_loss(keras.ops.cast(penalty, self.variable_dtype))
        if self.correction_weight > 0:
            correction = self.correction_weight * fixed_point_correction(
                f, z0, z, self.correction_states, self.correction_decay
            )
            self._record(self.correction_loss, correction)
            self.add_loss(keras.ops.cast(correction, self.variable_dtype))
        self.block._clear_losses()

    def compute_output_spec(self, x, training=None, initial_state=None):
        batch = keras.tree.flatten(x)[0].shape[0]
        return keras.tree.map_structure(
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
                "gradient": gradients.serialize(self.gradient),
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
