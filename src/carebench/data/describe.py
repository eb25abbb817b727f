"""`carebench describe`: what is in a processed dataset, as tidy tables (computed) and Rich tables (printed).

Everything is computed from the dataset itself (cohort.parquet, ehr.npy) and what its manifest declares (the
tasks and their label columns), except what only the producer knows: the cohort steps, the rows it dropped or
repaired by reason (`data_issues`), the source release it read and its warnings. `summarize` returns plain
DataFrames so tests and notebooks can use the numbers; `print_summary` only formats them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from carebench.data.store import ProcessedDataset

_CHUNK_STAYS = 2048  # stays per block when scanning ehr.npy, so a memory-mapped array is never fully loaded


@dataclass
class DatasetSummary:
    steps: pd.DataFrame  # step, rule, stays, excluded
    folds: pd.DataFrame  # fold, stays, subjects, then positives per binary task (column = task name)
    labels: pd.DataFrame  # task, label, name, positives, prevalence: every output of every declared task
    cxr: pd.DataFrame  # item, value
    coverage: pd.DataFrame  # feature, unit, observed_hours, stays_observed, coverage
    n_stays: int
    n_subjects: int
    issues: pd.DataFrame | None = None  # stage, table, reason, action, count, unit (None: not recorded)
    release: dict | None = None  # the manifest's `release` (None: not recorded)
    warnings: list[str] | None = None


def feature_coverage(ehr: np.ndarray, features: list[str]) -> pd.DataFrame:
    """Per feature: observed stay-hours, stays with any observation, and observed / (N x hours)."""
    n, hours, f = ehr.shape
    observed = np.zeros(f, dtype=np.int64)
    stays = np.zeros(f, dtype=np.int64)
    for lo in range(0, n, _CHUNK_STAYS):
        block = ~np.isnan(np.asarray(ehr[lo : lo + _CHUNK_STAYS]))
        observed += block.sum(axis=(0, 1))
        stays += block.any(axis=1).sum(axis=0)
    total = n * hours
    return pd.DataFrame(
        {
            "feature": features,
            "observed_hours": observed,
            "stays_observed": stays,
            "coverage": observed / total if total else np.zeros(f),
        }
    )


def label_counts(ds: ProcessedDataset) -> pd.DataFrame:
    """Per output of every declared task (declaration order): task, label (output name), name (display name),
    stays with a label, positives (binary, multilabel) or stays of the class (multiclass)."""
    rows = []
    c = ds.cohort
    for task in ds.tasks:
        decl = ds.task(task)
        names = decl.display_names
        if decl.spec.kind == "multiclass":
            y = c[decl.labels[0]]
            for k, (out, name) in enumerate(zip(decl.output_names, names, strict=True)):
                rows.append((task, out, f"class {k}: {name}", int(y.notna().sum()), int((y == k).sum())))
        else:
            for col, out, name in zip(decl.labels, decl.output_names, names, strict=True):
                y = c[col]
                rows.append((task, out, name, int(y.notna().sum()), int(y.fillna(0).astype(float).sum())))
    df = pd.DataFrame(rows, columns=["task", "label", "name", "stays", "positives"])
    df["prevalence"] = (df["positives"] / df["stays"].where(df["stays"] > 0)).fillna(0.0)
    return df


def fold_table(ds: ProcessedDataset) -> pd.DataFrame:
    """Per fold: stays, subjects, and the positives of every binary task (a column named after the task)."""
    c = ds.cohort
    binary = {t: ds.task(t).labels[0] for t in ds.tasks if ds.task(t).spec.kind == "binary"}
    agg = {"stays": ("stay_id", "size"), "subjects": ("subject_id", "nunique")}
    agg |= {t: (col, "sum") for t, col in binary.items() if t not in agg}
    return c.groupby("fold").agg(**agg).reset_index()


def _cxr_table(ds: ProcessedDataset) -> pd.DataFrame:
    c = ds.cohort
    n = len(c)
    with_img = int(c["has_cxr"].sum())
    rows: list[tuple[str, str]] = [
        ("stays with an X-ray", f"{with_img} / {n} ({with_img / n:.1%})" if n else "0"),
        ("images in cache", str(0 if ds.cxr is None else ds.cxr.shape[0])),
    ]
    if ds.cxr is not None and ds.cxr.ndim == 3:
        rows.append(("image size", f"{ds.cxr.shape[1]} x {ds.cxr.shape[2]}"))
    if with_img:
        hours = c.loc[c["has_cxr"], "cxr_hours"]
        rows.append(
            (
                "hours from the window start (median [min, max])",
                f"{hours.median():.1f} [{hours.min():.1f}, {hours.max():.1f}]",
            )
        )
    return pd.DataFrame(rows, columns=["item", "value"])


def summarize(ds: ProcessedDataset) -> DatasetSummary:
    """The numbers `describe` prints, as DataFrames."""
    c = ds.cohort
    steps = pd.DataFrame(ds.manifest.get("cohort_steps", []), columns=["step", "rule", "stays"])
    steps["excluded"] = (steps["stays"].shift(1) - steps["stays"]).fillna(0).astype(int)
    folds = fold_table(ds)
    coverage = feature_coverage(ds.ehr, ds.features)
    units = ds.manifest.get("feature_units", {})
    coverage.insert(1, "unit", [units.get(f, "") for f in ds.features])
    return DatasetSummary(
        steps=steps,
        folds=folds,
        labels=label_counts(ds),
        cxr=_cxr_table(ds),
        coverage=coverage,
        n_stays=len(c),
        n_subjects=int(c["subject_id"].nunique()),
        issues=issue_table(ds.manifest),
        release=ds.manifest.get("release"),
        warnings=list(ds.manifest.get("warnings") or []),
    )


ISSUE_COLUMNS = ["stage", "table", "reason", "action", "count", "unit"]


def issue_table(manifest: dict) -> pd.DataFrame | None:
    """The manifest's `data_issues` (every row the ETL dropped or repaired, by reason), or None for a dataset
    prepared before they were recorded."""
    rows = manifest.get("data_issues")
    if rows is None:
        return None
    return pd.DataFrame(rows, columns=ISSUE_COLUMNS).astype({"count": "int64"})


def _table(title: str, df: pd.DataFrame, formats: dict[str, str] | None = None) -> Table:
    formats = formats or {}
    t = Table(title=title, title_justify="left")
    for col in df.columns:
        numeric = pd.api.types.is_numeric_dtype(df[col])
        t.add_column(col, justify="right" if numeric else "left")
    for row in df.itertuples(index=False):
        t.add_row(
            *[
                format(v, formats[col]) if col in formats else str(v)
                for col, v in zip(df.columns, row, strict=True)
            ]
        )
    return t


def print_summary(s: DatasetSummary, console: Console, root: str = "") -> None:
    console.print(f"[bold]{root}[/]: {s.n_stays} stays of {s.n_subjects} patients", soft_wrap=True)
    if s.release:
        # whatever the producer recorded about the source it read (e.g. a release and its folder layout)
        flat = {k: v for k, v in s.release.items() if isinstance(v, str | int | float)}
        console.print("Source: " + ", ".join(f"{k} {v}" for k, v in flat.items()), highlight=False)
    console.print(_table("Cohort steps", s.steps))
    if s.issues is None:
        console.print(
            "Rows dropped or repaired by the ETL: not recorded (dataset prepared by an older carebench)"
        )
    else:
        found = s.issues[s.issues["count"] > 0]
        title = f"Rows dropped or repaired by the ETL, by reason ({len(s.issues) - len(found)} other checks: 0 rows)"
        console.print(_table(title, found.reset_index(drop=True)))
    console.print(_table("Folds (patient-disjoint)", s.folds))
    console.print(_table("Label prevalence", s.labels, {"prevalence": ".1%"}))
    console.print(_table("Chest X-rays", s.cxr))
    console.print(
        _table("Feature coverage (fraction of stay-hours observed)", s.coverage, {"coverage": ".1%"})
    )
    for w in s.warnings or []:
        console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
