"""Performance metrics of one set of predictions, always from probabilities (never logits).

Why a module of our own around scikit-learn: the reference computed threshold metrics and ECE on whatever a model
returned (logits for eight models), crashed or skipped labels with a single class, and had no AUROC for LOS.
Here every function checks that its scores are probabilities, uses scikit-learn for each number (so results equal
sklearn's), and defines the degenerate cases:

- A rank metric (AUROC, AUPRC) of a label with only one class in `y_true` is NaN; macro / weighted averages are
  taken over the labels where it is defined (with every label defined they equal sklearn's averages).
- Threshold metrics use `p >= threshold` (0.5, i.e. logit >= 0) and sklearn's `zero_division=0`.
- ECE: 10 equal-width bins [i/10, (i+1)/10), the last one closed so p = 1 counts; sum over bins of
  (bin size / n) x |mean p - mean y|.

Keys are flat: overall metrics by name (`auroc`, `auprc_macro`, ...), per label or class `metric/<name>`.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from carebench.errors import UserError
from carebench.tasks import get_task


class MetricInputError(UserError, ValueError):
    """Scores that are not probabilities, or labels and scores of mismatched shapes."""


def _check_probs(p: np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise MetricInputError(
            f"{what}: scores must be probabilities in [0, 1] (apply sigmoid/softmax to logits); "
            f"got range [{np.nanmin(p):.4g}, {np.nanmax(p):.4g}]"
        )
    return p


def _both_classes(y: np.ndarray) -> bool:
    return bool(np.any(y == 1) and np.any(y == 0))


def expected_calibration_error(y_true: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Binary ECE with `n_bins` equal-width bins; the last bin includes p = 1."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = _check_probs(p, "ECE").ravel()
    if len(y) == 0:
        return float("nan")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    sum_p = np.bincount(b, weights=p, minlength=n_bins)
    sum_y = np.bincount(b, weights=y, minlength=n_bins)
    nz = count > 0
    return float(np.sum(np.abs(sum_p[nz] - sum_y[nz])) / len(y))


def binary_metrics(y_true: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, AUPRC (average precision), accuracy, F1, precision, recall, specificity, Brier, ECE."""
    y = np.asarray(y_true).ravel().astype(np.int64)
    p = _check_probs(p, "binary metrics").ravel()
    if y.shape != p.shape:
        raise MetricInputError(f"binary metrics: {len(y)} labels but {len(p)} scores")
    pred = (p >= threshold).astype(np.int64)
    ranked = _both_classes(y)
    return {
        "auroc": float(skm.roc_auc_score(y, p)) if ranked else float("nan"),
        "auprc": float(skm.average_precision_score(y, p)) if ranked else float("nan"),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
        "specificity": float(skm.recall_score(y, pred, pos_label=0, zero_division=0)),
        "brier": float(skm.brier_score_loss(y, p, labels=[0, 1])),
        "ece": expected_calibration_error(y, p),
        "prevalence": float(y.mean()) if len(y) else float("nan"),
        "n": len(y),
    }


def multilabel_metrics(y_true: np.ndarray, p: np.ndarray, names: list[str]) -> dict[str, float]:
    """Per label AUROC / AUPRC / prevalence, and their macro, micro and (positive-support) weighted averages."""
    y = np.asarray(y_true).astype(np.int64)
    p = _check_probs(p, "multilabel metrics")
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(names):
        raise MetricInputError(f"multilabel metrics: labels {y.shape}, scores {p.shape}, {len(names)} names")
    out: dict[str, float] = {}
    auroc = np.full(len(names), np.nan)
    auprc = np.full(len(names), np.nan)
    for j, name in enumerate(names):
        if _both_classes(y[:, j]):
            auroc[j] = skm.roc_auc_score(y[:, j], p[:, j])
            auprc[j] = skm.average_precision_score(y[:, j], p[:, j])
        out[f"auroc/{name}"] = float(auroc[j])
        out[f"auprc/{name}"] = float(auprc[j])
        out[f"prevalence/{name}"] = float(y[:, j].mean()) if len(y) else float("nan")
    ok = ~np.isnan(auroc)
    support = y.sum(axis=0).astype(np.float64)
    for key, vals in (("auroc", auroc), ("auprc", auprc)):
        out[f"{key}_macro"] = float(vals[ok].mean()) if ok.any() else float("nan")
        w = support[ok]
        out[f"{key}_weighted"] = (
            float(np.average(vals[ok], weights=w)) if ok.any() and w.sum() > 0 else float("nan")
        )
    flat_ok = _both_classes(y.ravel())
    out["auroc_micro"] = float(skm.roc_auc_score(y, p, average="micro")) if flat_ok else float("nan")
    out["auprc_micro"] = (
        float(skm.average_precision_score(y, p, average="micro")) if flat_ok else float("nan")
    )
    out["n_labels_defined"] = int(ok.sum())
    out["n"] = len(y)
    return out


def multiclass_metrics(y_true: np.ndarray, p: np.ndarray, names: list[str] | None = None) -> dict[str, float]:
    """Accuracy, macro / weighted F1, Cohen's kappa (plain and linear-weighted), macro one-vs-rest AUROC.

    Class predictions are the argmax of the probabilities. The one-vs-rest AUROC of a class is defined when the
    class is present and not the only one in `y_true`; the macro average runs over those classes.
    """
    y = np.asarray(y_true).ravel().astype(np.int64)
    p = _check_probs(p, "multiclass metrics")
    if p.ndim != 2 or len(y) != len(p):
        raise MetricInputError(f"multiclass metrics: labels {y.shape}, scores {p.shape} (expected [n, K])")
    k = p.shape[1]
    names = names or [str(c) for c in range(k)]
    if len(p) and not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise MetricInputError(
            "multiclass metrics: each row of scores must sum to 1 (apply softmax to logits)"
        )
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise MetricInputError(f"multiclass metrics: labels must be classes 0..{k - 1}")
    pred = p.argmax(axis=1)
    out: dict[str, float] = {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "f1_macro": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "f1_weighted": float(skm.f1_score(y, pred, average="weighted", zero_division=0)),
        "kappa": float(skm.cohen_kappa_score(y, pred)),
        "kappa_linear": float(skm.cohen_kappa_score(y, pred, weights="linear")),
    }
    aucs = np.full(k, np.nan)
    for c in range(k):
        yc = (y == c).astype(np.int64)
        if _both_classes(yc):
            aucs[c] = skm.roc_auc_score(yc, p[:, c])
        out[f"auroc/{names[c]}"] = float(aucs[c])
        out[f"prevalence/{names[c]}"] = float(yc.mean()) if len(y) else float("nan")
    ok = ~np.isnan(aucs)
    out["auroc_ovr_macro"] = float(aucs[ok].mean()) if ok.any() else float("nan")
    out["n"] = len(y)
    return out


def compute_metrics(task: str, y_true: np.ndarray, p: np.ndarray, names: list[str]) -> dict[str, float]:
    """Metrics of a task's probabilities, by the task's kind (`tasks`): binary, multilabel or multiclass."""
    kind = get_task(task).kind
    if kind == "binary":
        return binary_metrics(y_true, p)
    if kind == "multilabel":
        return multilabel_metrics(y_true, p, names)
    return multiclass_metrics(y_true, p, names)


def epoch_metrics(task: str, y_true: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The task's selection metric and per-epoch logged metrics (`tasks.TaskSpec`), for validation every epoch.

    Same definitions as `compute_metrics` (a label or class without both classes is left out of a macro average;
    NaN when none is defined), but the rank metrics of all labels come from one vectorised sort
    (`statistics.rank_metrics_rows`) instead of one scikit-learn call per label: about 1 ms instead of about
    0.3 s for 25 phenotypes of a few hundred stays, i.e. seconds per quick run. The values equal scikit-learn's to
    float rounding (a few 1e-16; tests/test_metrics.py); the final test metrics still come from `compute_metrics`.
    """
    from carebench.evaluation.statistics import rank_metrics_rows  # statistics imports this module

    spec = get_task(task)
    wanted = {spec.selection_metric, *spec.logged}
    y = np.asarray(y_true)
    p = _check_probs(p, "validation metrics")
    out: dict[str, float] = {}

    def ranked(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row AUROC and AP; NaN for a row whose labels lack a class."""
        return rank_metrics_rows(labels, scores)

    def mean_defined(vals: np.ndarray) -> float:
        ok = ~np.isnan(vals)
        return float(vals[ok].mean()) if ok.any() else float("nan")

    if spec.kind == "binary":
        y, p = y.ravel().astype(np.int64), p.ravel()
        auc, ap = ranked(y, p)
        out.update(auroc=float(auc[0]), auprc=float(ap[0]), brier=float(np.mean((y - p) ** 2)))
    elif spec.kind == "multilabel":
        y = y.astype(np.int64)
        auc, ap = ranked(y.T, p.T)
        micro_auc, micro_ap = ranked(y.ravel(), p.ravel())
        out.update(
            auroc_macro=mean_defined(auc),
            auprc_macro=mean_defined(ap),
            auroc_micro=float(micro_auc[0]),
            auprc_micro=float(micro_ap[0]),
        )
    else:
        y = y.ravel().astype(np.int64)
        pred = p.argmax(axis=1)
        onehot = (y[None, :] == np.arange(p.shape[1])[:, None]).astype(np.int64)
        auc, _ = ranked(onehot, p.T)
        out.update(
            accuracy=float(skm.accuracy_score(y, pred)),
            kappa=float(skm.cohen_kappa_score(y, pred)),
            kappa_linear=float(skm.cohen_kappa_score(y, pred, weights="linear")),
            auroc_ovr_macro=mean_defined(auc),
        )
    missing = wanted - set(out)
    if missing:
        raise MetricInputError(f"task {task!r}: no per-epoch implementation of {sorted(missing)}")
    return {k: out[k] for k in sorted(wanted)}
