"""Patient-disjoint, stratified, seed-deterministic cross-validation folds.

Why this way:
- Patient-disjoint: all stays of one subject share a fold, so a model is never tested on a patient it saw in
  training (stays of the same patient are strongly correlated).
- Stratified: a subject's stratum is the maximum of its stays' strata (in `prepare`: 1 if any of its stays
  died in the ICU). Subjects are dealt round-robin to folds within each stratum, continuing the deal across
  strata, so every fold gets the same number of subjects (+-1) overall and per stratum.
- Deterministic and portable: the order in which subjects are dealt is the SHA-256 of "<seed>:<subject_id>",
  not a pseudo-random generator, so the folds depend only on the seed, the set of subjects and their strata
  (not on row order, NumPy version or platform).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def _deal_key(seed: int, subject: int) -> bytes:
    return hashlib.sha256(f"{seed}:{subject}".encode()).digest()


def assign_folds(
    subject_id: pd.Series, seed: int, n_folds: int = 5, strata: pd.Series | None = None
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
