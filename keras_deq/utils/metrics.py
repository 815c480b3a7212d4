"""Metrics shared by the layers."""

from collections.abc import Callable

import keras


class MeasuredMean(keras.metrics.Mean):
    """A mean that reads NaN, not 0, when it has no values to average."""

    def result(self):
        return keras.ops.where(
            self.count > 0,
            keras.ops.divide_no_nan(self.total, self.count),
            keras.ops.full((), float("nan"), self.dtype),
        )


class StatisticsReport(keras.metrics.Metric):
    """What `fit` and `evaluate` log of a layer's statistics.

    Keras logs every metric a model holds, so a statistic that cannot be
    measured in a phase (a backward in `evaluate`, a penalty that is off)
    would show as a column of NaN. A layer that owns this report lists it
    as its only metric: it resets all of `statistics`, and its result holds
    those that `shown()` names, read when the step is traced (or, eagerly,
    run) -- one entry per statistic, by its name.

    Args:
        statistics: the metrics it resets (and reports, when shown).
        shown: returns the subset of `statistics` to log now.
        name: the report's own name (not logged).
    """

    def __init__(
        self,
        statistics: list[keras.metrics.Metric],
        shown: Callable[[], list[keras.metrics.Metric]],
        name: str,
    ):
        super().__init__(name=name)
        self.statistics = list(statistics)
        self._shown = shown

    def update_state(self, *args, **kwargs):
        raise NotImplementedError(
            "A StatisticsReport is updated through its statistics."
        )

    def reset_state(self):
        for metric in self.statistics:
            metric.reset_state()

    def result(self):
        return {metric.name: metric.result() for metric in self._shown()}
