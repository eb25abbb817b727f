"""Finished runs -> the groups and long prediction tables the analysis pools.

Why discovery by scanning rather than reading `RUNS/runs.csv`: the index lists *planned* runs with a status, but
a run counts only when its record is complete (`runs.find_runs`), and runs trained by hand with
`carebench train --out RUNS` belong to the same benchmark.

Runs are grouped for comparison by task x cohort x X-ray dropout setting; within a group the methods are the model
names and every (method, fold, seed) must be one run, otherwise two configurations of the same method would be
pooled as if they were seeds (an error names both run ids).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from carebench import runs
from carebench.errors import UserError
from carebench.runs import RunRecord

KEY_COLUMNS = ["method", "run_id", "fold", "seed"]
GroupKey = tuple[str, str, tuple[float, float, float]]  # (task, cohort, (train, val, test) X-ray dropout)


def load_runs(runs_dir: str | Path) -> list[RunRecord]:
    """`runs.find_runs` without validation-only runs (tuning trials: never tested, they have nothing to pool),
    with the modalities of records that predate their being recorded filled in from the model registry (an
    unregistered model is then an error naming the run)."""
    found = runs.find_runs(runs_dir)
    records = [r for r in found if r.tested]
    if not records:
        raise runs.RunsError(
            f"{runs_dir}: its {len(found)} runs are validation-only tuning trials, which are never tested; "
            "analyse the benchmark whose plan uses their study (docs/tuning.md)"
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


def recorded_predictions(records: Iterable[RunRecord]) -> pd.DataFrame:
    """The long table of the recorded test predictions of `records`."""
    return long_predictions((r, runs.read_predictions(r)) for r in records)
