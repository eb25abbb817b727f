"""Bootstrap confidence intervals and paired permutation tests of any metric, for comparing models (kernels).

Why kernels of our own rather than scikit-learn in a loop: a comparison of two phenotype models with 10,000
permutations needs 10,000 x 25 labels x 2 models x 2 metrics = 1,000,000 scikit-learn calls (minutes per pair,
hours for all method pairs). Here every metric of `carebench.evaluation.metrics` is computed for a whole batch of
resamples or permutations at once, and equals scikit-learn's value on the materialised resample (tests, 1e-12).

One mechanism serves both procedures: a *weighting* of the stays. A bootstrap resample is a vector of counts
(how often each stay was drawn); a permutation of a paired test is a 0/1 weighting of the 2n pooled predictions
(stay i contributes model a's score to "A*" unless it is swapped, then model b's). The kernels take the weights
as wt [items, R] (R weightings side by side, so a step over the items adds contiguous rows):

- rank metrics (AUROC, average precision) sort the scores once; prefix sums of the weights, in score order, give
  for every positive the weighted number of negatives ranked strictly below and tied with it (Mann-Whitney U
  with half credit for ties = scikit-learn's trapezoidal ROC area), and the weighted positives and items scored
  at or above it, tie block included (= scikit-learn's step-wise average precision). No sort per resample or
  permutation: O(R x items) integer additions. In a permutation B* is the complement of A*, so its prefix sums
  come for free.
- every other metric is a function of weighted sums of per-stay quantities (confusion-matrix cells, squared
  errors, calibration-bin sums), i.e. one matrix product.

Thresholded metrics (binary accuracy/F1/precision/recall/specificity, multilabel macro F1) decide `p >= t` with
the `thresholds` given: one per output, or one per stay and output, as the analysis passes them (each stay's
threshold chosen on the validation split of the run that predicted it; in a paired test each prediction keeps its
own model's threshold). Without thresholds the decision is at 0.5; a NaN threshold makes the output undecided
(its thresholded metrics NaN).

Degenerate resamples: a rank metric is undefined (NaN) on a resample without both classes; an average over
labels or classes (macro, weighted) is undefined when any label or class defined on the full data lost a class,
so every resample averages the same labels. Such resamples are skipped and counted (`n_valid`). Details and the
p-value conventions are in docs/statistics.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.special import ndtr, ndtri

from carebench.errors import UserError
from carebench.evaluation.metrics import _check_probs
from carebench.evaluation.options import DEFAULTS, GROUP_SEP, label_groups_problem
from carebench.tasks import OVERALL_METRICS, THRESHOLDED_METRICS

# Working memory of one rank-kernel call (bytes); the kernel splits the rows of W to stay below it.
CHUNK_BYTES = 32 * 2**20
# Random draws per block. Fixed (not derived from free memory) so results depend only on data, seed and counts.
RNG_BLOCK = 2**22
CUMSUM_MAX_COLUMNS = 32  # prefix sums of at most this many weightings by numpy's cumsum (`_prefix_at`)
# Largest number of stays for which the paired permutation test enumerates all 2**n swap patterns.
MAX_EXACT_STAYS = 20
# Null statistics within this distance of the observed one count as "as extreme" (floating-point ties).
TIE_TOLERANCE = 1e-12

_BINARY_METRICS = OVERALL_METRICS["binary"]
_MULTILABEL_AGG = OVERALL_METRICS["multilabel"]
_MULTICLASS_METRICS = OVERALL_METRICS["multiclass"]
ALTERNATIVES = ("two-sided", "greater", "less")
CI_METHODS = ("percentile", "bca")


class StatisticsInputError(UserError, ValueError):
    """Predictions or options that the statistics cannot use (the message says which and what was expected)."""


# ------------------------------------------------------------------------------------------ rank kernels


@dataclass(frozen=True)
class _RankChannel:
    """One binary ranking problem (scores + 0/1 labels over weighted items), sorted once.

    Positives and negatives are listed in ascending score order (`pos_items`/`neg_items`: the item whose weight
    each carries). For each positive, `neg_below`/`neg_upto`/`pos_below` count the negatives (positives) with a
    strictly lower / lower-or-equal score; the kernels need prefix sums of the weights only at those counts,
    so they are taken at the sorted distinct `neg_points`/`pos_points` (which end with the class size, i.e. the
    total) and read through `*_at` indices. For the pooled predictions of a paired test (entries 0..q-1 are model
    a's, q..2q-1 model b's of the same stays), `pair_a`/`pair_b` give each positive stay's two positions among
    the sorted positives and `pair_swap` the item whose weight says whether the stay is swapped.
    """

    pos_items: np.ndarray
    neg_items: np.ndarray
    neg_below: np.ndarray
    neg_upto: np.ndarray
    pos_below: np.ndarray
    neg_points: np.ndarray
    pos_points: np.ndarray
    below_at: np.ndarray
    upto_at: np.ndarray
    pbelow_at: np.ndarray
    pair_a: np.ndarray | None = None
    pair_b: np.ndarray | None = None
    pair_swap: np.ndarray | None = None


def _rank_channel(
    score: np.ndarray, label: np.ndarray, items: np.ndarray | None = None, paired: bool = False
) -> _RankChannel:
    score = np.asarray(score, dtype=np.float64)
    label = np.asarray(label).astype(bool)
    items = np.arange(len(score)) if items is None else items
    pos_entries, neg_entries = np.flatnonzero(label), np.flatnonzero(~label)
    po = np.argsort(score[pos_entries], kind="stable")
    no = np.argsort(score[neg_entries], kind="stable")
    ps, ns = score[pos_entries[po]], score[neg_entries[no]]
    neg_below, neg_upto = np.searchsorted(ns, ps, "left"), np.searchsorted(ns, ps, "right")
    pos_below = np.searchsorted(ps, ps, "left")
    neg_points = np.unique(np.concatenate([neg_below, neg_upto, [len(ns)]]))
    pos_points = np.unique(np.concatenate([pos_below, [len(ps)]]))
    pair = {}
    if paired:
        q = len(score) // 2
        where = np.empty(len(score), dtype=np.int64)
        where[pos_entries[po]] = np.arange(len(po))
        stays = pos_entries[pos_entries < q]
        pair = {"pair_a": where[stays], "pair_b": where[stays + q], "pair_swap": items[stays + q]}
    return _RankChannel(
        pos_items=items[pos_entries[po]],
        neg_items=items[neg_entries[no]],
        neg_below=neg_below,
        neg_upto=neg_upto,
        pos_below=pos_below,
        neg_points=neg_points,
        pos_points=pos_points,
        below_at=np.searchsorted(neg_points, neg_below),
        upto_at=np.searchsorted(neg_points, neg_upto),
        pbelow_at=np.searchsorted(pos_points, pos_below),
        **pair,
    )


def _prefix_at(wt: np.ndarray, items: np.ndarray, points: np.ndarray, dtype: type) -> np.ndarray:
    """Prefix sums of the weights of `items` (in list order) at sorted `points`: out[t] = rows items[:points[t]].

    A running row of R sums (cache-resident) is advanced segment by segment and copied out at each point: for many
    columns numpy's cumsum, which writes every prefix of every column, is several times slower. For a few columns
    (a point estimate, the observed arrangement of a test) the loop's per-point overhead dominates and cumsum is
    faster (benchmarks/prefix_sums.py measures where they cross); both give the same integers.
    """
    if wt.shape[1] <= CUMSUM_MAX_COLUMNS:
        sums = np.zeros((len(items) + 1, wt.shape[1]), dtype=dtype)
        np.cumsum(wt[items], axis=0, dtype=dtype, out=sums[1:])
        return sums[points]
    out = np.empty((len(points), wt.shape[1]), dtype=dtype)
    acc = np.zeros(wt.shape[1], dtype=dtype)
    j = 0
    for t, x in enumerate(points):
        if x - j == 1:
            np.add(acc, wt[items[j]], out=acc)
        elif x > j:
            np.add(acc, wt[items[j:x]].sum(axis=0, dtype=dtype), out=acc)
        j = x
        out[t] = acc
    return out


def _int_dtype(max_total: int) -> type:
    return np.int16 if max_total <= np.iinfo(np.int16).max else np.int32 if max_total < 2**31 else np.int64


def _rank_kernel(ch: _RankChannel, wt: np.ndarray, max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUROC and average precision of one channel for every column of integer weights wt [items, R].

    `max_total` bounds the sum of a column (it picks the narrowest exact integer type).
    """
    r_total = wt.shape[1]
    auc, ap = np.full(r_total, np.nan), np.full(r_total, np.nan)
    m1, m0 = len(ch.pos_items), len(ch.neg_items)
    if m1 == 0 or m0 == 0:
        return auc, ap
    dtype = _int_dtype(max_total)
    cols = max(
        1, CHUNK_BYTES // (np.dtype(dtype).itemsize * (len(ch.neg_points) + len(ch.pos_points)) + 56 * m1)
    )
    for s in range(0, r_total, cols):
        w = wt[:, s : s + cols]
        cn = _prefix_at(w, ch.neg_items, ch.neg_points, dtype)
        cp = _prefix_at(w, ch.pos_items, ch.pos_points, dtype)
        wp = w[ch.pos_items].astype(np.float64)
        below = cn[ch.below_at].astype(np.float64)
        w1, w0 = cp[-1].astype(np.float64), cn[-1].astype(np.float64)
        u2 = (wp * (below + cn[ch.upto_at])).sum(axis=0)  # 2 x Mann-Whitney U (ties count 1/2)
        tp = w1 - cp[ch.pbelow_at]  # weighted positives scored >= this positive (its tie block included)
        called = tp + (w0 - below)  # ... and all items scored >= it
        prec = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
        ok = (w1 > 0) & (w0 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            auc[s : s + cols] = np.where(ok, u2 / (2.0 * w1 * w0), np.nan)
            ap[s : s + cols] = np.where(ok, (wp * prec).sum(axis=0) / w1, np.nan)
    return auc, ap


def _rank_kernel_paired(
    ch: _RankChannel, wt: np.ndarray, ap: bool = True
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """AUROC and average precision of A* (0/1 weights wt [2q, R]) and B* (weights 1 - wt) of a paired test
    (`ap` False: AUROC only, the average precisions NaN; it skips the positives' prefix sums, about half the work).

    Every stay contributes exactly one of its two scores to A* and the other to B*, so each has n1 positives
    and n0 negatives of weight 1. Prefix sums are taken once, for A*; B*'s follow as prefix_B(x) = x -
    prefix_A(x). Each positive stay then reads the counts at the position of the score it contributes,
    selected with a bit mask rather than np.where (random swaps make a branch per element mispredict).
    """
    r_total = wt.shape[1]
    m1, m0 = len(ch.pos_items), len(ch.neg_items)
    if m1 == 0 or m0 == 0:
        nan = (np.full(r_total, np.nan), np.full(r_total, np.nan))
        return nan, nan
    n1, n0 = m1 // 2, m0 // 2
    dtype = _int_dtype(wt.shape[0])
    size = np.dtype(dtype).itemsize
    cols = max(1, CHUNK_BYTES // (size * (len(ch.neg_points) + len(ch.pos_points) + 12 * n1) + 24 * n1))
    ka, kb = ch.pair_a, ch.pair_b
    ties = not np.array_equal(ch.neg_below, ch.neg_upto)  # some positive ties with a negative
    targets = [(ch.neg_below, ch.below_at, "neg")] + ([(ch.pos_below, ch.pbelow_at, "pos")] if ap else [])
    if ties:
        targets.append((ch.neg_upto, ch.upto_at, "neg"))
    static = [
        (count[ka][:, None].astype(dtype), count[kb][:, None].astype(dtype), at[ka], at[kb], kind)
        for count, at, kind in targets
    ]
    out: list[list[np.ndarray]] = [[], [], [], []]
    for s in range(0, r_total, cols):
        w = wt[:, s : s + cols]
        prefix = {"neg": _prefix_at(w, ch.neg_items, ch.neg_points, dtype)}
        if ap:
            prefix["pos"] = _prefix_at(w, ch.pos_items, ch.pos_points, dtype)
        mask = -w[ch.pair_swap].astype(dtype)  # all bits set where the stay gives its b score to A*
        sides: list[list[np.ndarray]] = [[], []]
        for sa, sb, at_a_idx, at_b_idx, kind in static:
            at_a, at_b = prefix[kind][at_a_idx], prefix[kind][at_b_idx]  # A*'s counts at the a and b score
            sides[0].append(at_a + ((at_b - at_a) & mask))
            comp_a, comp_b = sa - at_a, sb - at_b  # B*'s counts there (B* = complement of A*)
            sides[1].append(comp_b + ((comp_a - comp_b) & mask))  # B* takes a's score where A* took b's
        for side, (below, *rest) in enumerate(sides):
            pbelow, upto = (rest[0], rest[1:]) if ap else (None, rest)
            u2 = below.sum(axis=0, dtype=np.int64) + (upto or [below])[0].sum(axis=0, dtype=np.int64)
            out[2 * side].append(u2 / (2.0 * n1 * n0))
            if ap:
                tp = n1 - pbelow
                prec = np.divide(tp, tp + (n0 - below), dtype=np.float64)
                out[2 * side + 1].append(prec.sum(axis=0) / n1)
            else:
                out[2 * side + 1].append(np.full(below.shape[1], np.nan))
    res = [np.concatenate(o) for o in out]
    return (res[0], res[1]), (res[2], res[3])


def weighted_rank_metrics(
    y_true: np.ndarray, score: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of fixed scores under many integer weightings of the samples.

    `weights` [R, n] holds non-negative integers (bootstrap counts, 0/1 masks); row r equals scikit-learn's
    `roc_auc_score` / `average_precision_score` with `sample_weight=weights[r]`. NaN where a row leaves one class
    without weight.
    """
    wt = _weights_t(weights, len(score))
    return RankScorer(y_true, score)(wt, int(wt.sum(axis=0, dtype=np.int64).max(initial=0)))


class RankScorer:
    """`weighted_rank_metrics` of one (labels, scores) pair, sorted once for many calls (e.g. the blocks of a
    bootstrap). Called with integer weights wt [n, R] (the kernels' layout, not validated) and a bound on a
    column's sum, it returns the AUROC and average precision [R] of each weighting."""

    def __init__(self, y_true: np.ndarray, score: np.ndarray) -> None:
        self.channel = _rank_channel(score, _binary_labels(y_true, "y_true"))

    def __call__(self, wt: np.ndarray, max_total: int) -> tuple[np.ndarray, np.ndarray]:
        return _rank_kernel(self.channel, wt, max_total)


def _weights_t(weights: np.ndarray, n: int) -> np.ndarray:
    """Validated user weights [R, n] -> the kernels' layout [n, R] (items x weightings)."""
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[1] != n or not np.issubdtype(w.dtype, np.integer) or (w < 0).any():
        raise StatisticsInputError(f"weights: expected non-negative integers of shape [R, {n}]")
    return np.ascontiguousarray(w.T)


def rank_metrics_rows(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of every row of a score matrix [R, n] (labels [n] or [R, n]).

    Each row is sorted; tie blocks get midranks (AUROC) and are treated as one threshold (average precision),
    exactly as scikit-learn. NaN for a row whose labels lack a class.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    y = np.broadcast_to(_binary_labels(y_true, "y_true"), s.shape)
    r, n = s.shape
    order = np.argsort(s, axis=1, kind="stable")
    s = np.take_along_axis(s, order, axis=1)
    ys = np.take_along_axis(y, order, axis=1).astype(np.int64)
    idx = np.broadcast_to(np.arange(n), (r, n))
    new = np.ones((r, n), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)  # first position of each tie block
    last = np.ones((r, n), dtype=bool)
    last[:, :-1] = new[:, 1:]
    end = np.minimum.accumulate(np.where(last, idx, n - 1)[:, ::-1], axis=1)[:, ::-1]  # last position
    cp, cn = (
        np.concatenate([np.zeros((r, 1), np.int64), np.cumsum(v, axis=1)], axis=1) for v in (ys, 1 - ys)
    )
    n1, n0 = cp[:, -1], cn[:, -1]
    below = np.take_along_axis(cn, start, axis=1)
    upto = np.take_along_axis(cn, end + 1, axis=1)
    tp = (n1[:, None] - np.take_along_axis(cp, start, axis=1)).astype(np.float64)
    called = tp + (n0[:, None] - below)
    prec = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    ok = (n1 > 0) & (n0 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = np.where(ok, (ys * (below + upto)).sum(axis=1) / (2.0 * n1 * n0), np.nan)
        ap = np.where(ok, (ys * prec).sum(axis=1) / n1, np.nan)
    return auc, ap


def _binary_labels(y: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.size and not np.isin(y, (0, 1)).all():
        raise StatisticsInputError(f"{what}: labels must be 0/1")
    return y.astype(bool)


# ------------------------------------------------------------------------------------ metric sets


def task_kind(y: np.ndarray, p: np.ndarray) -> str:
    """binary (y [n], p [n]), multilabel (y and p [n, L]) or multiclass (y [n] classes, p [n, K])."""
    if y.ndim == 1 and p.ndim == 1:
        return "binary"
    if y.ndim == 2 and p.shape == y.shape:
        return "multilabel"
    if y.ndim == 1 and p.ndim == 2 and p.shape[0] == y.shape[0] and p.shape[1] >= 2:
        return "multiclass"
    raise StatisticsInputError(
        f"labels {y.shape} and scores {p.shape} do not match a task: expected [n] and [n] "
        "(binary), [n, L] and [n, L] (multilabel) or [n] and [n, K] (multiclass)"
    )


def group_key(metric: str, group: str) -> str:
    """Key of a macro average over a label group: `group_key("auroc_macro", "both")` -> "auroc_macro@both"."""
    return f"{metric}{GROUP_SEP}{group}"


def check_label_groups(
    groups: Mapping[str, Sequence[str]] | None, names: Sequence[str]
) -> dict[str, list[str]]:
    """Label groups (group -> label names) validated against the task's labels."""
    out: dict[str, list[str]] = {}
    if groups and (problem := label_groups_problem(groups)):
        raise StatisticsInputError(f"label groups: {problem}")
    for g, labels in (groups or {}).items():
        labels = list(dict.fromkeys(labels))
        unknown = sorted(set(labels) - set(names))
        if unknown or not labels:
            raise StatisticsInputError(
                f"label group {g!r}: "
                + (f"unknown label(s) {unknown}" if unknown else "no labels")
                + f"; labels: {list(names)}"
            )
        out[g] = labels
    return out


def available_metrics(
    kind: str, names: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """Metric keys (as in `carebench.evaluation.metrics`) that the vectorised statistics compute for a task kind.

    Multilabel predictions with label `groups` also have `auroc_macro@<group>` and `auprc_macro@<group>`: the
    macro average over the group's labels (those defined on the data, as for `auroc_macro`).
    """
    if kind == "binary":
        return list(_BINARY_METRICS)
    if kind == "multilabel":
        return [
            *_MULTILABEL_AGG,
            *(f"{m}/{nm}" for m in ("auroc", "auprc") for nm in names),
            *(group_key(f"{m}_macro", g) for g in (groups or {}) for m in ("auroc", "auprc")),
        ]
    if kind == "multiclass":
        return [*_MULTICLASS_METRICS, *(f"auroc/{nm}" for nm in names)]
    raise StatisticsInputError(f"unknown task kind {kind!r}")


class _MetricSet:
    """Requested metrics of one set of predictions, evaluated for many integer weightings of its rows at once.

    With `paired`, `y`/`p` hold the 2n pooled predictions of a paired test (model a's rows, then model b's for
    the same stays) and `evaluate_swapped` gives both arms of every permutation.
    """

    def __init__(
        self,
        y: np.ndarray,
        p: np.ndarray,
        names: Sequence[str],
        keys: Sequence[str],
        paired: bool = False,
        groups: Mapping[str, Sequence[str]] | None = None,
        thresholds: np.ndarray | None = None,
        channels: Mapping[str, _RankChannel] | None = None,
    ):
        self._args = (y, p, names, paired, groups, thresholds)
        self._built = dict(channels or {})  # rank channels already built for the same y, p (reused by name)
        self.kind = task_kind(y, p)
        self.thresholds = _item_thresholds(thresholds, p, self.kind)
        self.paired = paired
        self.names = list(names)
        self.groups = check_label_groups(groups, self.names) if self.kind == "multilabel" else {}
        available = available_metrics(self.kind, self.names, self.groups)
        unknown = sorted(set(keys) - set(available))
        if unknown:
            raise StatisticsInputError(
                f"metric(s) {unknown} not available for {self.kind} predictions; choose from {available}"
            )
        self.keys = list(keys)
        self.channels: dict[str, _RankChannel] = {}
        # whether a paired test needs the channels' average precision (multiclass tasks have none; LOS: AUROC only)
        self.needs_ap = self.kind != "multiclass" and any(k.startswith("auprc") for k in self.keys)
        self.features: np.ndarray | None = None
        getattr(self, f"_setup_{self.kind}")(y, p)

    def restrict(self, keys: Sequence[str]) -> _MetricSet:
        """The same predictions with only `keys` (a subset) requested: only the rank channels and features those
        keys need are evaluated, and a key's values are exactly those of the full set (its channels are reused)."""
        y, p, names, paired, groups, thresholds = self._args
        return _MetricSet(y, p, names, keys, paired, groups, thresholds, channels=self.channels)

    def _channel(self, name: str, score: np.ndarray, label: np.ndarray, items: np.ndarray | None = None):
        if name not in self._built:
            self._built[name] = _rank_channel(score, label, items, paired=self.paired)
        return self._built[name]

    # --- set-up: which rank channels and which additive per-row features the requested keys need
    def _needs_additive(self, rank_keys: Sequence[str]) -> bool:
        return any(k not in rank_keys and "/" not in k for k in self.keys)

    def _setup_binary(self, y: np.ndarray, p: np.ndarray) -> None:
        y = _binary_labels(y, "labels").astype(np.float64)
        self.undecided = bool(np.isnan(self.thresholds).any())
        if {"auroc", "auprc"} & set(self.keys):
            self.channels["score"] = self._channel("score", p, y)
        if self._needs_additive(("auroc", "auprc")):
            pred = (p >= self.thresholds).astype(np.float64)
            b = np.minimum((p * 10).astype(np.int64), 9)
            onehot = np.eye(10)[b]
            self.features = np.column_stack(
                [
                    y * pred,
                    (1 - y) * pred,
                    y * (1 - pred),
                    (1 - y) * (1 - pred),
                    (p - y) ** 2,
                    onehot * p[:, None],
                    onehot * y[:, None],
                ]
            )

    def _setup_multilabel(self, y: np.ndarray, p: np.ndarray) -> None:
        y = _binary_labels(y, "labels")
        self.defined = [j for j in range(y.shape[1]) if y[:, j].any() and not y[:, j].all()]
        agg = any(k in self.keys for k in ("auroc_macro", "auprc_macro", "auroc_weighted", "auprc_weighted"))
        in_groups = {
            nm
            for g, labels in self.groups.items()
            for nm in labels
            if any(group_key(f"{m}_macro", g) in self.keys for m in ("auroc", "auprc"))
        }
        for j, nm in enumerate(self.names):
            if (
                ((agg or nm in in_groups) and j in self.defined)
                or f"auroc/{nm}" in self.keys
                or f"auprc/{nm}" in self.keys
            ):
                self.channels[nm] = self._channel(nm, p[:, j], y[:, j])
        if "auroc_micro" in self.keys or "auprc_micro" in self.keys:
            items = np.repeat(np.arange(len(y)), y.shape[1])
            self.channels["__micro__"] = self._channel("__micro__", p.ravel(), y.ravel(), items)
        parts = []
        if any(k.endswith("_weighted") for k in self.keys):
            parts.append(y.astype(np.float64))  # weighted positive support of every label
        self.decided = np.flatnonzero(~np.isnan(self.thresholds).any(axis=0))  # labels with a threshold
        if "f1_macro" in self.keys:
            yf = y.astype(np.float64)
            pred = (p >= self.thresholds).astype(np.float64)
            parts += [yf * pred, (1 - yf) * pred, yf * (1 - pred)]  # tp, fp, fn of every label
        self.features = np.concatenate(parts, axis=1) if parts else None

    def _setup_multiclass(self, y: np.ndarray, p: np.ndarray) -> None:
        k = p.shape[1]
        if len(y) and (not np.isin(y, np.arange(k)).all()):
            raise StatisticsInputError(f"labels must be classes 0..{k - 1}")
        y = y.astype(np.int64)
        self.defined = [c for c in range(k) if (y == c).any() and not (y == c).all()]
        for c, nm in enumerate(self.names):
            if ("auroc_ovr_macro" in self.keys and c in self.defined) or f"auroc/{nm}" in self.keys:
                self.channels[nm] = self._channel(nm, p[:, c], y == c)
        if self._needs_additive(("auroc_ovr_macro",)):
            self.features = np.eye(k * k)[
                y * k + p.argmax(axis=1)
            ]  # one-hot confusion cell (true, predicted)

    # --- evaluation
    def evaluate(self, wt: np.ndarray) -> dict[str, np.ndarray]:
        """Every requested key -> values [R] for integer weights wt [items, R] (NaN where undefined)."""
        total = wt.sum(axis=0, dtype=np.int64)
        max_total = int(total.max(initial=0))
        ranks = {name: _rank_kernel(ch, wt, max_total) for name, ch in self.channels.items()}
        sums = (self.features.T @ wt.astype(np.float64)).T if self.features is not None else None
        return self._finish(ranks, sums, total.astype(np.float64))

    def evaluate_swapped(self, wt: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Values for 0/1 weights wt [items, R] and for their complement 1 - wt (one pass of prefix sums)."""
        total = wt.sum(axis=0, dtype=np.int64)
        ranks = [{}, {}]
        for name, ch in self.channels.items():
            ranks[0][name], ranks[1][name] = _rank_kernel_paired(ch, wt, self.needs_ap)
        sums = [None, None]
        if self.features is not None:
            sums[0] = (self.features.T @ wt.astype(np.float64)).T
            sums[1] = self.features.sum(axis=0)[None, :] - sums[0]
        totals = (total.astype(np.float64), (wt.shape[0] - total).astype(np.float64))
        return self._finish(ranks[0], sums[0], totals[0]), self._finish(ranks[1], sums[1], totals[1])

    def _finish(self, ranks, sums, total) -> dict[str, np.ndarray]:
        values = getattr(self, f"_finish_{self.kind}")(ranks, sums, total)
        return {k: values[k] for k in self.keys}

    @staticmethod
    def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        """num / den, and 0 where den is 0 (scikit-learn's zero_division=0)."""
        return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)

    def _finish_binary(self, ranks, sums, total) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if "score" in ranks:
            out["auroc"], out["auprc"] = ranks["score"]
        if sums is not None:
            tp, fp, fn, tn, sq = (sums[:, i] for i in range(5))
            out.update(
                accuracy=(tp + tn) / total,
                precision=self._ratio(tp, tp + fp),
                recall=self._ratio(tp, tp + fn),
                specificity=self._ratio(tn, tn + fp),
                f1=self._ratio(2 * tp, 2 * tp + fp + fn),
                brier=sq / total,
                ece=np.abs(sums[:, 5:15] - sums[:, 15:25]).sum(axis=1) / total,
            )
            if self.undecided:
                for k in THRESHOLDED_METRICS["binary"]:
                    out[k] = np.full(len(total), np.nan)
        return out

    def _finish_multilabel(self, ranks, sums, total) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for nm in self.names:
            if nm in ranks:
                out[f"auroc/{nm}"], out[f"auprc/{nm}"] = ranks[nm]
        if "__micro__" in ranks:
            out["auroc_micro"], out["auprc_micro"] = ranks["__micro__"]
        r = len(total)
        n_labels = len(self.names)
        weighted_cols = n_labels if any(k.endswith("_weighted") for k in self.keys) else 0
        if "f1_macro" in self.keys:
            cells = sums[:, weighted_cols:].reshape(r, 3, n_labels)[:, :, self.decided]
            tp, fp, fn = cells[:, 0], cells[:, 1], cells[:, 2]
            f1 = self._ratio(2 * tp, 2 * tp + fp + fn)
            out["f1_macro"] = f1.mean(axis=1) if len(self.decided) else np.full(r, np.nan)
        for i, metric in enumerate(("auroc", "auprc")):
            if not self.defined:
                out[f"{metric}_macro"] = out[f"{metric}_weighted"] = np.full(r, np.nan)
                continue
            keys = [self.names[j] for j in self.defined]
            if f"{metric}_macro" not in self.keys and f"{metric}_weighted" not in self.keys:
                continue
            vals = np.column_stack([ranks[nm][i] for nm in keys])
            out[f"{metric}_macro"] = vals.mean(axis=1)  # NaN if any defined label lost a class
            if weighted_cols:
                support = sums[:, self.defined]
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[f"{metric}_weighted"] = (vals * support).sum(axis=1) / support.sum(axis=1)
        for g, labels in self.groups.items():
            members = [self.names[j] for j in self.defined if self.names[j] in labels]
            for i, metric in enumerate(("auroc", "auprc")):
                key = group_key(f"{metric}_macro", g)
                if key in self.keys:
                    out[key] = (
                        np.column_stack([ranks[nm][i] for nm in members]).mean(axis=1)
                        if members
                        else np.full(r, np.nan)
                    )
        return out

    def _finish_multiclass(self, ranks, sums, total) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for nm in self.names:
            if nm in ranks:
                out[f"auroc/{nm}"] = ranks[nm][0]
        if "auroc_ovr_macro" in self.keys:
            out["auroc_ovr_macro"] = (
                np.column_stack([ranks[self.names[c]][0] for c in self.defined]).mean(axis=1)
                if self.defined
                else np.full(len(total), np.nan)
            )
        if sums is not None:
            k = len(self.names)
            conf = sums.reshape(-1, k, k)  # [R, true, predicted]
            true_n, pred_n = conf.sum(axis=2), conf.sum(axis=1)
            tp = np.diagonal(conf, axis1=1, axis2=2)
            f1 = self._ratio(2 * tp, true_n + pred_n)
            present = (true_n + pred_n) > 0  # scikit-learn averages over labels in y_true or y_pred
            out["accuracy"] = tp.sum(axis=1) / total
            out["f1_macro"] = (f1 * present).sum(axis=1) / present.sum(axis=1)
            out["f1_weighted"] = (f1 * true_n).sum(axis=1) / true_n.sum(axis=1)
            expected = true_n[:, :, None] * pred_n[:, None, :] / total[:, None, None]
            rank = np.cumsum(present, axis=1) - 1  # position among present labels (scikit-learn's weights)
            for key, w in (
                ("kappa", 1.0 - np.eye(k)[None]),
                ("kappa_linear", np.abs(rank[:, :, None] - rank[:, None, :]).astype(np.float64)),
            ):
                den = (w * expected).sum(axis=(1, 2))
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[key] = np.where(den > 0, 1.0 - (w * conf).sum(axis=(1, 2)) / den, np.nan)
        return out


def _item_thresholds(thresholds, p: np.ndarray, kind: str) -> np.ndarray:
    """Decision thresholds broadcast to the scores' shape ([n] binary, [n, L] multilabel): 0.5 by default; one
    per output, or one per stay (and output). Not used by multiclass (argmax)."""
    if kind == "multiclass" or thresholds is None:
        return np.full(p.shape, 0.5)
    t = np.asarray(thresholds, dtype=np.float64)
    if kind == "multilabel" and t.ndim == 1 and t.shape[0] == p.shape[1]:
        t = t[None, :]
    elif kind == "binary" and t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    try:
        t = np.broadcast_to(t, p.shape)
    except ValueError:
        raise StatisticsInputError(
            f"thresholds of shape {np.shape(thresholds)} do not fit scores of shape {p.shape} (one per output, or "
            "one per stay and output)"
        ) from None
    if np.any((t < 0) | (t > 1)):
        raise StatisticsInputError("thresholds must be in [0, 1] (NaN = undecided)")
    return t


def prepare_predictions(y, p, names: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validated arrays and label / class names (default "0", "1", ...)."""
    try:
        y, p = np.asarray(y), _check_probs(np.asarray(p), "scores")
    except UserError as err:
        raise StatisticsInputError(str(err)) from err
    if y.ndim == 1 and p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    kind = task_kind(y, p)
    width = 1 if kind == "binary" else p.shape[1]
    if names is None:
        names = [str(j) for j in range(width)]
    if len(names) != width:
        raise StatisticsInputError(f"{len(names)} names for {width} label/class columns")
    if len(y) < 2:
        raise StatisticsInputError(f"need at least 2 stays, got {len(y)}")
    if kind == "multiclass" and not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise StatisticsInputError("multiclass scores: each row must sum to 1 (apply softmax to logits)")
    return y, p, list(names)


def metric_values(
    y_true,
    p,
    metrics: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    weights: np.ndarray | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The vectorised metrics for integer weightings [R, n] of the stays (default: one row of ones)."""
    y, p, names = prepare_predictions(y_true, p, names)
    wt = np.ones((len(y), 1), dtype=np.int32) if weights is None else _weights_t(weights, len(y))
    return _MetricSet(y, p, names, metrics, groups=groups, thresholds=thresholds).evaluate(wt)


# ------------------------------------------------------------------------------------------ bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """A bootstrap confidence interval. `n_valid` resamples defined the statistic; the others were skipped."""

    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    method: str
    n_resamples: int
    n_valid: int
    standard_error: float
    distribution: np.ndarray = field(repr=False)


def bootstrap_weights(
    n: int, n_resamples: int, seed: int, strata: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Blocks of bootstrap counts [n, r] (stays x resamples): how often each stay is drawn in each resample.

    Unstratified draws are `default_rng(seed).integers(0, n, (r, n))` (row = resample), the same stream as
    `scipy.stats.bootstrap` with the same generator when one block holds all resamples (n_resamples x n <=
    RNG_BLOCK). With `strata`, each stratum is resampled within itself, so every resample keeps its sizes.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, RNG_BLOCK // n)
    dtype = np.int16 if n <= np.iinfo(np.int16).max else np.int32
    groups = None if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for start in range(0, n_resamples, rows):
        r = min(rows, n_resamples - start)
        if groups is None:
            idx = rng.integers(0, n, (r, n))
        else:
            idx = np.concatenate([g[rng.integers(0, len(g), (r, len(g)))] for g in groups], axis=1)
        yield (
            np.bincount((idx * r + np.arange(r)[:, None]).ravel(), minlength=n * r)
            .reshape(n, r)
            .astype(dtype)
        )


def _jackknife_weights(n: int) -> Iterator[np.ndarray]:
    """Leave-one-out weights [n, r] in blocks: column j drops stay start + j."""
    cols = max(1, RNG_BLOCK // n)
    for start in range(0, n, cols):
        c = min(cols, n - start)
        w = np.ones((n, c), dtype=np.int16 if n <= np.iinfo(np.int16).max else np.int32)
        w[start + np.arange(c), np.arange(c)] = 0
        yield w


def _evaluate_blocks(sets: Sequence[_MetricSet], blocks: Iterator[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each set's metric values under every block of weights (the sets share each block), concatenated."""
    parts: list[dict[str, list[np.ndarray]]] = [{k: [] for k in s.keys} for s in sets]
    for w in blocks:
        for s, part in zip(sets, parts, strict=True):
            vals = s.evaluate(w)
            for k, acc in part.items():
                acc.append(vals[k])
    return [{k: np.concatenate(v) for k, v in part.items()} for part in parts]


def _interval(
    dist: np.ndarray, estimate: float, confidence: float, method: str, jackknife: np.ndarray | None
) -> BootstrapResult:
    valid = dist[~np.isnan(dist)]
    lo = hi = se = float("nan")
    if len(valid) and not np.isnan(estimate):
        alpha = (1.0 - confidence) / 2
        levels = np.array([alpha, 1.0 - alpha])
        if method == "bca":
            levels = _bca_levels(valid, estimate, alpha, jackknife)
        if not np.isnan(levels).any():
            lo, hi = (float(v) for v in np.quantile(valid, levels))
        se = float(np.std(valid, ddof=1)) if len(valid) > 1 else float("nan")
    return BootstrapResult(
        estimate=float(estimate),
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
        method=method,
        n_resamples=len(dist),
        n_valid=len(valid),
        standard_error=se,
        distribution=valid,
    )


def _bca_levels(valid: np.ndarray, estimate: float, alpha: float, jackknife: np.ndarray) -> np.ndarray:
    """Bias-corrected and accelerated quantile levels (Efron & Tibshirani 1993, 14.3)."""
    if np.isnan(jackknife).any():  # some leave-one-out sample does not define the statistic
        return np.array([np.nan, np.nan])
    z0 = ndtri(((valid < estimate).sum() + (valid <= estimate).sum()) / (2.0 * len(valid)))
    d = jackknife.mean() - jackknife
    den = 6.0 * (d**2).sum() ** 1.5
    accel = (d**3).sum() / den if den > 0 else 0.0
    z = z0 + ndtri(np.array([alpha, 1.0 - alpha]))
    return ndtr(z0 + z / (1.0 - accel * z))


def check_ci_options(confidence: float, method: str, n: int, name: str) -> None:
    if not 0.0 < confidence < 1.0:
        raise StatisticsInputError(f"ci: confidence level must be in (0, 1), got {confidence}")
    if method not in CI_METHODS:
        raise StatisticsInputError(f"method: expected one of {list(CI_METHODS)}, got {method!r}")
    if n < 1:
        raise StatisticsInputError(f"{name}: must be at least 1, got {n}")


def _draw(
    sets: Sequence[_MetricSet], y: np.ndarray, n_resamples: int, seed: int, method: str, stratify: bool
) -> list[BootstrapValues]:
    """`BootstrapValues` of each set (the same predictions' stays), every set evaluated on the same draws."""
    n = len(y)
    point = _evaluate_blocks(sets, iter([np.ones((n, 1), dtype=np.int32)]))
    dist = _evaluate_blocks(sets, bootstrap_weights(n, n_resamples, seed, _strata(y, stratify)))
    jack = _evaluate_blocks(sets, _jackknife_weights(n)) if method == "bca" else [{} for _ in sets]
    return [
        BootstrapValues(
            point=pt, resamples=d, jackknife=j, n_stays=n, seed=seed, method=method, stratify=stratify
        )
        for pt, d, j in zip(point, dist, jack, strict=True)
    ]


def _intervals(v: BootstrapValues, confidence: float) -> dict[str, BootstrapResult]:
    """The CI of every key of `v` from its resamples (and jackknife values for BCa)."""
    return {
        k: _interval(v.resamples[k], float(v.point[k][0]), confidence, v.method, v.jackknife.get(k))
        for k in v.point
    }


def _strata(y: np.ndarray, stratify: bool) -> np.ndarray | None:
    if not stratify:
        return None
    if y.ndim != 1:
        raise StatisticsInputError(
            "stratify: defined for binary and multiclass labels (one column), not "
            "multilabel; resample without stratification"
        )
    return y


def bootstrap_ci(
    y_true,
    p,
    metric: str = "auroc",
    *,
    names: Sequence[str] | None = None,
    n_resamples: int = DEFAULTS.n_bootstrap,
    ci: float = DEFAULTS.confidence,
    seed: int = DEFAULTS.seed,
    method: str = "percentile",
    stratify: bool = False,
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds: np.ndarray | None = None,
) -> BootstrapResult:
    """Bootstrap confidence interval of one metric (stays resampled with replacement).

    `method`: "percentile" or "bca" (bias-corrected and accelerated, jackknife acceleration). `stratify`
    resamples each class separately (binary / multiclass). Resamples where the metric is undefined are skipped.
    """
    return bootstrap_cis(
        y_true,
        p,
        [metric],
        names=names,
        n_resamples=n_resamples,
        ci=ci,
        seed=seed,
        method=method,
        stratify=stratify,
        groups=groups,
        thresholds=thresholds,
    )[metric]


def bootstrap_cis(
    y_true,
    p,
    metrics: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    n_resamples: int = DEFAULTS.n_bootstrap,
    ci: float = DEFAULTS.confidence,
    seed: int = DEFAULTS.seed,
    method: str = "percentile",
    stratify: bool = False,
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds: np.ndarray | None = None,
) -> dict[str, BootstrapResult]:
    """`bootstrap_ci` of several metrics on the same resamples, in one pass (the intervals of `bootstrap_values`)."""
    check_ci_options(ci, method, n_resamples, "n_resamples")
    values = bootstrap_values(
        y_true, p, metrics, names=names, n_resamples=n_resamples, seed=seed, method=method, stratify=stratify,
        groups=groups, thresholds=thresholds,
    )  # fmt: skip
    return _intervals(values, ci)


def paired_bootstrap_ci(
    y_true,
    p_a,
    p_b,
    metric: str = "auroc",
    *,
    names: Sequence[str] | None = None,
    n_resamples: int = DEFAULTS.n_bootstrap,
    ci: float = DEFAULTS.confidence,
    seed: int = DEFAULTS.seed,
    method: str = "percentile",
    stratify: bool = False,
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds_a: np.ndarray | None = None,
    thresholds_b: np.ndarray | None = None,
) -> BootstrapResult:
    """Bootstrap confidence interval of metric(a) - metric(b) on the same stays (one resample serves both)."""
    return paired_bootstrap_cis(
        y_true,
        p_a,
        p_b,
        [metric],
        names=names,
        n_resamples=n_resamples,
        ci=ci,
        seed=seed,
        method=method,
        stratify=stratify,
        groups=groups,
        thresholds_a=thresholds_a,
        thresholds_b=thresholds_b,
    )[metric]


def paired_bootstrap_cis(
    y_true,
    p_a,
    p_b,
    metrics: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    n_resamples: int = DEFAULTS.n_bootstrap,
    ci: float = DEFAULTS.confidence,
    seed: int = DEFAULTS.seed,
    method: str = "percentile",
    stratify: bool = False,
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds_a: np.ndarray | None = None,
    thresholds_b: np.ndarray | None = None,
) -> dict[str, BootstrapResult]:
    """`paired_bootstrap_ci` of several metrics on the same resamples, in one pass (each model's predictions
    decided at its own thresholds). Equals `paired_intervals` of the two models' `bootstrap_values`."""
    y, p_a, names = prepare_predictions(y_true, p_a, names)
    _, p_b, _ = prepare_predictions(y_true, p_b, names)
    _same_shape(p_a, p_b)
    check_ci_options(ci, method, n_resamples, "n_resamples")
    keys = list(dict.fromkeys(metrics))
    sets = [
        _MetricSet(y, p_a, names, keys, groups=groups, thresholds=thresholds_a),
        _MetricSet(y, p_b, names, keys, groups=groups, thresholds=thresholds_b),
    ]
    return paired_intervals(*_draw(sets, y, n_resamples, seed, method, stratify), ci)


@dataclass(frozen=True)
class BootstrapValues:
    """One model's metric values on its stays (`point`, [1] per key), on each bootstrap resample (`resamples`,
    [n_resamples]) and, for BCa, on each leave-one-out sample (`jackknife`, [n]). Two models' values drawn with
    the same stays in the same order, seed and options give their paired intervals (`paired_intervals`) without
    evaluating either again: a model compared with many others is resampled once."""

    point: dict[str, np.ndarray]
    resamples: dict[str, np.ndarray]
    jackknife: dict[str, np.ndarray]
    n_stays: int
    seed: int
    method: str
    stratify: bool


def bootstrap_values(
    y_true,
    p,
    metrics: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    n_resamples: int = DEFAULTS.n_bootstrap,
    seed: int = DEFAULTS.seed,
    method: str = "percentile",
    stratify: bool = False,
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds: np.ndarray | None = None,
) -> BootstrapValues:
    """One model's `BootstrapValues` (the resamples of `bootstrap_weights`, as `paired_bootstrap_cis` draws them)."""
    y, p, names = prepare_predictions(y_true, p, names)
    check_ci_options(DEFAULTS.confidence, method, n_resamples, "n_resamples")
    sets = [_MetricSet(y, p, names, list(dict.fromkeys(metrics)), groups=groups, thresholds=thresholds)]
    return _draw(sets, y, n_resamples, seed, method, stratify)[0]


def paired_intervals(
    a: BootstrapValues, b: BootstrapValues, ci: float = DEFAULTS.confidence
) -> dict[str, BootstrapResult]:
    """Bootstrap CIs of metric(a) - metric(b) from the two models' values: identical to `paired_bootstrap_cis` on
    the same stays, in the same order, with the same seed and options (each resample's difference is the
    difference of the two models' values on it)."""
    same = (a.n_stays, a.seed, a.method, a.stratify) == (b.n_stays, b.seed, b.method, b.stratify)
    if not same or list(a.point) != list(b.point):
        raise StatisticsInputError("paired_intervals: the two models' values were drawn differently")
    check_ci_options(ci, a.method, 1, "n_resamples")  # the resample count was checked when they were drawn
    diff = replace(
        a,
        point={k: v - b.point[k] for k, v in a.point.items()},
        resamples={k: v - b.resamples[k] for k, v in a.resamples.items()},
        jackknife={k: v - b.jackknife[k] for k, v in a.jackknife.items()},
    )
    return _intervals(diff, ci)


def _same_shape(p_a: np.ndarray, p_b: np.ndarray) -> None:
    if p_a.shape != p_b.shape:
        raise StatisticsInputError(f"scores of the two models differ in shape: {p_a.shape} vs {p_b.shape}")


# ------------------------------------------------------------------------------------ permutation test


@dataclass(frozen=True)
class PermutationResult:
    """A paired permutation test of metric(a) - metric(b)."""

    statistic: float
    p_value: float
    n_permutations: int
    exact: bool
    alternative: str
    null_distribution: np.ndarray = field(repr=False)


def swap_blocks(n: int, n_permutations: int, seed: int) -> tuple[bool, Iterator[np.ndarray]]:
    """Swap patterns [r, n] (uint8, 1 = swap the two models' scores of that stay), in blocks.

    When 2**n <= n_permutations (and n <= MAX_EXACT_STAYS) all 2**n patterns are enumerated (exact test);
    otherwise n_permutations random patterns, each stay swapped independently with probability 1/2.
    """
    exact = n <= MAX_EXACT_STAYS and 2**n <= n_permutations
    rows = max(1, 8 * RNG_BLOCK // (2 * n))  # 32 MiB of 0/1 weights per block

    def blocks() -> Iterator[np.ndarray]:
        if exact:
            for start in range(0, 2**n, rows):
                codes = np.arange(start, min(2**n, start + rows))
                yield ((codes[:, None] >> np.arange(n)) & 1).astype(np.uint8)
            return
        rng = np.random.default_rng(seed)
        for start in range(0, n_permutations, rows):
            yield rng.integers(0, 2, (min(rows, n_permutations - start), n), dtype=np.uint8)

    return exact, blocks()


def _as_extreme(null: np.ndarray, observed: float, alternative: str) -> np.ndarray:
    """Which null statistics are at least as extreme as the observed one (floating-point ties count)."""
    if alternative == "two-sided":
        return np.abs(null) >= abs(observed) - TIE_TOLERANCE
    if alternative == "greater":
        return null >= observed - TIE_TOLERANCE
    return null <= observed + TIE_TOLERANCE


def _p_value(null: np.ndarray, observed: float, alternative: str, exact: bool) -> float:
    if np.isnan(observed):
        return float("nan")
    count = np.count_nonzero(_as_extreme(null, observed, alternative))
    return count / len(null) if exact else (1 + count) / (1 + len(null))


class _Sequential:
    """Besag & Clifford's sequential Monte Carlo p-value for each key: draw permutations until `h` null statistics
    at least as extreme as the observed one have been seen, or `n_permutations` are drawn. Stopped at the L-th
    permutation, p = h / L; never stopped, p = (1 + count) / (1 + n_permutations) as without stopping. Either is a
    valid p-value (P(p <= a) <= a under the null), and a key's p and L depend only on the permutation sequence,
    not on the other keys or the block sizes. h = 0: no stopping."""

    def __init__(self, keys: Sequence[str], observed: Mapping[str, float], alternative: str, h: int) -> None:
        self.h, self.alternative, self.observed = h, alternative, observed
        self.count = dict.fromkeys(keys, 0)
        # a key whose statistic is undefined (NaN) has nothing to wait for
        self.stopped_at: dict[str, int | None] = {k: 0 if h and np.isnan(observed[k]) else None for k in keys}
        self.seen = 0

    def add(self, null: Mapping[str, np.ndarray]) -> None:
        """Account for the next block of null statistics (one array per key, all the same length)."""
        block = len(next(iter(null.values()))) if null else 0
        if self.h:
            for k, at in self.stopped_at.items():
                if at is not None:
                    continue
                hits = np.cumsum(_as_extreme(null[k], self.observed[k], self.alternative))
                if self.count[k] + (hits[-1] if len(hits) else 0) >= self.h:
                    self.stopped_at[k] = self.seen + int(np.searchsorted(hits, self.h - self.count[k])) + 1
                else:
                    self.count[k] += int(hits[-1]) if len(hits) else 0
        self.seen += block

    @property
    def open_keys(self) -> list[str]:
        """The keys still drawing permutations (all of them without stopping)."""
        return [k for k, at in self.stopped_at.items() if at is None]

    @property
    def done(self) -> bool:
        return bool(self.h) and all(at is not None for at in self.stopped_at.values())

    def p_value(self, key: str, null: np.ndarray, exact: bool) -> tuple[float, int]:
        """(p, permutations used) of a key from its null statistics in drawing order."""
        at = self.stopped_at.get(key)
        if at is None or np.isnan(self.observed[key]):
            return _p_value(null, self.observed[key], self.alternative, exact), len(null)
        return self.h / at, at


def _permutation_many(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    names: list[str],
    keys: Sequence[str],
    n_permutations: int,
    seed: int,
    alternative: str,
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds_a: np.ndarray | None = None,
    thresholds_b: np.ndarray | None = None,
    sequential_h: int = 0,
) -> dict[str, PermutationResult]:
    n = len(y)
    kind = task_kind(y, p_a)
    thr = np.concatenate(
        [_item_thresholds(thresholds_a, p_a, kind), _item_thresholds(thresholds_b, p_b, kind)]
    )
    pooled = _MetricSet(
        np.concatenate([y, y]),
        np.concatenate([p_a, p_b]),
        names,
        keys,
        paired=True,
        groups=groups,
        thresholds=thr,
    )
    identity = np.concatenate([np.ones(n), np.zeros(n)]).astype(np.uint8)[:, None]
    obs_a, obs_b = pooled.evaluate_swapped(identity)
    observed = {k: float(obs_a[k][0] - obs_b[k][0]) for k in keys}
    exact, blocks = swap_blocks(n, n_permutations, seed)
    sequential = _Sequential(keys, observed, alternative, 0 if exact else sequential_h)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    current = pooled
    for swap in blocks:
        st = swap.T
        # A*: a's score unless swapped
        va, vb = current.evaluate_swapped(np.concatenate([1 - st, st], axis=0))
        null = {k: va[k] - vb[k] for k in current.keys}
        for k in current.keys:
            parts[k].append(null[k])
        sequential.add(null)
        if sequential.done:  # every key has seen its h extreme statistics: the remaining blocks cannot matter
            break
        still = sequential.open_keys
        if len(still) < len(current.keys):  # what only stopped keys need (e.g. a label's channel) is dropped
            current = current.restrict(still)
    out = {}
    for k in keys:
        null = np.concatenate(parts[k])
        p, used = sequential.p_value(k, null, exact)
        out[k] = PermutationResult(
            statistic=observed[k],
            p_value=p,
            n_permutations=used,
            exact=exact,
            alternative=alternative,
            null_distribution=null[:used],
        )
    return out


def check_test_options(alternative: str, n_permutations: int, sequential_h: int = 0) -> None:
    if alternative not in ALTERNATIVES:
        raise StatisticsInputError(f"alternative: expected one of {list(ALTERNATIVES)}, got {alternative!r}")
    if n_permutations < 1:
        raise StatisticsInputError(f"n_permutations: must be at least 1, got {n_permutations}")
    if isinstance(sequential_h, bool) or not isinstance(sequential_h, int | np.integer) or sequential_h < 0:
        raise StatisticsInputError(
            f"sequential_h: expected an integer >= 0 (0: no stopping), got {sequential_h!r}"
        )


def paired_permutation_test(
    y_true,
    p_a,
    p_b,
    metric: str = "auroc",
    *,
    names: Sequence[str] | None = None,
    n_permutations: int = DEFAULTS.n_permutations,
    seed: int = DEFAULTS.seed,
    alternative: str = "two-sided",
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds_a: np.ndarray | None = None,
    thresholds_b: np.ndarray | None = None,
    sequential_h: int = DEFAULTS.sequential_h,
) -> PermutationResult:
    """Paired permutation test of T = metric(a) - metric(b) on the same stays.

    Under the null the two models are exchangeable per stay, so each permutation swaps the two models' scores
    of a random subset of stays (labels stay with their stay). Two-sided p = (1 + #{|T*| >= |T|}) / (1 + R):
    the observed arrangement counts as one of the permutations, so p is never 0 and the test keeps its level.
    With 2**n <= n_permutations every swap pattern is enumerated and p = #{|T*| >= |T|} / 2**n (exact).
    `sequential_h` > 0 (random permutations only): stop once that many null statistics were as extreme as the
    observed one, p = h / L at the L-th permutation (Besag & Clifford 1991; valid, and a p-value far from
    significance then costs a few hundred permutations instead of all of them); 0 = all `n_permutations`.
    `n_permutations` of the result is the number used.
    """
    return paired_permutation_tests(
        y_true,
        p_a,
        p_b,
        [metric],
        names=names,
        n_permutations=n_permutations,
        seed=seed,
        alternative=alternative,
        groups=groups,
        thresholds_a=thresholds_a,
        thresholds_b=thresholds_b,
        sequential_h=sequential_h,
    )[metric]


def paired_permutation_tests(
    y_true,
    p_a,
    p_b,
    metrics: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    n_permutations: int = DEFAULTS.n_permutations,
    seed: int = DEFAULTS.seed,
    alternative: str = "two-sided",
    groups: Mapping[str, Sequence[str]] | None = None,
    thresholds_a: np.ndarray | None = None,
    thresholds_b: np.ndarray | None = None,
    sequential_h: int = DEFAULTS.sequential_h,
) -> dict[str, PermutationResult]:
    """`paired_permutation_test` of several metrics (e.g. every label) on the same permutations, in one pass. A
    swapped stay carries its model's threshold with its score (the decision belongs to the prediction)."""
    y, p_a, names = prepare_predictions(y_true, p_a, names)
    _, p_b, _ = prepare_predictions(y_true, p_b, names)
    _same_shape(p_a, p_b)
    check_test_options(alternative, n_permutations, sequential_h)
    return _permutation_many(
        y, p_a, p_b, names, list(dict.fromkeys(metrics)), n_permutations, seed, alternative, groups,
        thresholds_a, thresholds_b, sequential_h,
    )  # fmt: skip
