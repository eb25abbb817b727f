"""The five subject-disjoint folds of a MEDS dataset.

`--folds splits` (the default when metadata/subject_splits.parquet exists) keeps the MEDS split: held_out ->
fold 1, tuning -> fold 2, train -> folds 3, 4, 5 (dealt by `assign_folds`, seeded, stratified). The
benchmark's fold 1 then tests on held_out, validates on tuning and trains on train: exactly the MEDS split. Folds
2-5 rotate the roles, so a 5-fold run also trains on tuning and held_out subjects; use fold 1 alone where the
MEDS held_out set must stay unseen. `--folds hash` (the default without a splits file) deals every subject into
5 folds. Stratum in both: 1 if any of the subject's rows has a positive label of the first binary task.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import meds
import numpy as np
import pandas as pd

from carebench.data.folds import assign_folds
from carebench.data.meds.source import MAX_LISTED, MedsInputError, sql_str

N_FOLDS = 5
FOLD_MODES = ("auto", "splits", "hash")
SPLIT_FOLDS = {meds.held_out_split: 1, meds.tuning_split: 2}
TRAIN_FOLDS = (3, 4, 5)


def read_splits(con: duckdb.DuckDBPyConnection, path: Path) -> pd.DataFrame:
    df = con.execute(f"SELECT subject_id, split FROM read_parquet({sql_str(path)})").df()
    if df["subject_id"].isna().any() or df["split"].isna().any():
        raise MedsInputError(f"{path}: columns 'subject_id', 'split' must not be null")
    dup = df["subject_id"].duplicated()
    if dup.any():
        raise MedsInputError(
            f"{path}: column 'subject_id': subject {int(df.loc[dup, 'subject_id'].iloc[0])} has more than one "
            f"split (expected one row per subject)"
        )
    known = {meds.train_split, meds.tuning_split, meds.held_out_split}
    bad = sorted(set(df["split"]) - known)
    if bad:
        raise MedsInputError(
            f"{path}: column 'split' has values {bad[:MAX_LISTED]}; expected {', '.join(sorted(known))} "
            f"(or pass --folds hash to ignore the MEDS splits)"
        )
    return df


def assign(
    subject_id: pd.Series,
    strata: pd.Series,
    *,
    mode: str,
    splits: pd.DataFrame | None,
    splits_path: Path | None,
    seed: int,
) -> tuple[pd.Series, pd.Series | None, str]:
    """(fold per row, MEDS split per row or None, the mode used)."""
    if mode not in FOLD_MODES:
        raise MedsInputError(f"--folds {mode!r}: expected one of {', '.join(FOLD_MODES)}")
    if mode == "auto":
        mode = "splits" if splits is not None else "hash"
    if mode == "splits" and splits is None:
        raise MedsInputError(
            "--folds splits: the MEDS root has no metadata/subject_splits.parquet (use --folds hash)"
        )
    subjects = subject_id.unique()
    if mode == "hash":
        if len(subjects) < N_FOLDS:
            raise MedsInputError(
                f"--labels: the labelled rows cover {len(subjects)} subjects; at least {N_FOLDS} are needed "
                f"for {N_FOLDS} subject-disjoint folds"
            )
        return assign_folds(subject_id, seed, N_FOLDS, strata=strata), None, mode
    split_of = dict(zip(splits["subject_id"].astype(np.int64), splits["split"], strict=True))
    missing = sorted(int(s) for s in subjects if int(s) not in split_of)
    if missing:
        shown = ", ".join(map(str, missing[:MAX_LISTED])) + (" ..." if len(missing) > MAX_LISTED else "")
        raise MedsInputError(
            f"{splits_path}: column 'subject_id' lacks {len(missing)} labelled subject(s) ({shown}); expected "
            f"a split for every labelled subject (or pass --folds hash)"
        )
    split = subject_id.map(split_of)
    fold = pd.Series(np.zeros(len(subject_id), dtype=np.int8), index=subject_id.index, name="fold")
    for name, k in SPLIT_FOLDS.items():
        fold[split == name] = k
    train = split == meds.train_split
    if train.any():
        if subject_id[train].nunique() < len(TRAIN_FOLDS):
            raise MedsInputError(
                f"{splits_path}: column 'split': {subject_id[train].nunique()} labelled train subject(s); at "
                f"least {len(TRAIN_FOLDS)} are needed for folds 3-5 (or pass --folds hash)"
            )
        fold[train] = (
            assign_folds(subject_id[train], seed, len(TRAIN_FOLDS), strata=strata[train]) + TRAIN_FOLDS[0] - 1
        ).astype(np.int8)
    empty = [f"{name} (fold {k})" for name, k in SPLIT_FOLDS.items() if not (fold == k).any()]
    if empty:
        raise MedsInputError(
            f"{splits_path}: column 'split': no labelled subject is in {' or '.join(empty)}, so that fold would "
            f"be empty; expected labelled subjects in train, tuning and held_out (or pass --folds hash)"
        )
    return fold, split.astype(object), mode
