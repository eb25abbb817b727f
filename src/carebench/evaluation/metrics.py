"""Performance metrics of one set of predictions, always from probabilities (never logits).

Why a module of our own around scikit-learn: the reference computed threshold metrics and ECE on whatever a model
returned (logits for eight models), crashed or skipped labels with a single class, and had no AUROC for LOS.
Here every function checks that its scores are probabilities, uses scikit-learn for each number (so results equal
sklearn's), and defines the degenerate cases:

- A rank metric (AUROC, AUPRC) of a label with only one class in `y_true` is NaN; macro / weighted averages are
  taken over the labels where it is defined (with every label defined they equal sklearn's averages).
- Threshold metrics (binary accuracy, F1, precision, recall = sensitivity, specificity; multilabel macro F1) use
  `p >= threshold` and sklearn's `zero_division=0`. The threshold is an argument: a run chooses it on its
  VALIDATION predictions by its task's rule (`choose_threshold`, `task_thresholds`: max F1 or Youden per output)
  and passes it; without one the functions fall back to 0.5 (logit >= 0), the kernels' neutral default. A label
  whose threshold is NaN (one class in validation) has no thresholded metric.
- ECE: 10 equal-width bins [i/10, (i+1)/10), the last one closed so p = 1 counts; sum over bins of
  (bin size / n) x |mean p - mean y|.

Keys are flat: overall metrics by name (`auroc`, `auprc_macro`, ...), per label or class `metric/<name>`.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from carebench.errors import UserError
from carebench.tasks import THRESHOLD_RULES, get_task


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


def choose_threshold(y_val, p_val, rule: str | float = "youden") -> float | np.ndarray:
    """Decision threshold(s) from VALIDATION predictions (never the test set); decisions are `p >= threshold`.

    rule "youden": the score maximising TPR - FPR; "f1": the score maximising F1; a number in [0, 1]: that
    number. Ties go to the highest threshold (fewest positive decisions). The chosen value is one of the scores.
    `y_val` [n] gives a float (an error if the validation labels have one class); [n, L] gives one threshold
    per label, NaN for a label with one class in validation.
    """
    if not isinstance(rule, str):
        if isinstance(rule, bool) or not isinstance(rule, int | float) or not 0.0 <= rule <= 1.0:
            raise MetricInputError(
                f"threshold rule: expected 'youden', 'f1' or a number in [0, 1], got {rule!r}"
            )
        return float(rule)
    if rule not in ("youden", "f1"):
        raise MetricInputError(f"threshold rule: expected one of ('youden', 'f1') or a number, got {rule!r}")
    y = np.asarray(y_val)
    s = np.asarray(p_val, dtype=np.float64)
    if y.shape != s.shape or y.ndim not in (1, 2):
        raise MetricInputError(f"choose_threshold: validation labels {y.shape} and scores {s.shape} differ")
    if y.ndim == 2:
        return np.array(
            [
                choose_threshold(y[:, j], s[:, j], rule) if _both_classes(y[:, j]) else np.nan
                for j in range(y.shape[1])
            ]
        )
    if not _both_classes(y):
        raise MetricInputError(
            f"choose_threshold: the validation labels have one class only; rule {rule!r} "
            "needs both (pass a fixed threshold)"
        )
    if rule == "youden":
        fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
        j = (tpr - fpr)[1:]  # thresholds decrease; index 0 is +inf (no positive decision)
        return float(thr[1:][int(np.argmax(j))])  # first maximum = highest threshold
    prec, rec, thr = skm.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * prec[:-1] * rec[:-1] / (prec[:-1] + rec[:-1]))
    best = np.flatnonzero(f1 == f1.max())
    return float(thr[best[-1]])  # thresholds increase: last maximum = highest threshold


def task_thresholds(task: str, y_val: np.ndarray, p_val: np.ndarray) -> np.ndarray | None:
    """The decision thresholds of a task's outputs by its rule (`TaskSpec.threshold`), chosen on VALIDATION
    predictions: [outputs] (NaN for an output whose validation labels have one class), or None for a multiclass
    task (decided by the argmax class)."""
    spec = get_task(task)
    if spec.threshold not in THRESHOLD_RULES[spec.kind]:
        raise MetricInputError(
            f"task {task!r}: threshold rule {spec.threshold!r} does not fit a {spec.kind} task"
        )
    if spec.kind == "multiclass":
        return None
    y = np.asarray(y_val).reshape(len(y_val), -1)
    p = np.asarray(p_val, dtype=np.float64).reshape(len(p_val), -1)
    return np.asarray(choose_threshold(y, p, spec.threshold), dtype=np.float64)


def binary_metrics(y_true: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, AUPRC (average precision), and at `threshold` accuracy, F1, precision, recall (= sensitivity),
    specificity; Brier, ECE. A NaN threshold (undefined on validation) leaves the thresholded metrics NaN."""
    y = np.asarray(y_true).ravel().astype(np.int64)
    p = _check_probs(p, "binary metrics").ravel()
    if y.shape != p.shape:
        raise MetricInputError(f"binary metrics: {len(y)} labels but {len(p)} scores")
    ranked = _both_classes(y)
    out = {
        "auroc": float(skm.roc_auc_score(y, p)) if ranked else float("nan"),
        "auprc": float(skm.average_precision_score(y, p)) if ranked else float("nan"),
        "accuracy": float("nan"),
        "f1": float("nan"),
        "precision": float("nan"),
        "recall": float("nan"),
        "specificity": float("nan"),
        "brier": float(skm.brier_score_loss(y, p, labels=[0, 1])),
        "ece": expected_calibration_error(y, p),
        "prevalence": float(y.mean()) if len(y) else float("nan"),
        "n": len(y),
    }
    if not np.isnan(threshold):
        pred = (p >= threshold).astype(np.int64)
        out.update(
            accuracy=float(skm.accuracy_score(y, pred)),
            f1=float(skm.f1_score(y, pred, zero_division=0)),
            precision=float(skm.precision_score(y, pred, zero_division=0)),
            recall=float(skm.recall_score(y, pred, zero_division=0)),
            specificity=float(skm.recall_score(y, pred, pos_label=0, zero_division=0)),
        )
    return out


def multilabel_metrics(
    y_true: np.ndarray, p: np.ndarray, names: list[str], thresholds: np.ndarray | float | None = None
) -> dict[str, float]:
    """Per label AUROC / AUPRC / prevalence, and their macro, micro and (positive-support) weighted averages; the
    macro F1 at the per-label `thresholds` (default 0.5), over the labels whose threshold is defined."""
    y = np.asarray(y_true).astype(np.int64)
    p = _check_probs(p, "multilabel metrics")
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(names):
        raise MetricInputError(f"multilabel metrics: labels {y.shape}, scores {p.shape}, {len(names)} names")
    thr = np.broadcast_to(
        np.asarray(0.5 if thresholds is None else thresholds, dtype=np.float64), (len(names),)
    )
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
    decided = ~np.isnan(thr)
    f1 = [
        skm.f1_score(y[:, j], (p[:, j] >= thr[j]).astype(np.int64), zero_division=0)
        for j in np.flatnonzero(decided)
    ]
    out["f1_macro"] = float(np.mean(f1)) if f1 else float("nan")
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


def compute_metrics(
    task: str,
    y_true: np.ndarray,
    p: np.ndarray,
    names: list[str],
    thresholds: np.ndarray | float | None = None,
) -> dict[str, float]:
    """Metrics of a task's probabilities, by the task's kind (`tasks`): binary, multilabel or multiclass.

    `thresholds`: the decision thresholds of the outputs, chosen on validation (`task_thresholds`); without them
    the thresholded metrics are at 0.5. Multiclass decides by the argmax class (no threshold).
    """
    kind = get_task(task).kind
    if kind == "binary":
        t = 0.5 if thresholds is None else float(np.asarray(thresholds, dtype=np.float64).reshape(-1)[0])
        return binary_metrics(y_true, p, threshold=t)
    if kind == "multilabel":
        return multilabel_metrics(y_true, p, names, thresholds)
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
