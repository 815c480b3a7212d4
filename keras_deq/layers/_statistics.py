"""What a DEQLayer logs: its NFE, residuals and losses, per phase."""

from keras import ops

from keras_deq import backend as _backend
from keras_deq import gradients
from keras_deq.utils.metrics import MeasuredMean
from keras_deq.utils.metrics import StatisticsReport


class Statistics:
    """The metrics of `DEQLayer`: forward and backward NFE and residuals,
    the penalty and the correction loss, logged through one report that
    shows what the traced phase can measure.
    """

    def _make_statistics(self, gradient):
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

    @property
    def metrics(self):
        # The statistics go through one report, which logs those that the
        # call being traced (or run) can measure; see `_shown_statistics`.
        own = [self._statistics_report] if _backend.LAYER_METRICS else []
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

    def _record(self, metric, values):
        """Adds `values` to `metric` where the update takes effect: always
        on TensorFlow, in eager calls on JAX (`backend.records_now`)."""
        if _backend.records_now(values):
            metric.update_state(ops.cast(values, "float32"))

    def _record_backward(self, result):
        self._record(self.backward_nfe, result.nstep)
        self._record(self.backward_residual, result.rel_residual)

    def _record_forward(self, result):
        self._record(self.forward_nfe, result.nstep)
        self._record(self.forward_residual, result.rel_residual)
