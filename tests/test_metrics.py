"""Metrics equal scikit-learn's on random inputs (to 1e-9), and the degenerate cases are defined."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from carebench.evaluation.metrics import (
    MetricInputError,
    binary_metrics,
    compute_metrics,
    epoch_metrics,
    expected_calibration_error,
    multiclass_metrics,
    multilabel_metrics,
)
from carebench.tasks import get_task

TOL = 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 500
    y = rng.integers(0, 2, n)
    p = np.clip(rng.beta(2, 2, n) * 0.6 + 0.3 * y, 0, 1)
    m = binary_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    tn, fp, _fn, _tp = skm.confusion_matrix(y, pred).ravel()
    expect = {
        "auroc": skm.roc_auc_score(y, p),
        "auprc": skm.average_precision_score(y, p),
        "accuracy": skm.accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred),
        "precision": skm.precision_score(y, pred),
        "recall": skm.recall_score(y, pred),
        "specificity": tn / (tn + fp),
        "brier": np.mean((p - y) ** 2),
    }
    for k, v in expect.items():
        assert m[k] == pytest.approx(v, abs=TOL), k
    assert m["n"] == n and m["prevalence"] == pytest.approx(y.mean())


def test_ece_hand_example_and_p_equal_one():
    # bins: [0.0,0.1): p=0.05 (y=0); [0.9,1.0]: p=0.95 (y=1), p=1.0 (y=0)
    y = np.array([0, 1, 0])
    p = np.array([0.05, 0.95, 1.0])
    # bin 0: |0.05 - 0| * 1/3 ; bin 9: |(0.95+1.0)/2 - 0.5| * 2/3
    expect = 0.05 / 3 + abs(0.975 - 0.5) * 2 / 3
    assert expected_calibration_error(y, p) == pytest.approx(expect, abs=TOL)
    # an independent computation on random data with numpy.histogram (last bin closed, as here)
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    idx = np.clip(np.digitize(p, np.linspace(0, 1, 11)[1:-1]), 0, 9)
    ece = sum(
        abs(p[idx == b].mean() - y[idx == b].mean()) * (idx == b).mean()
        for b in range(10)
        if (idx == b).any()
    )
    assert expected_calibration_error(y, p) == pytest.approx(ece, abs=TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_multilabel_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 400, 25
    y = (rng.random((n, k)) < rng.uniform(0.05, 0.5, k)).astype(int)
    p = np.clip(rng.random((n, k)) * 0.7 + 0.3 * y, 0, 1)
    names = [f"pheno_{j}" for j in range(k)]
    m = multilabel_metrics(y, p, names)
    for avg in ("macro", "micro", "weighted"):
        assert m[f"auroc_{avg}"] == pytest.approx(skm.roc_auc_score(y, p, average=avg), abs=TOL), avg
        assert m[f"auprc_{avg}"] == pytest.approx(skm.average_precision_score(y, p, average=avg), abs=TOL), (
            avg
        )
    for j in (0, 7, 24):
        assert m[f"auroc/pheno_{j}"] == pytest.approx(skm.roc_auc_score(y[:, j], p[:, j]), abs=TOL)
        assert m[f"auprc/pheno_{j}"] == pytest.approx(skm.average_precision_score(y[:, j], p[:, j]), abs=TOL)
    assert m["n_labels_defined"] == k


def test_multilabel_single_class_label_is_nan_and_left_out_of_averages():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (200, 4))
    y[:, 2] = 0
    p = rng.random((200, 4))
    m = multilabel_metrics(y, p, ["a", "b", "c", "d"])
    assert np.isnan(m["auroc/c"]) and np.isnan(m["auprc/c"])
    keep = [0, 1, 3]
    assert m["auroc_macro"] == pytest.approx(
        skm.roc_auc_score(y[:, keep], p[:, keep], average="macro"), abs=TOL
    )
    assert m["auprc_weighted"] == pytest.approx(
        skm.average_precision_score(y[:, keep], p[:, keep], average="weighted"), abs=TOL
    )
    assert m["n_labels_defined"] == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 600, 7
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass_metrics(y, p, [f"los_{c}" for c in range(k)])
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=TOL)
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"), abs=TOL)
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred), abs=TOL)
    assert m["kappa_linear"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="linear"), abs=TOL)
    assert m["auroc_ovr_macro"] == pytest.approx(
        skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=TOL
    )
    assert m["auroc/los_3"] == pytest.approx(skm.roc_auc_score(y == 3, p[:, 3]), abs=TOL)


def test_multiclass_absent_class_excluded_from_ovr_macro():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 6, 300)  # class 6 never occurs
    p = rng.dirichlet(np.ones(7), 300)
    m = multiclass_metrics(y, p)
    assert np.isnan(m["auroc/6"])
    expect = np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in range(6)])
    assert m["auroc_ovr_macro"] == pytest.approx(expect, abs=TOL)


def test_logits_are_rejected():
    with pytest.raises(MetricInputError, match="probabilities"):
        binary_metrics(np.array([0, 1]), np.array([-2.0, 3.0]))
    with pytest.raises(MetricInputError, match="sum to 1"):
        multiclass_metrics(np.array([0, 1]), np.array([[0.2, 0.2], [0.5, 0.1]]))


def test_single_class_binary_is_nan_not_an_error():
    m = binary_metrics(np.zeros(10, int), np.linspace(0, 1, 10))
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"])
    assert m["specificity"] == pytest.approx(0.5)  # p >= 0.5 for the upper 5 of 10 negatives


def test_compute_metrics_dispatch_has_selection_metric():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 25))
    assert get_task("phenotype").selection_metric in compute_metrics(
        "phenotype", y, rng.random((50, 25)), [str(i) for i in range(25)]
    )
    assert get_task("mortality").selection_metric in compute_metrics(
        "mortality", y[:, :1], rng.random((50, 1)), ["m"]
    )
    assert get_task("los").selection_metric in compute_metrics(
        "los", rng.integers(0, 7, 50), rng.dirichlet(np.ones(7), 50), None
    )
    # every task's headline metrics are metrics compute_metrics returns
    assert set(get_task("los").headline) <= set(
        compute_metrics("los", rng.integers(0, 7, 50), rng.dirichlet(np.ones(7), 50), None)
    )


@pytest.mark.parametrize("task", ["mortality", "phenotype", "los"])
@pytest.mark.parametrize("seed", [0, 1])
def test_epoch_metrics_equal_compute_metrics(task, seed):
    """The per-epoch validation metrics (vectorised) are the task's selection and logged metrics and equal
    `compute_metrics` (scikit-learn) to float rounding, with tied scores, a label or class without positives
    (left out of the macro average) and one with only positives."""
    from carebench.tasks import default_output_names

    rng = np.random.default_rng(seed)
    spec = get_task(task)
    n, names = 300, default_output_names(spec)
    if spec.kind == "multiclass":
        y = rng.integers(0, 6, n)  # class 6 absent
        p = rng.dirichlet(np.ones(7), n)
        p = np.round(p, 2) / np.round(p, 2).sum(axis=1, keepdims=True)
    else:
        y = (rng.random((n, len(names))) < 0.3).astype(int)
        if spec.kind == "multilabel":
            y[:, 3], y[:, 5] = 0, 1  # undefined labels
        p = np.round(np.clip(rng.random(y.shape) * 0.7 + 0.3 * y, 0, 1), 2)  # ties
        if spec.kind == "binary":
            y, p = y[:, 0], p[:, 0]
    got = epoch_metrics(task, y, p)
    ref = compute_metrics(task, y, p, names)
    assert set(got) == {spec.selection_metric, *spec.logged}
    for k, v in got.items():
        assert v == pytest.approx(ref[k], abs=1e-12), k


def test_epoch_metrics_undefined_is_nan():
    y = np.zeros((10, 25), dtype=int)
    got = epoch_metrics("phenotype", y, np.full((10, 25), 0.3))
    assert np.isnan(got["auroc_macro"]) and np.isnan(got["auprc_macro"]) and np.isnan(got["auroc_micro"])
    assert np.isnan(epoch_metrics("mortality", np.ones(5), np.full(5, 0.4))["auprc"])
