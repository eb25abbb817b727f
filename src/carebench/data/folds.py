"""Which stays a run sees: the five patient-disjoint folds, the cohorts and the controlled X-ray dropout
(torch-free; `data.loading` turns the chosen stays into tensors).

- Fold assignment (`assign_folds`): all stays of a subject share a fold, so a model is never tested on a patient it
  saw in training. Optionally stratified: a subject's stratum is the maximum of its stays' strata, and subjects
  are dealt round-robin to folds within each stratum, continuing the deal across strata, so every fold gets the
  same number of subjects (+-1) overall and per stratum. The dealing order is the SHA-256 of "<seed>:<subject>",
  not a pseudo-random generator, so the folds depend only on the seed, the subjects and their strata (not on row
  order, NumPy version or platform).
- Fold roles: test = k, validation = (k mod 5) + 1, train = the other three (`fold_roles`).
- Cohorts: `base` keeps every stay (a missing X-ray is handled per stay), `matched` the stays with an X-ray.
- X-ray dropout removes an exact number of a split's X-rays, chosen from a per-stay hash of (seed, stay_id), so it
  is deterministic per stay and nested across rates (the stays dropped at r are dropped at every r' > r).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from carebench.errors import UserError

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


def _deal_key(seed: int, subject: int) -> bytes:
    return hashlib.sha256(f"{seed}:{subject}".encode()).digest()


def assign_folds(
    subject_id: pd.Series, seed: int, n_folds: int = N_FOLDS, strata: pd.Series | None = None
) -> pd.Series:
    """Fold 1..n_folds for each row of `subject_id` (same index), equal for all rows of a subject."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    subject_id = pd.Series(subject_id)
    if subject_id.isna().any():
        raise ValueError("subject_id has missing values")
    subjects = subject_id.to_numpy(dtype=np.int64)
    if strata is None:
        stratum = np.zeros(len(subjects), dtype=np.int64)
    else:
        if len(strata) != len(subjects):
            raise ValueError(f"strata has {len(strata)} rows, subject_id has {len(subjects)}")
        stratum = pd.Series(strata).to_numpy(dtype=np.int64)
    per_subject = (
        pd.DataFrame({"subject": subjects, "stratum": stratum}).groupby("subject", sort=True)["stratum"].max()
    )
    table = pd.DataFrame(
        {
            "subject": per_subject.index.to_numpy(),
            "stratum": per_subject.to_numpy(),
            "key": [_deal_key(int(seed), int(s)) for s in per_subject.index],
        }
    )
    table = table.sort_values(["stratum", "key"], kind="stable").reset_index(drop=True)
    table["fold"] = (np.arange(len(table)) % n_folds + 1).astype(np.int8)
    fold_of = dict(zip(table["subject"].to_numpy(), table["fold"].to_numpy(), strict=True))
    return pd.Series([fold_of[s] for s in subjects], index=subject_id.index, dtype=np.int8, name="fold")


def check_splits(splits: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The splits a fold may build, in `SPLITS` order: a subset of `SPLITS` that holds "train" (the
    normalisation statistics come from it)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or "train" not in splits:
        raise LoadingError(f"splits must be a subset of {SPLITS} holding 'train', got {tuple(splits)}")
    return tuple(s for s in SPLITS if s in splits)


def split_rows(
    cohort: pd.DataFrame,
    labels: Sequence[str],
    fold: int,
    cohort_name: str = "base",
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, np.ndarray]:
    """Row indices (into the dataset arrays) of the train / val / test stays of a fold and cohort.

    `labels`: the cohort columns holding the task's labels (the dataset declares them). `base` keeps every stay
    (a missing X-ray is handled per sample); `matched` keeps the stays with an X-ray. Stays whose label is
    missing are left out. Only the `splits` asked for are returned (a tuning study asks for train and val: the
    rows of its test split are never selected).
    """
    if cohort_name not in COHORTS:
        raise LoadingError(f"--cohort must be one of {COHORTS}, got {cohort_name!r}")
    wanted = check_splits(splits)
    roles = {s: fs for s, fs in fold_roles(fold).items() if s in wanted}
    cols = [labels] if isinstance(labels, str) else list(labels)
    missing = [c for c in cols if c not in cohort.columns]
    if missing:
        raise LoadingError(f"cohort.parquet: missing label columns {missing}")
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
                f"labels {cols}) is empty (folds {list(fs)})"
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
