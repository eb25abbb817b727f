"""Which stays a run sees: the five patient-disjoint folds, the cohorts, the label columns of a task and the
controlled X-ray dropout (torch-free; `data.loading` turns the chosen stays into tensors).

- Folds: test = k, validation = (k mod 5) + 1, train = the other three (`fold_roles`).
- Cohorts: `base` keeps every stay (a missing X-ray is handled per stay), `matched` the stays with an X-ray.
- X-ray dropout removes an exact number of a split's X-rays, chosen from a per-stay hash of (seed, stay_id), so it
  is deterministic per stay and nested across rates (the stays dropped at r are dropped at every r' > r).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from carebench.data.definitions import load_phenotypes
from carebench.errors import UserError
from carebench.tasks import get_task

N_FOLDS = 5
COHORTS = ("base", "matched")
SPLITS = ("train", "val", "test")


class LoadingError(UserError, ValueError):
    """A loading option does not fit the dataset (unknown fold/cohort/task, empty split, missing images)."""


def fold_roles(fold: int) -> dict[str, tuple[int, ...]]:
    """Which folds play which role: test = k, validation = (k mod 5) + 1, train = the other three."""
    if not isinstance(fold, int) or not 1 <= fold <= N_FOLDS:
        raise LoadingError(f"--fold must be an integer 1..{N_FOLDS}, got {fold!r}")
    val = fold % N_FOLDS + 1
    return {
        "train": tuple(f for f in range(1, N_FOLDS + 1) if f not in (fold, val)),
        "val": (val,),
        "test": (fold,),
    }


def label_columns(task: str) -> list[str]:
    """The cohort.parquet columns holding a task's labels (one per output of a multilabel task, one otherwise)."""
    spec = get_task(task)
    if task == "mortality":
        return ["label_mortality"]
    if task == "phenotype":
        return [p.column for p in load_phenotypes()]
    if task == "los":
        return ["label_los"]
    raise LoadingError(f"task {spec.name!r}: the dataset declares no label columns for it")


def output_names(task: str) -> list[str]:
    """Names of a task's outputs (prediction columns `p_<name>`): the task's own name (binary), each label column
    (multilabel), or `<task>_0` ... `<task>_<K-1>` (multiclass)."""
    spec = get_task(task)
    if spec.kind == "binary":
        return [task]
    if spec.kind == "multilabel":
        return label_columns(task)
    return [f"{task}_{k}" for k in range(spec.num_outputs)]


def check_splits(splits: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The splits a fold may build, in `SPLITS` order: a subset of `SPLITS` that holds "train" (the
    normalisation statistics come from it)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or "train" not in splits:
        raise LoadingError(f"splits must be a subset of {SPLITS} holding 'train', got {tuple(splits)}")
    return tuple(s for s in SPLITS if s in splits)


def split_rows(
    cohort: pd.DataFrame,
    task: str,
    fold: int,
    cohort_name: str = "base",
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, np.ndarray]:
    """Row indices (into the dataset arrays) of the train / val / test stays of a fold and cohort.

    `base` keeps every stay (a missing X-ray is handled per sample); `matched` keeps the stays with an X-ray.
    Stays whose task label is missing are left out. Only the `splits` asked for are returned (a tuning study
    asks for train and val: the rows of its test split are never selected).
    """
    if cohort_name not in COHORTS:
        raise LoadingError(f"--cohort must be one of {COHORTS}, got {cohort_name!r}")
    wanted = check_splits(splits)
    roles = {s: fs for s, fs in fold_roles(fold).items() if s in wanted}
    cols = label_columns(task)
    missing = [c for c in cols if c not in cohort.columns]
    if missing:
        raise LoadingError(f"cohort.parquet: missing label columns {missing} for task {task!r}")
    keep = cohort[cols].notna().all(axis=1).to_numpy()
    if cohort_name == "matched":
        keep = keep & cohort["has_cxr"].to_numpy(dtype=bool)
    folds = cohort["fold"].to_numpy()
    out = {}
    for split, fs in roles.items():
        rows = np.flatnonzero(keep & np.isin(folds, fs))
        if len(rows) == 0:
            raise LoadingError(
                f"cohort.parquet: the {split} split of fold {fold} ({cohort_name} cohort, "
                f"task {task}) is empty (folds {list(fs)})"
            )
        out[split] = rows
    return out


# ----------------------------------------------------------------------------------------------- X-ray dropout
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mixing function: a stable per-stay pseudo-random number on every platform."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stay_hash(stay_ids: np.ndarray, seed: int) -> np.ndarray:
    """uint64 hash of (seed, stay_id); depends on nothing else."""
    with np.errstate(over="ignore"):
        s = _splitmix64(np.array([seed], dtype=np.int64).astype(np.uint64))[0]
        return _splitmix64(np.asarray(stay_ids, dtype=np.int64).astype(np.uint64) ^ s)


def n_dropped(rate: float, n_with_cxr: int) -> int:
    """How many of a split's X-rays a dropout rate removes: round(rate x n), halves rounded up."""
    return math.floor(rate * n_with_cxr + 0.5)


def cxr_dropout(stay_ids: np.ndarray, has_cxr: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Boolean mask of the stays whose X-ray is removed.

    Exactly `n_dropped(rate, has_cxr.sum())` stays with an X-ray are chosen: those with the smallest
    hash(seed, stay_id) (ties by stay_id). The choice is therefore deterministic per stay and seed, and a
    higher rate removes a superset of the X-rays a lower rate removes.
    """
    if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
        raise LoadingError(f"X-ray dropout rate must be in [0, 1], got {rate!r}")
    stay_ids = np.asarray(stay_ids, dtype=np.int64)
    has_cxr = np.asarray(has_cxr, dtype=bool)
    drop = np.zeros(len(stay_ids), dtype=bool)
    cand = np.flatnonzero(has_cxr)
    k = n_dropped(float(rate), len(cand))
    if k:
        h = stay_hash(stay_ids[cand], seed)
        order = np.lexsort((stay_ids[cand], h))
        drop[cand[order[:k]]] = True
    return drop
