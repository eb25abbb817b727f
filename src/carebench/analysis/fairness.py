"""Fairness of finished runs: the fairness kernels applied to a run's predictions and its dataset's groups.

`analyze_fairness` takes one run's test (and validation) predictions frames and the groups of every stay (one
row per stay: `stay_id` and one column per attribute, as `ProcessedDataset.groups()` derives them from the
attributes the manifest declares); `fairness_tables` does it for every main run of a benchmark, with run key
columns, as `carebench analyze` writes them. Decision thresholds are chosen on each run's validation predictions,
never on test. docs/fairness.md has the definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from carebench import runs
from carebench.analysis.parallel import Workers, shared_value
from carebench.analysis.resume import WorkCache
from carebench.errors import UserError
from carebench.evaluation.fairness import (
    FairnessInputError,
    bootstrap_fairness,
    choose_threshold,
    fairness_summary,
    group_metrics,
)
from carebench.evaluation.options import DEFAULTS
from carebench.runs import RunRecord
from carebench.tasks import get_task


@dataclass
class FairnessReport:
    """What `analyze_fairness` returns: the group table and the summary, each with bootstrap CI columns."""

    groups: pd.DataFrame  # group_metrics + <metric>_low, <metric>_high
    summary: pd.DataFrame  # fairness_summary + gap_low, gap_high, n_resamples_valid
    thresholds: dict[str, float]


def analyze_fairness(
    test_predictions: pd.DataFrame,
    groups: pd.DataFrame,
    task: str,
    *,
    val_predictions: pd.DataFrame | None = None,
    threshold: str | float = "youden",
    n_resamples: int = DEFAULTS.n_bootstrap,
    seed: int = DEFAULTS.seed,
    confidence: float = DEFAULTS.confidence,
    attributes: Iterable[str] | None = None,
    intersections: Iterable[Sequence[str]] = (),
    min_group_size: int = 10,
    n_bins: int = 10,
) -> FairnessReport:
    """Fairness of one run: thresholds chosen on its validation predictions, metrics on its test predictions.

    Stays join `groups` (one row per stay: `stay_id` and the attribute columns, e.g. `ProcessedDataset.groups()`)
    by `stay_id`; `attributes` None = every attribute column of `groups`. The missing-X-ray rate of a group
    counts the stays whose model input had no X-ray (`cxr_input` of the predictions when present, else the
    groups' `has_cxr`). `threshold` is a rule ("youden", "f1"; needs `val_predictions`) or a fixed number. A
    multiclass task decides by the argmax class and needs no threshold. The other options are those of
    `group_metrics` and `bootstrap_fairness`.
    """
    if "stay_id" not in groups.columns:
        raise FairnessInputError(
            "groups: column 'stay_id' missing (one row per stay with its attribute columns)"
        )
    if attributes is None:
        attributes = [c for c in groups.columns if c != "stay_id"]
    options = {
        "attributes": list(attributes),
        "intersections": [tuple(i) for i in intersections],
        "min_group_size": min_group_size,
        "n_bins": n_bins,
    }
    y, p, names = runs.prediction_arrays(test_predictions, task)
    joined = test_predictions[["stay_id"]].merge(
        groups, on="stay_id", how="left", validate="one_to_one", indicator=True
    )
    if (joined["_merge"] != "both").any():
        n_miss = int((joined["_merge"] != "both").sum())
        raise FairnessInputError(
            f"groups: {n_miss} stay_id(s) of the predictions are not in the dataset's cohort"
        )
    groups = joined.drop(columns=["_merge", "stay_id"])
    cxr = (
        test_predictions["cxr_input"].astype(bool).to_numpy()
        if "cxr_input" in test_predictions.columns
        else groups["has_cxr"].to_numpy()
        if "has_cxr" in groups.columns
        else None
    )
    thr = None
    if get_task(task).kind != "multiclass":
        if isinstance(threshold, str):
            if val_predictions is None:
                raise FairnessInputError(
                    f"threshold rule {threshold!r}: needs val_predictions (thresholds are "
                    "chosen on validation, never on test), or pass a fixed number"
                )
            yv, pv, _ = runs.prediction_arrays(val_predictions, task)
            thr = choose_threshold(yv, pv, threshold)
        else:
            thr = choose_threshold(y, p, threshold)  # validates the fixed number
    table = group_metrics(y, p, groups, thr, labels=names, cxr_available=cxr, **options)
    summary = fairness_summary(table)
    gci, sci = bootstrap_fairness(
        y, p, groups, thr, labels=names, n_resamples=n_resamples, seed=seed, confidence=confidence, **options
    )
    wide = gci.pivot(index=["label", "attribute", "group"], columns="metric", values=["ci_low", "ci_high"])
    wide.columns = [f"{m}_{'low' if stat == 'ci_low' else 'high'}" for stat, m in wide.columns]
    table = table.merge(wide.reset_index(), on=["label", "attribute", "group"], how="left")
    sci = sci.rename(columns={"ci_low": "gap_low", "ci_high": "gap_high", "n_valid": "n_resamples_valid"})
    summary = summary.merge(sci, on=["label", "attribute", "metric"], how="left")
    thr_map = (
        {} if thr is None else dict(zip(names, np.broadcast_to(thr, (len(names),)).tolist(), strict=True))
    )
    return FairnessReport(groups=table, summary=summary, thresholds=thr_map)


def _run_fairness(job: tuple) -> FairnessReport | str:
    """One run's fairness report, or the reason it was skipped (a worker's unit of `fairness_tables`; the stays'
    groups are the workers' shared "groups")."""
    r, options, validation = job
    test = runs.read_predictions(r)
    val = runs.read_predictions(r, "val")
    if val is None and get_task(r.task).kind != "multiclass":
        val = validation(r)
    try:
        return analyze_fairness(test, shared_value("groups"), r.task, val_predictions=val, **options)
    except UserError as e:
        return f"fairness of run {r.run_id} skipped: {e}"


def fairness_tables(
    records: Sequence[RunRecord],
    groups: pd.DataFrame,
    *,
    attributes: Sequence[str],
    intersections: Sequence[Sequence[str]] = (),
    n_resamples: int,
    seed: int,
    confidence: float,
    validation: Callable[[RunRecord], pd.DataFrame],
    warn: Callable[[str], None],
    tick: Callable[[], None] = lambda: None,
    workers: Workers | int = 1,
    cache: WorkCache | None = None,
) -> dict[str, pd.DataFrame]:
    """Fairness tables of each run (`analyze_fairness`), with run key columns in front: fairness_groups,
    fairness_summary, fairness_thresholds. `validation(record)` gives a run's validation predictions when its
    record predates `predictions_val.parquet` (re-predicted from the checkpoint); a run whose fairness cannot be
    computed is reported through `warn` and left out. Runs are mapped over `workers` (a `Workers` sharing these
    `groups` as "groups", or a number of processes); `validation` must then be picklable. With `cache`, a run's
    tables kept by an interrupted analysis are reused and each newly computed run's tables are kept
    (`analysis.resume`)."""
    if isinstance(workers, int):
        with Workers(workers, shared={"groups": groups}) as pool:
            return fairness_tables(records, groups, attributes=attributes, intersections=intersections,
                                   n_resamples=n_resamples, seed=seed, confidence=confidence, validation=validation,
                                   warn=warn, tick=tick, workers=pool, cache=cache)  # fmt: skip
    if workers.shared.get("groups") is not groups:
        raise ValueError("fairness_tables: the workers must share these groups as 'groups'")
    options = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence, "attributes": attributes,
               "intersections": [tuple(i) for i in intersections]}  # fmt: skip
    g_parts, s_parts, t_parts = [], [], []
    keys = {r.run_id: cache.key("fairness", options, [r]) for r in records} if cache else {}
    kept = {}
    for r in records if cache else ():
        if piece := cache.get(keys[r.run_id]):
            kept[r.run_id] = FairnessReport(piece[0]["groups"], piece[0]["summary"], piece[1]["thresholds"])
    computed = workers.map(_run_fairness, [(r, options, validation) for r in records if r.run_id not in kept])
    for r in records:
        rep = kept.get(r.run_id) or next(computed)
        if cache and r.run_id not in kept and not isinstance(rep, str):
            cache.put(
                keys[r.run_id], {"groups": rep.groups, "summary": rep.summary}, {"thresholds": rep.thresholds}
            )
        if isinstance(rep, str):
            warn(rep)
            tick()
            continue
        key = {"task": r.task, "cohort": r.cohort, "method": r.method, "run_id": r.run_id, "fold": r.fold,
               "seed": r.seed}  # fmt: skip
        g_parts.append(pd.concat([pd.DataFrame(key, index=rep.groups.index), rep.groups], axis=1))
        s_parts.append(pd.concat([pd.DataFrame(key, index=rep.summary.index), rep.summary], axis=1))
        t_parts.append(pd.DataFrame([{**key, "label": k, "threshold": v} for k, v in rep.thresholds.items()]))
        tick()
    return {
        "fairness_groups": _concat(g_parts),
        "fairness_summary": _concat(s_parts),
        "fairness_thresholds": _concat(t_parts),
    }


def _concat(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
