"""Finished runs -> the groups and long prediction tables the analysis pools.

Why discovery by scanning rather than reading `RUNS/runs.csv`: the index lists *planned* runs with a status, but
a run counts only when its record is complete (`runs.find_runs`), and runs trained by hand with
`carebench train --out RUNS` belong to the same benchmark.

Runs are grouped for comparison by task x cohort x X-ray dropout setting; within a group the methods are the model
names and every (method, fold, seed) must be one run, otherwise two configurations of the same method would be
pooled as if they were seeds (an error names both run ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from carebench import runs
from carebench.data.store import MANIFEST, dataset_declarations
from carebench.errors import UserError
from carebench.runs import RunRecord
from carebench.tasks import TASK_NAMES, declared_tasks

KEY_COLUMNS = ["method", "run_id", "fold", "seed"]
GroupKey = tuple[str, str, tuple[float, float, float]]  # (task, cohort, (train, val, test) X-ray dropout)


def load_runs(
    runs_dir: str | Path, excluded: dict[str, str] | None = None, data: str | Path | None = None
) -> list[RunRecord]:
    """`runs.find_runs` without validation-only runs (tuning trials: never tested, they have nothing to pool),
    with the modalities of records that predate their being recorded filled in from the model registry (an
    unregistered model is then an error naming the run). The tasks a dataset declares are declared for this
    process first (`declare_run_tasks`; `data`: the dataset's path when it moved).

    With `excluded` (a dict), a finished run whose record is unusable (`runs.run_problem`: corrupted predictions
    or metrics, malformed config) is left out and recorded there (run id -> the problem, naming the file) instead
    of stopping the analysis; so are the runs that would then pool unequal folds (`balance_folds`)."""
    found = runs.find_runs(runs_dir, broken=excluded)
    tested = [r for r in found if r.tested]
    if found and not tested:
        raise runs.RunsError(
            f"{runs_dir}: its {len(found)} runs are validation-only tuning trials, which are never tested; "
            "analyse the benchmark whose plan uses their study (docs/tuning.md)"
        )
    declare_run_tasks(tested, data)
    if excluded is None:
        records = tested
    else:
        records = []
        for r in tested:
            problem = runs.run_problem(r)
            if problem is None:
                records.append(r)
            else:
                excluded[r.run_id] = problem
        records = balance_folds(records, excluded)
        if not records:
            raise runs.RunsError(
                f"{runs_dir}: no usable finished run ({len(excluded)} unusable: "
                f"{'; '.join(f'{k}: {v}' for k, v in list(excluded.items())[:3])})"
            )
    if all(r.modalities for r in records):
        return records
    from carebench.models import get_model_class  # only for old records: the registry imports torch

    out = []
    for r in records:
        if not r.modalities:
            try:
                r = r.with_modalities(get_model_class(r.method).modalities)
            except UserError as e:
                raise runs.RunsError(
                    f"{r.path / runs.CONFIG}: model {r.method!r} is not registered ({e})"
                ) from None
        out.append(r)
    return out


def declare_run_tasks(records: Iterable[RunRecord], data: str | Path | None = None) -> None:
    """Declare for this process the tasks of `records` that are not built in.

    A dataset's own task is described by the dataset's manifest, not by the run record, so a process that reads
    runs before opening their dataset (analyze) reads the declarations from the dataset the runs name (`data`
    instead when given: the dataset moved). A missing dataset is an error naming the tasks it would declare.
    """
    records = list(records)
    unknown = sorted({r.task for r in records} - {*TASK_NAMES, *declared_tasks()})
    if not unknown:
        return
    roots = [Path(data)] if data is not None else [Path(r.data) for r in records if r.task in unknown]
    for root in dict.fromkeys(roots):
        if not (root / MANIFEST).is_file():
            raise runs.RunsError(
                f"{root}: dataset of the runs not found; it declares their task(s) {unknown} "
                "(pass --data DIR if it moved)"
            )
        dataset_declarations(root)


def balance_folds(records: list[RunRecord], excluded: dict[str, str]) -> list[RunRecord]:
    """After unusable runs are left out, keep per (task, cohort, dropout, method) only the folds every seed still
    has, so seeds keep covering the same stays (`comparisons.pool_predictions` requires it); a run left out for
    this is recorded in `excluded` with the reason."""
    if not excluded:
        return records
    by_method: dict[tuple, list[RunRecord]] = {}
    for r in records:
        by_method.setdefault((r.task, r.cohort, r.dropout, r.method), []).append(r)
    keep = []
    for members in by_method.values():
        folds_by_seed: dict[int, set[int]] = {}
        for r in members:
            folds_by_seed.setdefault(r.seed, set()).add(r.fold)
        common = set.intersection(*folds_by_seed.values())
        for r in members:
            if r.fold in common:
                keep.append(r)
            else:
                gone = sorted(s for s, f in folds_by_seed.items() if r.fold not in f)
                excluded[r.run_id] = (
                    f"left out so that every seed of {r.method!r} covers the same stays: no usable run of fold "
                    f"{r.fold} for seed(s) {gone}"
                )
    order = {id(r): k for k, r in enumerate(records)}
    return sorted(keep, key=lambda r: order[id(r)])


def groups(records: Iterable[RunRecord]) -> dict[GroupKey, list[RunRecord]]:
    """Runs keyed by (task, cohort, dropout rates), each group checked to hold one run per (method, fold, seed)."""
    out: dict[GroupKey, list[RunRecord]] = {}
    for r in records:
        out.setdefault((r.task, r.cohort, r.dropout), []).append(r)
    for (task, cohort, rates), members in out.items():
        seen: dict[tuple[str, int, int], RunRecord] = {}
        for r in members:
            key = (r.method, r.fold, r.seed)
            if key in seen:
                raise runs.RunsError(
                    f"runs {seen[key].run_id} and {r.run_id}: two configurations of method {r.method!r} for task "
                    f"{task!r}, cohort {cohort!r}, fold {r.fold}, seed {r.seed} (X-ray dropout {rates}); keep one "
                    "per runs directory (they would be pooled as one method)"
                )
            seen[key] = r
    return out


def with_keys(frame: pd.DataFrame, record: RunRecord) -> pd.DataFrame:
    """A predictions frame with the run's `method`, `run_id`, `fold` and `seed` columns in front."""
    keys = pd.DataFrame(
        {"method": record.method, "run_id": record.run_id, "fold": record.fold, "seed": record.seed},
        index=frame.index,
    )
    return pd.concat([keys, frame], axis=1)


def long_predictions(frames: Iterable[tuple[RunRecord, pd.DataFrame]]) -> pd.DataFrame:
    """Per-run prediction frames -> the long table the comparisons pool (one row per method, seed and stay;
    folds side by side)."""
    parts = [with_keys(f, r) for r, f in frames]
    if not parts:
        return pd.DataFrame(columns=KEY_COLUMNS)
    return pd.concat(parts, ignore_index=True)


def recorded_predictions(
    records: Iterable[RunRecord],
    split: str = "test",
    predict: Callable[[RunRecord], pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """The long table of the recorded predictions of `records` on `split` ("test" or "val"). A record that
    predates its validation predictions gets them from `predict(record)` (re-predicted from its checkpoint);
    without `predict` that is an error naming the run."""

    def frame(r: RunRecord) -> pd.DataFrame:
        f = runs.read_predictions(r, split)
        if f is None:
            if predict is None:
                raise runs.RunsError(f"{r.path / runs.VAL_PREDICTIONS}: missing (the run predates it)")
            f = predict(r)
        return f

    return long_predictions((r, frame(r)) for r in records)
