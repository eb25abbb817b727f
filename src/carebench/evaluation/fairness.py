"""Group fairness kernels: per-group metrics, cross-group gaps, parity, bootstrap CIs (arrays in, tables out).

Why a module of our own around fairlearn (docs/fairness.md has the full definitions): the reference toolkit
(CareBench) thresholded at 0.5 whatever the model returned, called the minimum "worst" also for FPR and
ECE, averaged LOS one-vs-rest rates over class *indices* 0..k-1 instead of the classes present, mutated its age-bin
list, built slash-joined keys that are ambiguous for groups such as "BLACK/AFRICAN AMERICAN", and reported a
correlation of 0.0 for every metric when `has_cxr` was itself an attribute. Here:

- the decision threshold is chosen on *validation* predictions (`choose_threshold`) and passed in;
- per-group numbers come from weighted kernels (`weighted_group_metrics`: rank metrics by
  `statistics.weighted_rank_metrics`, the rest by one matrix product), used with unit weights for the point
  estimates and with bootstrap counts for the CIs, so both share one definition. They equal fairlearn's
  `MetricFrame` with scikit-learn metrics (tested); `engine="fairlearn"` computes the table with MetricFrame
  itself. MetricFrame is not the default because its per-group, per-metric Python calls cost about 0.3 s per
  attribute and label: 190 s for the 25 phenotype labels of 5,000 stays, against seconds here;
- groups with fewer than `min_group_size` stays are suppressed: no metric and no count is reported
  (PhysioNet's data use agreement forbids publishing cells of fewer than 10 patients);
- "worst" is direction-aware; the parity differences equal fairlearn's definitions;
- bootstrap CIs resample stays of the test set (`statistics.bootstrap_weights`, the same draws as the
  overall-metric CIs for a seed); every resample is evaluated for all groups, labels and gaps at once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, count, false_positive_rate, selection_rate, true_positive_rate
from sklearn import metrics as skm

from carebench.errors import UserError
from carebench.evaluation.metrics import MetricInputError, expected_calibration_error
from carebench.evaluation.metrics import choose_threshold as _choose_threshold
from carebench.evaluation.options import DEFAULTS, RESERVED_ATTRIBUTE_NAMES
from carebench.evaluation.statistics import RankScorer, bootstrap_weights, weighted_rank_metrics

AGE_EDGES = (0.0, 40.0, 60.0, 80.0, math.inf)
AGE_LABELS = ("0-40", "40-60", "60-80", "80+")
METRICS = ("auroc", "auprc", "tpr", "fpr", "ece", "positive_rate")
# Which direction is better, for "worst group": None = no direction (a selection rate is neither good nor bad).
HIGHER_IS_BETTER = {
    "auroc": True,
    "auprc": True,
    "tpr": True,
    "fpr": False,
    "ece": False,
    "positive_rate": None,
}
UNKNOWN = "Unknown"
OVERALL = "overall"
MACRO = "macro"
JOIN = " & "  # display label of an intersection; the attribute columns hold the exact values
MIN_CORRELATION_GROUPS = 3  # with two groups a Pearson correlation is always +-1
THRESHOLD_RULES = ("youden", "f1")
_RESERVED = RESERVED_ATTRIBUTE_NAMES | set(METRICS)


class FairnessInputError(UserError, ValueError):
    """Labels, scores, groups or options of a fairness analysis that do not fit together."""


# ------------------------------------------------------------------------------------------------ attributes
def age_bands(age: Sequence[float] | pd.Series | np.ndarray) -> pd.Series:
    """Age in years -> ordered categories "0-40" [0, 40), "40-60" [40, 60), "60-80" [60, 80), "80+" [80, inf).

    Left-closed bins, so 40 is "40-60" and 39.99 is "0-40". A missing age stays missing (reported as "Unknown");
    a negative age is an error. The input is not modified.
    """
    index = age.index if isinstance(age, pd.Series) else None
    try:
        a = np.asarray(age, dtype=np.float64)
    except (TypeError, ValueError):
        raise FairnessInputError("age: expected numbers (years)") from None
    if np.any(a[~np.isnan(a)] < 0):
        raise FairnessInputError(f"age: expected years >= 0, got minimum {np.nanmin(a):g}")
    bands = pd.cut(a, bins=list(AGE_EDGES), right=False, labels=list(AGE_LABELS))
    return pd.Series(bands, index=index, name="age_band")


def _as_labels(col: pd.Series) -> pd.Series:
    """Group values as strings; missing -> "Unknown" (bool -> "True"/"False", categories by their label)."""
    s = col.astype(object)
    return s.where(s.notna(), UNKNOWN).map(str)


def _specs(
    groups: pd.DataFrame, attributes: Iterable[str] | None, intersections: Iterable[Sequence[str]]
) -> list[tuple[str, tuple[str, ...]]]:
    """(attribute name, columns) for the overall row, each attribute and each intersection; validated.
    `attributes` None = every column of `groups`."""
    if attributes is None:
        attributes = list(groups.columns)
    attributes = [attributes] if isinstance(attributes, str) else list(attributes)
    inter = [tuple(i) for i in intersections]
    for cols in inter:
        if len(cols) < 2 or len(set(cols)) != len(cols):
            raise FairnessInputError(
                f"intersections: each must name two or more different attributes, got {cols}"
            )
    used = list(dict.fromkeys([*attributes, *(c for cols in inter for c in cols)]))
    missing = [c for c in used if c not in groups.columns]
    if missing:
        raise FairnessInputError(f"groups: missing attribute columns {missing}; have {list(groups.columns)}")
    clash = sorted(set(used) & _RESERVED)
    if clash:
        raise FairnessInputError(f"groups: attribute names {clash} clash with columns of the result table")
    return [(OVERALL, ()), *((a, (a,)) for a in attributes), *((":".join(c), c) for c in inter)]


def _members(groups: pd.DataFrame, cols: tuple[str, ...]) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """(values, row positions) of each non-empty group of `cols`, in sorted order of the values."""
    if not cols:
        return [((), np.arange(len(groups)))]
    keys = pd.DataFrame({c: _as_labels(groups[c]).to_numpy() for c in cols})
    idx = keys.groupby(list(cols), sort=True).indices
    return [((k,) if isinstance(k, str) else tuple(k), v) for k, v in idx.items()]


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class _Problem:
    """A task as binary problems, one per label: y [n, L] in {0, 1}, scores [n, L], decisions [n, L]."""

    kind: str
    names: list[str]
    y: np.ndarray
    p: np.ndarray
    pred: np.ndarray
    thresholds: np.ndarray  # [L]; NaN for multiclass (decision = argmax)

    @property
    def undecided(self) -> np.ndarray:
        """[L] labels without a decision threshold (NaN for a binary/multilabel label): no TPR/FPR/rate."""
        return np.isnan(self.thresholds) if self.kind != "multiclass" else np.zeros(len(self.names), bool)


_DECISION_METRICS = ("tpr", "fpr", "positive_rate")


def _mask_undecided(prob: _Problem, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Set the decision metrics of labels without a threshold to NaN (values: metric -> [L, ...])."""
    if prob.undecided.any():
        for m in _DECISION_METRICS:
            values[m] = values[m].astype(np.float64, copy=True)
            values[m][prob.undecided] = np.nan
    return values


def _prepare(y_true, p, threshold, labels, n_groups: int) -> _Problem:
    y = np.asarray(y_true)
    s = np.asarray(p, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1 and (y.ndim == 1 or y.shape[1:] == (1,)):
        s = s[:, 0]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if s.ndim not in (1, 2) or len(s) != len(y) or len(y) != n_groups:
        raise FairnessInputError(
            f"labels {y.shape}, scores {s.shape} and {n_groups} group rows must describe the same stays"
        )
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0 or s.max() > 1):
        raise FairnessInputError("scores must be probabilities in [0, 1] (apply sigmoid/softmax to logits)")
    if s.ndim == 2 and y.ndim == 1:
        kind, k = "multiclass", s.shape[1]
        if threshold is not None:
            raise FairnessInputError(
                "threshold: a multiclass task (LOS) decides by the argmax class; pass None"
            )
        if len(y) and (not np.all(np.isin(y, np.arange(k)))):
            raise FairnessInputError(f"multiclass labels must be classes 0..{k - 1}")
        if len(s) and not np.allclose(s.sum(1), 1.0, atol=1e-4):
            raise FairnessInputError("multiclass scores: each row must sum to 1 (apply softmax)")
        yb = (y[:, None] == np.arange(k)[None, :]).astype(np.int64)
        pred = (s.argmax(1)[:, None] == np.arange(k)[None, :]).astype(np.int64)
        thr = np.full(k, np.nan)
        default_names = [f"class_{c}" for c in range(k)]
    else:
        kind = "binary" if s.ndim == 1 else "multilabel"
        if y.shape != s.shape:
            raise FairnessInputError(f"labels {y.shape} and scores {s.shape} must have the same shape")
        if not np.all(np.isin(y, (0, 1))):
            raise FairnessInputError(f"{kind} labels must be 0 or 1")
        yb, s = y.reshape(len(y), -1).astype(np.int64), s.reshape(len(s), -1)
        if threshold is None:
            raise FairnessInputError(
                "threshold: required for binary/multilabel tasks; choose it on validation "
                "predictions with choose_threshold()"
            )
        try:
            thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (s.shape[1],)).copy()
        except (TypeError, ValueError):
            thr = None
        if thr is None or not np.all(((thr >= 0) & (thr <= 1)) | (np.isnan(thr) & (kind == "multilabel"))):
            raise FairnessInputError(
                f"threshold: expected a number in [0, 1] or one per label ({s.shape[1]}; "
                "NaN = no decision for that label)"
            )
        pred = (s >= thr[None, :]).astype(np.int64)
        default_names = ["y"] if kind == "binary" else [f"label_{j}" for j in range(s.shape[1])]
    names = list(labels) if labels is not None else default_names
    if isinstance(labels, str) or len(names) != yb.shape[1]:
        raise FairnessInputError(f"labels: expected a list of {yb.shape[1]} names, got {labels!r}")
    return _Problem(kind, names, yb, s, pred, thr)


# ------------------------------------------------------------------------------------------------ thresholds
def choose_threshold(y_val, p_val, rule: str | float = "youden") -> float | np.ndarray:
    """`metrics.choose_threshold` (thresholds from VALIDATION predictions, never the test set): "youden" maximises
    TPR - FPR, "f1" maximises F1, a number is used as it is; per label for [n, L] inputs, NaN for a label with
    one class in validation (its TPR, FPR and positive rate are then reported as undefined)."""
    try:
        return _choose_threshold(y_val, p_val, rule)
    except MetricInputError as e:
        raise FairnessInputError(str(e)) from None


# ------------------------------------------------------------------------------------------------ kernels
_N_SUMS = 5  # columns of _features before the calibration bins: 1, y, y*d, (1-y)*d, d


def _features(s: np.ndarray, y: np.ndarray, d: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-stay quantities [m, 5 + 2 n_bins] whose weighted sums give every non-rank metric of a group."""
    m = len(s)
    out = np.zeros((m, _N_SUMS + 2 * n_bins))
    y, d = y.astype(np.float64), d.astype(np.float64)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3], out[:, 4] = 1.0, y, y * d, (1 - y) * d, d
    b = np.minimum(
        (s * n_bins).astype(np.int64), n_bins - 1
    )  # ECE bins as metrics.expected_calibration_error
    out[np.arange(m), _N_SUMS + b] = s
    out[np.arange(m), _N_SUMS + n_bins + b] = y
    return out


def _from_sums(sums: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """[r, 5 + 2 n_bins] weighted sums -> n, n_pos, TPR, FPR, positive rate, ECE per row (NaN if undefined)."""
    n, npos, tp, fp, dec = (sums[:, i] for i in range(_N_SUMS))
    nneg = n - npos
    sp, sy = sums[:, _N_SUMS : _N_SUMS + n_bins], sums[:, _N_SUMS + n_bins :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "n": n,
            "n_pos": npos,
            "tpr": np.where(npos > 0, tp / npos, np.nan),
            "fpr": np.where(nneg > 0, fp / nneg, np.nan),
            "positive_rate": np.where(n > 0, dec / n, np.nan),
            "ece": np.where(n > 0, np.abs(sp - sy).sum(1) / n, np.nan),
        }


def _int_weights(w, m: int) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] != m or not np.issubdtype(w.dtype, np.integer) or (w < 0).any():
        raise FairnessInputError(f"weights: expected non-negative integers of shape [B, {m}]")
    return w


def weighted_group_metrics(
    s: np.ndarray, y: np.ndarray, pred: np.ndarray, w: np.ndarray, n_bins: int = 10
) -> dict[str, np.ndarray]:
    """The group metrics of B integer weightings of one group's stays at once (bootstrap counts, or ones).

    s, y, pred [m]: scores, 0/1 labels, 0/1 decisions; w [B, m] non-negative integers. Each returned [B] array
    equals the metric of the data with every stay repeated w times: AUROC and AUPRC by the rank kernel of
    `statistics.weighted_rank_metrics` (= scikit-learn, ties included), TPR, FPR, positive rate and ECE
    (`metrics.expected_calibration_error`'s bins) from one matrix product of the weights with per-stay
    quantities. NaN where undefined (AUROC/AUPRC need both classes, TPR positives, FPR negatives).
    """
    s, y, pred = np.asarray(s, np.float64), np.asarray(y), np.asarray(pred)
    w = _int_weights(w, len(s))
    out = _from_sums(w.astype(np.float64) @ _features(s, y, pred, n_bins), n_bins)
    out["auroc"], out["auprc"] = weighted_rank_metrics(y, s, w)
    return out


class _GroupKernel:
    """`weighted_group_metrics` of every label of one group's stays, prepared once: the per-stay quantities of
    all labels side by side and each label's sorted scores, reused by every block of bootstrap weights."""

    def __init__(self, prob: _Problem, idx: np.ndarray, n_bins: int) -> None:
        self.prob, self.n_bins = prob, n_bins
        self.feats = np.concatenate(
            [
                _features(prob.p[idx, j], prob.y[idx, j], prob.pred[idx, j], n_bins)
                for j in range(len(prob.names))
            ],
            axis=1,
        )
        self.scorers = [RankScorer(prob.y[idx, j], prob.p[idx, j]) for j in range(len(prob.names))]

    def __call__(self, wt: np.ndarray) -> dict[str, np.ndarray]:
        """Integer weights wt [len(idx), B] (stays x weightings) -> metric: [L, B]."""
        k = _N_SUMS + 2 * self.n_bins
        sums = wt.T.astype(np.float64) @ self.feats  # one product for all labels
        max_total = int(wt.sum(axis=0, dtype=np.int64).max(initial=0))
        per = []
        for j, scorer in enumerate(self.scorers):
            res = _from_sums(sums[:, j * k : (j + 1) * k], self.n_bins)
            res["auroc"], res["auprc"] = scorer(wt, max_total)
            per.append(res)
        return _mask_undecided(
            self.prob, {m: np.stack([r[m] for r in per]) for m in ("n", "n_pos", *METRICS)}
        )


# ------------------------------------------------------------------------------------------------ point estimates
def _both(y) -> bool:
    return bool(np.any(y == 1) and np.any(y == 0))


def _mf_auroc(y_true, y_pred, scores):
    return float(skm.roc_auc_score(y_true, scores)) if _both(np.asarray(y_true)) else np.nan


def _mf_auprc(y_true, y_pred, scores):
    return float(skm.average_precision_score(y_true, scores)) if _both(np.asarray(y_true)) else np.nan


def _mf_ece(y_true, y_pred, scores, n_bins):
    return expected_calibration_error(y_true, scores, n_bins=int(n_bins[0]))


def _mf_tpr(y_true, y_pred):
    return (
        float(true_positive_rate(y_true, y_pred, pos_label=1)) if np.any(np.asarray(y_true) == 1) else np.nan
    )


def _mf_fpr(y_true, y_pred):
    return (
        float(false_positive_rate(y_true, y_pred, pos_label=1)) if np.any(np.asarray(y_true) == 0) else np.nan
    )


def _mf_rate(y_true, y_pred):
    return float(selection_rate(y_true, y_pred, pos_label=1))


def _mf_npos(y_true, y_pred):
    return int(np.sum(y_true))


_MF_METRICS = {
    "n": count,
    "n_pos": _mf_npos,
    "auroc": _mf_auroc,
    "auprc": _mf_auprc,
    "tpr": _mf_tpr,
    "fpr": _mf_fpr,
    "ece": _mf_ece,
    "positive_rate": _mf_rate,
}


def _point_fairlearn(
    prob: _Problem,
    groups: pd.DataFrame,
    cols: tuple[str, ...],
    members: list[tuple[tuple[str, ...], np.ndarray]],
    n_bins: int,
) -> list[dict[str, np.ndarray]]:
    """Per group, metric -> [L] values from one fairlearn MetricFrame per label."""
    keys = (
        pd.DataFrame({c: _as_labels(groups[c]).to_numpy() for c in cols})
        if cols
        else pd.DataFrame({"all": np.zeros(len(groups), dtype=np.int64)})
    )
    by_label = []
    for j in range(len(prob.names)):
        scores = prob.p[:, j]
        mf = MetricFrame(
            metrics=_MF_METRICS,
            y_true=prob.y[:, j],
            y_pred=prob.pred[:, j],
            sensitive_features=keys,
            sample_params={
                "auroc": {"scores": scores},
                "auprc": {"scores": scores},
                "ece": {"scores": scores, "n_bins": np.full(len(groups), n_bins)},
            },
        )
        by_label.append(mf.by_group)
    out = []
    for vals, _ in members:
        key = 0 if not cols else (vals[0] if len(vals) == 1 else vals)
        out.append(
            _mask_undecided(
                prob,
                {m: np.array([float(by.loc[key][m]) for by in by_label]) for m in ("n", "n_pos", *METRICS)},
            )
        )
    return out


def _point_kernel(
    prob: _Problem, members: list[tuple[tuple[str, ...], np.ndarray]], n_bins: int, min_group_size: int
) -> list[dict[str, np.ndarray] | None]:
    """Per group, metric -> [L] values from the weighted kernels with unit weights (None if suppressed)."""
    return [
        None
        if len(idx) < min_group_size
        else {
            m: v[:, 0] for m, v in _GroupKernel(prob, idx, n_bins)(np.ones((len(idx), 1), np.int64)).items()
        }
        for _, idx in members
    ]


def _check_options(min_group_size, n_bins) -> None:
    if isinstance(min_group_size, bool) or not isinstance(min_group_size, int) or min_group_size < 1:
        raise FairnessInputError(f"min_group_size: expected an integer >= 1, got {min_group_size!r}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise FairnessInputError(f"n_bins: expected an integer >= 1, got {n_bins!r}")


def _cxr_missing(groups: pd.DataFrame, cxr_available) -> np.ndarray | None:
    """1.0 where the stay had no X-ray, from the boolean availability (never from its string labels)."""
    if cxr_available is None:
        if "has_cxr" not in groups.columns:
            return None
        cxr_available = groups["has_cxr"]
    a = pd.Series(cxr_available).to_numpy()
    if len(a) != len(groups) or pd.isna(a).any():
        raise FairnessInputError("cxr_available: expected one True/False per stay of the groups table")
    return 1.0 - a.astype(bool).astype(np.float64)


ENGINES = ("kernel", "fairlearn")


def group_metrics(
    y_true,
    p,
    groups: pd.DataFrame,
    threshold: float | Sequence[float] | None = None,
    *,
    labels: Sequence[str] | None = None,
    attributes: Iterable[str] | None = None,
    intersections: Iterable[Sequence[str]] = (),
    min_group_size: int = 10,
    cxr_available=None,
    n_bins: int = 10,
    engine: str = "kernel",
) -> pd.DataFrame:
    """Per-group AUROC, AUPRC, TPR, FPR, ECE, positive (selection) rate and size, as a tidy table.

    Shapes: binary y [n], p [n]; multilabel y [n, L], p [n, L]; multiclass (LOS) y [n] classes, p [n, K], where
    each class is a one-vs-rest problem with decision "argmax = class". `groups` has one row per stay (same
    order) with the attribute columns. `threshold` (binary/multilabel): chosen on validation; one per label
    allowed. Rows: the overall row (attribute "overall", group "all"), each attribute's groups and each
    intersection's groups (attribute "a:b", group "x & y"; the columns named after the attributes hold the
    exact values). Multi-label and multiclass tasks get one row per label plus label "macro" (mean over the
    labels where the metric is defined). Groups with n < min_group_size: `suppressed`, metrics and counts NA.
    `missing_cxr_rate` is the share of the group's stays without an X-ray (`cxr_available`, default
    groups["has_cxr"]). `engine`: "kernel" (default; the same code as the bootstrap, seconds for 25 labels) or
    "fairlearn" (one fairlearn MetricFrame per attribute and label; identical numbers, minutes for 25 labels).
    """
    _check_options(min_group_size, n_bins)
    if engine not in ENGINES:
        raise FairnessInputError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if not isinstance(groups, pd.DataFrame):
        raise FairnessInputError("groups: expected a pandas DataFrame of attribute columns, one row per stay")
    groups = groups.reset_index(drop=True)
    prob = _prepare(y_true, p, threshold, labels, len(groups))
    specs = _specs(groups, attributes, intersections)
    missing = _cxr_missing(groups, cxr_available)
    attr_cols = list(dict.fromkeys(c for _, cols in specs for c in cols))
    rows: list[dict] = []
    for name, cols in specs:
        members = _members(groups, cols)
        values = (
            _point_kernel(prob, members, n_bins, min_group_size)
            if engine == "kernel"
            else _point_fairlearn(prob, groups, cols, members, n_bins)
        )
        for (vals, idx), val in zip(members, values, strict=True):
            base = {
                "attribute": name,
                "group": JOIN.join(vals) if vals else "all",
                **{c: (vals[cols.index(c)] if c in cols else None) for c in attr_cols},
            }
            small = len(idx) < min_group_size
            miss = float(missing[idx].mean()) if missing is not None and not small else np.nan
            recs = []
            for j, label in enumerate(prob.names):
                rec = {
                    "label": label,
                    **base,
                    "n": len(idx),
                    "n_pos": None,
                    **{m: np.nan for m in METRICS},
                    "prevalence": np.nan,
                    "threshold": float(prob.thresholds[j]),
                    "missing_cxr_rate": miss,
                    "suppressed": small,
                }
                if not small:
                    rec.update(
                        {
                            "n_pos": round(float(val["n_pos"][j])),
                            **{m: float(val[m][j]) for m in METRICS},
                            "prevalence": float(val["n_pos"][j]) / len(idx),
                        }
                    )
                else:
                    rec["n"] = None
                recs.append(rec)
            if len(prob.names) > 1:
                mean = {m: _nanmean([r[m] for r in recs]) for m in (*METRICS, "prevalence")}
                recs.append(
                    {
                        "label": MACRO,
                        **base,
                        "n": None if small else len(idx),
                        "n_pos": None,
                        **mean,
                        "threshold": np.nan,
                        "missing_cxr_rate": miss,
                        "suppressed": small,
                    }
                )
            rows.extend(recs)
    cols_out = [
        "label",
        "attribute",
        "group",
        *attr_cols,
        "n",
        "n_pos",
        *METRICS,
        "prevalence",
        "threshold",
        "missing_cxr_rate",
        "suppressed",
    ]
    table = pd.DataFrame(rows, columns=cols_out)
    for c in ("n", "n_pos"):
        table[c] = pd.array(table[c], dtype="Int64")
    table["suppressed"] = table["suppressed"].astype(bool)
    return table


def _nanmean(vals) -> float:
    a = np.asarray(vals, dtype=np.float64)
    return float(np.nanmean(a)) if np.any(~np.isnan(a)) else np.nan


# ------------------------------------------------------------------------------------------------ summary
PARITY = ("equal_opportunity", "equalized_odds", "demographic_parity")


def _correlation(attribute: str, x: np.ndarray, r: np.ndarray) -> tuple[float, str]:
    """Pearson r between a metric and the missing-X-ray rate over groups, with the reason when undefined."""
    if "has_cxr" in attribute.split(":"):
        return np.nan, "excluded: the attribute defines X-ray availability"
    ok = ~np.isnan(x) & ~np.isnan(r)
    if ok.sum() < MIN_CORRELATION_GROUPS:
        return np.nan, f"fewer than {MIN_CORRELATION_GROUPS} groups"
    if np.ptp(r[ok]) == 0:
        return np.nan, "missing-X-ray rate is the same in every group"
    if np.ptp(x[ok]) == 0:
        return np.nan, "metric is the same in every group"
    return float(np.corrcoef(x[ok], r[ok])[0, 1]), ""


def _spread(values: np.ndarray, names: np.ndarray, metric: str) -> dict:
    ok = ~np.isnan(values)
    v, g = values[ok], names[ok]
    out = {
        "n_groups": int(ok.sum()),
        "min": np.nan,
        "max": np.nan,
        "gap": np.nan,
        "ratio": np.nan,
        "worst_group": None,
        "worst_value": np.nan,
        "best_group": None,
        "best_value": np.nan,
    }
    if len(v) == 0:
        return out
    lo, hi = float(v.min()), float(v.max())
    out.update({"min": lo, "max": hi})
    if len(v) >= 2:
        out.update({"gap": hi - lo, "ratio": lo / hi if hi > 0 else np.nan})
    direction = HIGHER_IS_BETTER.get(metric)
    if direction is not None and len(v) >= 2:
        worst, best = (
            (int(np.argmin(v)), int(np.argmax(v))) if direction else (int(np.argmax(v)), int(np.argmin(v)))
        )
        out.update(
            {
                "worst_group": g[worst],
                "worst_value": float(v[worst]),
                "best_group": g[best],
                "best_value": float(v[best]),
            }
        )
    return out


def fairness_summary(group_table: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Across the non-suppressed groups of each (label, attribute): spread of each metric and parity differences.

    Per metric: n_groups (with the metric defined), min, max, gap = max - min, ratio = min / max (NaN if
    max = 0), worst/best group direction-aware (lowest AUROC, AUPRC, TPR; highest FPR, ECE; none for the
    positive rate), and the Pearson correlation over groups between the metric and the group's missing-X-ray
    rate (`pearson_missing_cxr`, NaN with a reason in `pearson_note` when undefined). Then three rows per
    (label, attribute) with fairlearn's definitions in `gap` and `ratio`: equal_opportunity (TPR), equalized_odds
    (max of the TPR and FPR differences; ratio the min of the two ratios), demographic_parity (positive rate).
    """
    need = {"label", "attribute", "group", "suppressed", "missing_cxr_rate", *metrics}
    missing = sorted(need - set(group_table.columns))
    if missing:
        raise FairnessInputError(
            f"group table: missing columns {missing} (expected the output of group_metrics)"
        )
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise FairnessInputError(f"metrics: unknown {unknown}; expected a subset of {METRICS}")
    rows = []
    table = group_table[(group_table["attribute"] != OVERALL) & ~group_table["suppressed"].astype(bool)]
    for (label, attribute), part in table.groupby(["label", "attribute"], sort=False):
        names = part["group"].to_numpy(dtype=object)
        rate = part["missing_cxr_rate"].to_numpy(dtype=np.float64)
        spreads = {}
        for m in metrics:
            x = part[m].to_numpy(dtype=np.float64)
            spreads[m] = _spread(x, names, m)
            r, note = _correlation(attribute, x, rate)
            rows.append(
                {
                    "label": label,
                    "attribute": attribute,
                    "metric": m,
                    **spreads[m],
                    "direction": {True: "higher_is_better", False: "lower_is_better"}.get(
                        HIGHER_IS_BETTER[m], "none"
                    ),
                    "pearson_missing_cxr": r,
                    "pearson_note": note,
                }
            )
        for m, (gap, ratio) in _parity(part).items():
            rows.append(
                {
                    "label": label,
                    "attribute": attribute,
                    "metric": m,
                    "gap": gap,
                    "ratio": ratio,
                    "direction": "lower_is_better",
                    "pearson_note": "",
                }
            )
    cols = [
        "label",
        "attribute",
        "metric",
        "n_groups",
        "min",
        "max",
        "gap",
        "ratio",
        "worst_group",
        "worst_value",
        "best_group",
        "best_value",
        "direction",
        "pearson_missing_cxr",
        "pearson_note",
    ]
    out = pd.DataFrame(rows, columns=cols)
    out["n_groups"] = pd.array(out["n_groups"], dtype="Int64")
    return out


def _diff_ratio(x: np.ndarray) -> tuple[float, float]:
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return np.nan, np.nan
    return float(x.max() - x.min()), (float(x.min() / x.max()) if x.max() > 0 else np.nan)


def _parity(part: pd.DataFrame) -> dict[str, tuple[float, float]]:
    if not {"tpr", "fpr", "positive_rate"} <= set(part.columns):
        return {}
    tpr = _diff_ratio(part["tpr"].to_numpy(dtype=np.float64))
    fpr = _diff_ratio(part["fpr"].to_numpy(dtype=np.float64))
    eo = (
        max(tpr[0], fpr[0]) if not (np.isnan(tpr[0]) or np.isnan(fpr[0])) else np.nan,
        min(tpr[1], fpr[1]) if not (np.isnan(tpr[1]) or np.isnan(fpr[1])) else np.nan,
    )
    return {
        "equal_opportunity": tpr,
        "equalized_odds": eo,
        "demographic_parity": _diff_ratio(part["positive_rate"].to_numpy(dtype=np.float64)),
    }


# ------------------------------------------------------------------------------------------------ bootstrap
def bootstrap_fairness(
    y_true,
    p,
    groups: pd.DataFrame,
    threshold: float | Sequence[float] | None = None,
    *,
    labels: Sequence[str] | None = None,
    attributes: Iterable[str] | None = None,
    intersections: Iterable[Sequence[str]] = (),
    min_group_size: int = 10,
    n_bins: int = 10,
    n_resamples: int = DEFAULTS.n_bootstrap,
    confidence: float = DEFAULTS.confidence,
    seed: int = DEFAULTS.seed,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Percentile bootstrap CIs of every group metric and of every cross-group gap and parity difference.

    Each resample draws the test stays with replacement (the same resamples for every label, attribute and
    group, so intervals of different groups come from the same draws); thresholds stay fixed (they were chosen
    on validation). Groups suppressed in the point estimate are left out; in a resample a metric that is
    undefined (e.g. no positives drawn) is skipped, and `n_valid` counts the resamples used.
    Returns (group CIs: label, attribute, group, metric, ci_low, ci_high, n_valid;
    summary CIs: label, attribute, metric, ci_low, ci_high, n_valid for `gap` of fairness_summary).
    """
    _check_options(min_group_size, n_bins)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise FairnessInputError(f"n_resamples: expected an integer >= 1, got {n_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise FairnessInputError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    groups = groups.reset_index(drop=True)
    prob = _prepare(y_true, p, threshold, labels, len(groups))
    specs = _specs(groups, attributes, intersections)
    n_labels = len(prob.names)
    members = {
        name: [
            (JOIN.join(v) if v else "all", idx)
            for v, idx in _members(groups, cols)
            if len(idx) >= min_group_size
        ]
        for name, cols in specs
    }
    parts: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {
        (name, g): [] for name, mem in members.items() for g, _ in mem
    }
    kernels = {
        (name, g): (idx, _GroupKernel(prob, idx, n_bins)) for name, mem in members.items() for g, idx in mem
    }
    # The resamples of statistics.bootstrap_weights: the same draws as its overall-metric CIs for the same seed.
    for counts in bootstrap_weights(len(groups), n_resamples, seed):  # [n stays, r resamples]
        for key, (idx, kernel) in kernels.items():
            parts[key].append(kernel(counts[idx]))
    # values[(attribute, group)][metric] -> [L, n_resamples]
    values = {
        key: {m: np.concatenate([b[m] for b in blocks], axis=1) for m in METRICS}
        for key, blocks in parts.items()
    }
    q = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]
    label_names = prob.names + ([MACRO] if n_labels > 1 else [])

    def cis(x: np.ndarray) -> list[tuple[float, float, int]]:
        """(low, high, n_valid) of each row of x [G, B] over its defined resamples."""
        ok = ~np.isnan(x)
        n_ok = ok.sum(axis=1)
        out = [(np.nan, np.nan, 0)] * len(x)
        full = np.flatnonzero(n_ok == x.shape[1])  # the usual case: one vectorised call, same numbers per row
        if len(full):
            lo, hi = np.quantile(x[full], q, axis=1)
            for i, a, b in zip(full, lo, hi, strict=True):
                out[i] = (float(a), float(b), int(x.shape[1]))
        for i in np.flatnonzero((n_ok > 0) & (n_ok < x.shape[1])):
            a, b = np.quantile(x[i][ok[i]], q)
            out[i] = (float(a), float(b), int(n_ok[i]))
        return out

    def per_label(v: np.ndarray, j: int) -> np.ndarray:
        if j < n_labels:
            return v[j]
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", RuntimeWarning
            )  # all labels undefined -> NaN, as the point estimate
            return np.nanmean(v, axis=0)

    group_rows, summary_rows = [], []
    for name, mem in members.items():
        for j, label in enumerate(label_names):
            stacked = {
                m: np.stack([per_label(values[(name, g)][m], j) for g, _ in mem])
                if mem
                else np.empty((0, n_resamples))
                for m in METRICS
            }
            intervals = {m: cis(stacked[m]) for m in METRICS}
            for gi, (g, _) in enumerate(mem):
                for m in METRICS:
                    group_rows.append(
                        {
                            "label": label,
                            "attribute": name,
                            "group": g,
                            "metric": m,
                            **dict(zip(("ci_low", "ci_high", "n_valid"), intervals[m][gi], strict=True)),
                        }
                    )
            if name == OVERALL:
                continue
            gaps = {m: _gap(stacked[m]) for m in METRICS}
            gaps["equal_opportunity"] = gaps["tpr"]
            gaps["equalized_odds"] = np.maximum(gaps["tpr"], gaps["fpr"])  # NaN if either is undefined
            gaps["demographic_parity"] = gaps["positive_rate"]
            gap_intervals = cis(np.stack(list(gaps.values())))
            for m, interval in zip(gaps, gap_intervals, strict=True):
                summary_rows.append(
                    {
                        "label": label,
                        "attribute": name,
                        "metric": m,
                        **dict(zip(("ci_low", "ci_high", "n_valid"), interval, strict=True)),
                    }
                )
    gcols = ["label", "attribute", "group", "metric", "ci_low", "ci_high", "n_valid"]
    scols = ["label", "attribute", "metric", "ci_low", "ci_high", "n_valid"]
    return pd.DataFrame(group_rows, columns=gcols), pd.DataFrame(summary_rows, columns=scols)


def _gap(x: np.ndarray) -> np.ndarray:
    """[G, B] -> [B] max - min over the groups defined in each resample (NaN if fewer than two)."""
    ok = ~np.isnan(x)
    enough = ok.sum(0) >= 2
    hi = np.where(ok, x, -np.inf).max(0, initial=-np.inf)
    lo = np.where(ok, x, np.inf).min(0, initial=np.inf)
    return np.where(enough, hi - lo, np.nan)


# ------------------------------------------------------------------------------------------------ from a run
