"""Evaluation: performance metrics (`metrics`), statistics, fairness and missingness analyses of saved runs."""

from carebench.evaluation.metrics import (
    SELECTION_METRIC,
    binary_metrics,
    compute_metrics,
    expected_calibration_error,
    multiclass_metrics,
    multilabel_metrics,
)

__all__ = [
    "SELECTION_METRIC",
    "binary_metrics",
    "compute_metrics",
    "expected_calibration_error",
    "multiclass_metrics",
    "multilabel_metrics",
]
