"""How a DEQLayer solves: the block as a map of flat states, and the solve."""

import contextlib
import weakref

import keras

from keras_deq import backend as _backend
from keras_deq import jacobian
from keras_deq import solvers
from keras_deq.layers.noise import noisy_layers
from keras_deq.utils.state import StateFlattener

# Eager calls on a backend whose eager loops run op by op (TensorFlow) run
# the forward solve through a compiled function, one per layer and solver
# settings, so that settings changed after a call take effect. Kept outside
# the layer so that SavedModel export does not try to save it; the functions
# reach the layer through a weak reference only, so the cache never keeps it
# alive.
_EAGER_SOLVES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Solving:
    """The forward solve of `DEQLayer`, flattened per row, off every tape."""

    @property
    def _solver_dtype(self):
        if self.block.compute_dtype == "float64":
            return "float64"
        return "float32"

    def _draw_noise(self, x, training):
        """One draw per noisy layer of the block, for this call."""
        if not training:
            return None
        batch = keras.ops.shape(keras.tree.flatten(x)[0])[0]
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
        if _backend.loops_run_op_by_op():
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
        # No gradient may enter the solve: its in-place histories have
        # none, and the gradient of z* is the backward's, never the
        # iterations'.
        with _backend.unrecorded():
            result = solve(
                f,
                z0,
                max_iter,
                tol,
                self.stop_mode,
                **self.solver_options,
            )
        return keras.tree.map_structure(
            lambda t: None if t is None else keras.ops.stop_gradient(t), result
        )

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

            functions[settings] = _backend.function(solve)
        # A variable given as the input would be captured by reference in
        # the trace, which then fails once that variable is deleted; the
        # solve needs its value only.
        x = keras.tree.map_structure(keras.ops.copy, x)
        return functions[settings](x, z0, training, noise)

    def spectral_radius(self, x, num_iters: int = 50):
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
        x = keras.tree.map_structure(
            lambda t: keras.ops.convert_to_tensor(t, self.compute_dtype), x
        )
        if not self.built:
            self.build(keras.tree.map_structure(lambda t: t.shape, x))
        z0 = self._initial_state(x)
        # Whole samples, also when the solve ran per position.
        result = self._solve_per_sample(
            x, z0, False, None, *self._budget(training=False)
        )
        f, _ = self._flat_block(x, z0, False, sample_axes=1)
        return jacobian.spectral_radius(f, result.z, num_iters)
