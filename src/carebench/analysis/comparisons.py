"""Comparisons of methods on pooled test predictions: seed ensembles, leaderboards, paired tests with Holm/BH.

The input is a long table of test predictions (one row per method, seed and stay, as `analysis.pooling` builds
it from the run records); every number comes from the kernels (`evaluation.statistics`,
`evaluation.multiplicity`), so a comparison equals what the kernels give on the same arrays. docs/statistics.md
describes the pooling rules, the families of tests and the reference method.

Thresholded metrics (F1, sensitivity, specificity, ...) are decided at thresholds chosen on VALIDATION
predictions by the task's rule (`TaskSpec.threshold`), never at 0.5 on test: with the long table of the runs'
validation predictions (`val`), the seed ensemble of each method and fold (the validation probabilities of its
seeds averaged per stay, as its test probabilities are) gets its thresholds on its fold's validation split, and
every test stay is decided at the thresholds of the fold that tested it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from carebench import runs
from carebench.analysis.parallel import parallel_map
from carebench.errors import UserError
from carebench.evaluation.metrics import task_thresholds
from carebench.evaluation.multiplicity import benjamini_hochberg, holm
from carebench.evaluation.options import DEFAULTS, GROUP_SEP
from carebench.evaluation.statistics import (
    PermutationResult,
    StatisticsInputError,
    available_metrics,
    bootstrap_cis,
    bootstrap_values,
    check_ci_options,
    check_label_groups,
    check_test_options,
    group_key,
    metric_values,
    paired_bootstrap_cis,
    paired_intervals,
    paired_permutation_tests,
    prepare_predictions,
)
from carebench.tasks import get_task

# What `compare_methods` tests when `metrics` is not given; "auroc/*" expands to every label.
DEFAULT_COMPARE_METRICS = {
    "binary": ("auroc", "auprc"),
    "multilabel": ("auroc_macro", "auprc_macro", "auroc/*", "auprc/*"),
    "multiclass": ("auroc_ovr_macro", "accuracy"),
}


@dataclass(frozen=True)
class PooledPredictions:
    """One method's test predictions: out-of-fold predictions concatenated, probabilities averaged over seeds."""

    stay_id: np.ndarray
    y: np.ndarray
    p: np.ndarray
    n_seeds: int
    thresholds: np.ndarray | None = None  # per stay (and output): chosen on validation; None = not needed


def _seed_mean(
    g: pd.DataFrame, y_cols: list[str], p_cols: list[str]
) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    per_stay = g.groupby("stay_id", sort=True)
    return (
        per_stay[y_cols].first().to_numpy(),
        per_stay[p_cols].mean().to_numpy(np.float64),
        per_stay.size().index,
    )


def fold_thresholds(val: pd.DataFrame, task: str, method: str) -> dict[int, np.ndarray]:
    """Per fold: the decision thresholds of a method's seed ensemble, chosen by the task's rule on the fold's
    validation predictions (`val`: long, one row per method, seed, fold and validation stay)."""
    y_cols, p_cols, _ = runs.prediction_columns(val.columns, task)
    part = val.loc[val["method"] == method]
    out = {}
    for fold, g in part.groupby("fold", sort=True):
        y, p, _ = _seed_mean(g, y_cols, p_cols)
        out[int(fold)] = task_thresholds(task, y, p)
    return out


def _stay_thresholds(g: pd.DataFrame, val: pd.DataFrame, task: str, method: str) -> np.ndarray:
    """[stays, outputs] thresholds of a method's pooled test stays (sorted by stay): those of the fold that
    tested each stay."""
    if "fold" not in g.columns:
        raise StatisticsInputError(
            "predictions: column 'fold' is needed to pick each stay's validation thresholds"
        )
    by_fold = fold_thresholds(val, task, method)
    fold_of = g.groupby("stay_id", sort=True)["fold"].first()
    missing = sorted(set(fold_of.astype(int)) - set(by_fold))
    if missing:
        raise StatisticsInputError(
            f"method {method!r}: no validation predictions for fold(s) {missing} to choose thresholds on"
        )
    return np.stack([by_fold[int(f)] for f in fold_of.to_numpy()])


def needs_thresholds(task: str, keys: Sequence[str]) -> bool:
    """Whether any of the metric keys is decided at a threshold (so validation thresholds are needed)."""
    return any(k in get_task(task).thresholded for k in keys)


def pool_predictions(
    preds: pd.DataFrame, task: str, val: pd.DataFrame | None = None
) -> dict[str, PooledPredictions]:
    """Per method: the test predictions of every stay, seeds averaged.

    `preds` is long: one row per (method, seed, stay) with `method`, `seed`, `stay_id` (and optionally `fold`),
    the task's `y_*` and `p_*` columns. Each stay must be tested exactly once per (method, seed) - the five
    folds' test sets partition the cohort - and every seed of a method must cover the same stays. Probabilities
    are averaged over seeds per stay (a seed ensemble: it removes seed noise from the comparison, and LOS rows
    still sum to 1). With `val` (the same long table of the runs' validation predictions), each stay also gets
    the decision thresholds of its fold's seed ensemble (module docstring); multiclass tasks have none.
    """
    y_cols, p_cols, names = runs.prediction_columns(preds.columns, task)
    need = ["method", "seed", "stay_id", *y_cols, *p_cols]
    missing = [c for c in need if c not in preds.columns]
    if missing or not p_cols or not names:
        raise StatisticsInputError(f"predictions for task {task!r}: missing column(s) {missing or need[3:]}")
    dup = preds.duplicated(["method", "seed", "stay_id"], keep=False)
    if dup.any():
        row = preds.loc[dup].iloc[0]
        raise StatisticsInputError(
            f"predictions: stay {row['stay_id']} of method {row['method']!r} seed "
            f"{row['seed']} appears more than once (each stay is tested in exactly one fold)"
        )
    out: dict[str, PooledPredictions] = {}
    for method, g in preds.groupby("method", sort=True):
        stays_by_seed = {s: frozenset(gs["stay_id"]) for s, gs in g.groupby("seed")}
        if len(set(stays_by_seed.values())) > 1:
            raise StatisticsInputError(
                f"predictions: the seeds of method {method!r} cover different stays "
                f"({ {s: len(v) for s, v in stays_by_seed.items()} } stays per seed)"
            )
        if (g.groupby("stay_id", sort=True)[y_cols].nunique() > 1).to_numpy().any():
            raise StatisticsInputError(f"predictions: labels of method {method!r} differ between seeds")
        y, p, stays = _seed_mean(g, y_cols, p_cols)
        kind = get_task(task).kind
        y = y[:, 0] if kind != "multilabel" else y
        p = p[:, 0] if kind == "binary" else p
        try:
            prepare_predictions(y, p, names)
        except UserError as err:
            raise StatisticsInputError(f"predictions of method {method!r}: {err}") from err
        thr = None
        if val is not None and kind != "multiclass":
            thr = _stay_thresholds(g, val, task, str(method))
            thr = thr[:, 0] if kind == "binary" else thr
        out[str(method)] = PooledPredictions(
            stay_id=np.asarray(stays), y=y.astype(np.int64), p=p, n_seeds=len(stays_by_seed), thresholds=thr
        )
    return out


def _expand_keys(
    task: str,
    metrics: Sequence[str] | None,
    names: list[str],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Metric keys; `auroc/*` expands to every label, and with label groups every requested macro average
    (`auroc_macro`, `auprc_macro`) is added for each group (`auroc_macro@<group>`)."""
    keys: list[str] = []
    for m in metrics if metrics is not None else DEFAULT_COMPARE_METRICS[get_task(task).kind]:
        keys.extend([f"{m[:-2]}/{nm}" for nm in names] if m.endswith("/*") else [m])
    for m in list(keys):
        if m in ("auroc_macro", "auprc_macro"):
            keys.extend(group_key(m, g) for g in (groups or {}))
    return list(dict.fromkeys(keys))


GROUP_LABEL = "group:"  # label column of a label-group row: "group:<name>"


def _split_key(task: str, key: str) -> tuple[str, str]:
    """(label, metric): a per-label key 'auroc/label_x' -> ('label_x', 'auroc'); a group key 'auroc_macro@both'
    -> ('group:both', 'auroc_macro'); overall keys -> (task, key)."""
    metric, _, label = key.partition("/")
    if label:
        return label, metric
    metric, sep, group = key.partition(GROUP_SEP)
    return (GROUP_LABEL + group, metric) if sep else (task, metric)


def _scope(key: str) -> str:
    return "per_label" if "/" in key else "group" if GROUP_SEP in key else "overall"


def _align(
    a: PooledPredictions, b: PooledPredictions, names: list[str], method_a: str, method_b: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    common, ia, ib = np.intersect1d(a.stay_id, b.stay_id, return_indices=True)
    if len(common) < 2:
        raise StatisticsInputError(
            f"methods {method_a!r} and {method_b!r} share {len(common)} test stays; "
            "a paired comparison needs the same stays"
        )
    if not np.array_equal(a.y[ia], b.y[ib]):
        bad = common[np.flatnonzero((a.y[ia] != b.y[ib]).reshape(len(common), -1).any(axis=1))[0]]
        raise StatisticsInputError(
            f"labels of stay {bad} differ between methods {method_a!r} and {method_b!r}"
        )
    ta = None if a.thresholds is None else a.thresholds[ia]
    tb = None if b.thresholds is None else b.thresholds[ib]
    return a.y[ia], a.p[ia], b.p[ib], ta, tb


def _best_method(
    pooled: dict[str, PooledPredictions],
    candidates: Sequence[str],
    task: str,
    names: list[str],
    group: str | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> str:
    selection = get_task(task).selection_metric  # threshold-free (tasks.task_from_mapping checks it)
    metric = selection if group is None else group_key(selection, group)
    scores = {
        m: metric_values(pooled[m].y, pooled[m].p, [metric], names=names, groups=groups)[metric][0]
        for m in sorted(candidates)
    }
    return max(scores, key=lambda m: (np.nan_to_num(scores[m], nan=-np.inf), -sorted(candidates).index(m)))


def _lean(results: dict) -> dict:
    """Bootstrap / permutation results without their distributions (the tables do not use them; they would be
    sent back from a worker process for nothing)."""
    out = {}
    for key, res in results.items():
        field = "null_distribution" if isinstance(res, PermutationResult) else "distribution"
        out[key] = dataclasses.replace(res, **{field: np.empty(0)})
    return out


def _resampling(o: Mapping) -> dict:
    """The bootstrap options of a worker's job (`o`), as the statistics functions name them."""
    return {"names": o["names"], "n_resamples": o["n_resamples"], "seed": o["seed"], "method": o["ci_method"],
            "stratify": o["stratify"], "groups": o["groups"]}  # fmt: skip


def _method_bootstrap(job: tuple) -> dict:
    """Bootstrap CIs of one method's pooled predictions (a worker's unit of `method_metrics`)."""
    y, p, thresholds, o = job
    return _lean(bootstrap_cis(y, p, o["keys"], ci=o["ci"], thresholds=thresholds, **_resampling(o)))


def _method_values(job: tuple):
    """One method's bootstrap values on its pooled stays (a worker's unit of `compare_methods` when every method
    has the same stays: each pair's paired CIs then follow from its two methods' values)."""
    y, p, thresholds, o = job
    return bootstrap_values(y, p, o["keys"], thresholds=thresholds, **_resampling(o))


def _pair_statistics(job: tuple) -> tuple[list[dict], dict | None, dict, int]:
    """One method pair on their common stays: point values of both, paired bootstrap CIs of the difference (unless
    `o["bootstrap"]` is False: computed from the methods' shared values instead) and paired permutation tests (a
    worker's unit of `compare_methods`)."""
    y, pa, pb, ta, tb, o = job
    point = [
        metric_values(y, p, o["keys"], names=o["names"], groups=o["groups"], thresholds=t)
        for p, t in ((pa, ta), (pb, tb))
    ]
    boot = None
    if o.get("bootstrap", True):
        boot = paired_bootstrap_cis(
            y, pa, pb, o["keys"], ci=o["ci"], thresholds_a=ta, thresholds_b=tb, **_resampling(o)
        )
    perm = paired_permutation_tests(
        y,
        pa,
        pb,
        o["keys"],
        names=o["names"],
        n_permutations=o["n_permutations"],
        seed=o["seed"],
        alternative=o["alternative"],
        groups=o["groups"],
        thresholds_a=ta,
        thresholds_b=tb,
        sequential_h=o["sequential_h"],
    )
    return point, None if boot is None else _lean(boot), _lean(perm), len(y)


def _same_stays(pooled: Mapping[str, PooledPredictions], methods: Sequence[str]) -> bool:
    """Whether every one of `methods` has the same stays in the same, increasing order (so a pair's aligned
    predictions are each method's own, and one bootstrap of each method serves all its pairs)."""
    if not methods:
        return False
    first = pooled[methods[0]]
    ordered = bool(np.all(np.diff(first.stay_id) > 0))
    return ordered and all(
        np.array_equal(pooled[m].stay_id, first.stay_id) and np.array_equal(pooled[m].y, first.y)
        for m in methods
    )


def compare_methods(
    preds: pd.DataFrame,
    task: str,
    *,
    reference: str | None = None,
    unimodal: Sequence[str] = (),
    metrics: Sequence[str] | None = None,
    pairwise: bool = True,
    pairwise_with: Sequence[str] | None = None,
    n_resamples: int = DEFAULTS.n_bootstrap,
    n_permutations: int = DEFAULTS.n_permutations,
    sequential_h: int = DEFAULTS.sequential_h,
    ci: float = DEFAULTS.confidence,
    seed: int = DEFAULTS.seed,
    ci_method: str = "percentile",
    alternative: str = "two-sided",
    stratify: bool = False,
    label_groups: Mapping[str, Sequence[str]] | None = None,
    val: pd.DataFrame | None = None,
    jobs: int = 1,
) -> pd.DataFrame:
    """Paired comparisons of methods on the same test stays: delta, bootstrap CI, permutation p, Holm and BH.

    Comparisons: every method other than the reference and the `unimodal` ones ("fusion methods") against the
    reference (comparison "reference"), and, with `pairwise`, every pair of methods (comparison "pairwise"), or
    with `pairwise_with` only the pairs that include one of those methods (the work of all pairs grows with the
    square of the number of methods). A pair is tested once: its pairwise row is (a, b) in name order, or
    (method, reference) when the pair is also a reference comparison (the same delta, CI and p as that row).
    The reference is `reference`, or else the unimodal method with the best test value of the task's selection
    metric. One row per (comparison, pair, label, metric); `delta` = metric(method_a) - metric(method_b).
    `label_groups` (multilabel: group -> labels) adds the macro averages over each group (label `group:<name>`);
    without an explicit `reference`, each group's reference is the unimodal method best on the group's macro
    selection metric. p-values are adjusted within each `family` = task x comparison x metric x
    (overall | per_label | group). `stratify` (binary, multiclass) resamples the bootstrap within classes.
    `val`: the runs' validation predictions (long), needed when a compared metric is thresholded (each model's
    predictions are decided at its own validation thresholds). `sequential_h`: each test stops after that many
    null statistics as extreme as the observed one (`paired_permutation_test`; its row's `n_permutations` is the
    number used). `jobs` > 1 computes the method pairs in that many
    worker processes (`analysis.parallel`; same table). Details: docs/statistics.md.
    """
    check_ci_options(ci, ci_method, n_resamples, "n_resamples")
    check_test_options(alternative, n_permutations, sequential_h)
    names = runs.prediction_columns(preds.columns, task)[2]
    groups = check_label_groups(label_groups, names) if get_task(task).kind == "multilabel" else {}
    keys = _expand_keys(task, metrics, names, groups)
    if needs_thresholds(task, keys) and val is None:
        raise StatisticsInputError(
            f"metrics {[k for k in keys if needs_thresholds(task, [k])]} are decided at validation thresholds: "
            "pass the runs' validation predictions (val)"
        )
    pooled = pool_predictions(preds, task, val if needs_thresholds(task, keys) else None)
    methods = sorted(pooled)
    unknown_methods = sorted({*unimodal, *([reference] if reference else [])} - set(methods))
    if unknown_methods:
        raise StatisticsInputError(f"method(s) {unknown_methods} have no predictions; methods: {methods}")
    group_refs: dict[str, str] = {}
    if reference is None and unimodal:
        group_refs = {g: _best_method(pooled, unimodal, task, names, g, groups) for g in groups}
        reference = _best_method(pooled, unimodal, task, names)
    key_ref = {
        k: group_refs.get(k.partition(GROUP_SEP)[2], reference) if GROUP_SEP in k else reference for k in keys
    }
    pairs: list[tuple[str, str, str, list[str]]] = []
    if reference is not None:
        for ref in dict.fromkeys(key_ref.values()):
            ref_keys = [k for k in keys if key_ref[k] == ref]
            pairs += [
                ("reference", m, ref, ref_keys)
                for m in methods
                if m not in (ref, reference) and m not in unimodal
            ]
    if pairwise:
        # a pair already compared with its reference keeps that orientation (method - reference): one test
        compared = {(a, b) for _, a, b, _ in pairs}
        pairs += [
            ("pairwise", *((b, a) if (b, a) in compared else (a, b)), keys)
            for a, b in itertools.combinations(methods, 2)
            if pairwise_with is None or a in pairwise_with or b in pairwise_with
        ]
    unique = list(dict.fromkeys((a, b) for _, a, b, _ in pairs))
    options = {"keys": keys, "names": names, "groups": groups, "n_resamples": n_resamples, "ci": ci, "seed": seed,
               "ci_method": ci_method, "stratify": stratify, "n_permutations": n_permutations,
               "alternative": alternative, "sequential_h": sequential_h}  # fmt: skip
    in_pairs = sorted({m for pair in unique for m in pair})
    shared = _same_stays(pooled, in_pairs)  # then each method is resampled once, not once per pair
    values = {}
    if shared:
        work_m = ((pooled[m].y, pooled[m].p, pooled[m].thresholds, options) for m in in_pairs)
        values = dict(zip(in_pairs, parallel_map(_method_values, work_m, jobs), strict=True))
    work = (
        (*_align(pooled[a], pooled[b], names, a, b), {**options, "bootstrap": not shared}) for a, b in unique
    )
    done = dict(zip(unique, parallel_map(_pair_statistics, work, jobs), strict=True))
    if shared:
        done = {
            (a, b): (point, _lean(paired_intervals(values[a], values[b], ci)), perm, n)
            for (a, b), (point, _, perm, n) in done.items()
        }
    rows = []
    for comparison, a, b, row_keys in pairs:
        point, boot, perm, n = done[(a, b)]
        for key in row_keys:
            label, metric = _split_key(task, key)
            rows.append(
                {
                    "task": task,
                    "comparison": comparison,
                    "family": "",
                    "label": label,
                    "metric": metric,
                    "method_a": a,
                    "method_b": b,
                    "estimate_a": float(point[0][key][0]),
                    "estimate_b": float(point[1][key][0]),
                    "delta": boot[key].estimate,
                    "ci_low": boot[key].ci_low,
                    "ci_high": boot[key].ci_high,
                    "p_value": perm[key].p_value,
                    "n_stays": n,
                    "n_seeds_a": pooled[a].n_seeds,
                    "n_seeds_b": pooled[b].n_seeds,
                    "n_resamples_valid": boot[key].n_valid,
                    "n_permutations": perm[key].n_permutations,
                    "reference": b if comparison == "reference" else reference,
                    "scope": _scope(key),
                }
            )
    table = pd.DataFrame(rows, columns=[*_COMPARE_COLUMNS, "scope"])
    if len(table):
        table["family"] = (
            table["task"] + ":" + table["comparison"] + ":" + table["metric"] + ":" + table["scope"]
        )
        for col, fn in (("p_holm", holm), ("p_bh", benjamini_hochberg)):
            table[col] = table.groupby("family", sort=False)["p_value"].transform(
                lambda s, f=fn: f(s.to_numpy())
            )
    table = table.drop(columns="scope")
    table.attrs["reference"] = reference
    table.attrs["group_references"] = group_refs
    return table


_COMPARE_COLUMNS = [
    "task",
    "comparison",
    "family",
    "label",
    "metric",
    "method_a",
    "method_b",
    "estimate_a",
    "estimate_b",
    "delta",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "p_bh",
    "n_stays",
    "n_seeds_a",
    "n_seeds_b",
    "n_resamples_valid",
    "n_permutations",
    "reference",
]


def method_metrics(
    preds: pd.DataFrame,
    task: str,
    *,
    metrics: Sequence[str] | None = None,
    n_resamples: int = DEFAULTS.n_bootstrap,
    ci: float = DEFAULTS.confidence,
    seed: int = DEFAULTS.seed,
    ci_method: str = "percentile",
    stratify: bool = False,
    label_groups: Mapping[str, Sequence[str]] | None = None,
    val: pd.DataFrame | None = None,
    jobs: int = 1,
) -> pd.DataFrame:
    """Every method's metrics with bootstrap CIs (seed-averaged probabilities), and their mean and sd over seeds.

    `estimate`/`ci_low`/`ci_high` describe the seed ensemble on all test stays; `seed_mean`/`seed_sd` (ddof=1,
    NaN with one seed) summarise the metric computed separately per seed, i.e. the training-seed variability.
    Thresholded metrics are decided at the validation thresholds of `val` (the runs' validation predictions,
    long): the ensemble's per fold, and each seed's own for the per-seed values. Without `val` they are left out.
    `jobs` > 1 bootstraps the methods in that many worker processes (same table).
    """
    check_ci_options(ci, ci_method, n_resamples, "n_resamples")
    names = runs.prediction_columns(preds.columns, task)[2]
    kind = get_task(task).kind
    groups = check_label_groups(label_groups, names) if kind == "multilabel" else {}
    keys = list(metrics) if metrics is not None else available_metrics(kind, names, groups)
    if val is None:
        keys = [k for k in keys if not needs_thresholds(task, [k])]
    use_val = val if needs_thresholds(task, keys) else None
    pooled = pool_predictions(preds, task, use_val)
    options = {"keys": keys, "names": names, "groups": groups, "n_resamples": n_resamples, "ci": ci, "seed": seed,
               "ci_method": ci_method, "stratify": stratify}  # fmt: skip
    jobs_in = ((pp.y, pp.p, pp.thresholds, options) for pp in pooled.values())
    boots = parallel_map(_method_bootstrap, jobs_in, jobs)
    rows = []
    for (method, pp), boot in zip(pooled.items(), boots, strict=True):
        per_seed = []
        for seed_value, g in preds.loc[preds["method"] == method].groupby("seed", sort=True):
            v = None if use_val is None else use_val.loc[use_val["seed"] == seed_value]
            one = pool_predictions(g, task, v)[method]
            per_seed.append(
                metric_values(one.y, one.p, keys, names=names, groups=groups, thresholds=one.thresholds)
            )
        for key in keys:
            label, metric = _split_key(task, key)
            seed_vals = np.array([v[key][0] for v in per_seed])
            rows.append(
                {
                    "task": task,
                    "label": label,
                    "metric": metric,
                    "method": method,
                    "estimate": boot[key].estimate,
                    "ci_low": boot[key].ci_low,
                    "ci_high": boot[key].ci_high,
                    "n_stays": len(pp.y),
                    "n_resamples_valid": boot[key].n_valid,
                    "n_seeds": pp.n_seeds,
                    "seed_mean": float(np.mean(seed_vals)),
                    "seed_sd": float(np.std(seed_vals, ddof=1)) if len(seed_vals) > 1 else float("nan"),
                }
            )
    return pd.DataFrame(rows)
