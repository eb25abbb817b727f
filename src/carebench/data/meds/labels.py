"""Task labels from MEDS label files (what ACES writes): subject_id, prediction_time and one value column.

`--labels NAME=PATH` (repeatable) names a task and its label file (a .parquet file, or a directory read
recursively, as a sharded label set). The value column decides the kind of task:

    boolean_value      binary       cohort column label_<task>, 0/1
    integer_value      multiclass   label_<task>, classes 0..K-1 (K = largest value + 1, or the registered task's)
    categorical_value  multiclass   label_<task>, classes = the sorted distinct strings, stored as 0..K-1
    float_value        regression   only if the task registry has that kind

`--labels NAME:LABEL=PATH` files sharing NAME form one multilabel task (boolean files only), one column
label_<task>_<label> each, in the order given. A registered task name (e.g. mortality) must get its registered
kind and width.

How files combine: each distinct (subject_id, prediction_time) of any file is one row of the dataset; a row that
one task's file does not label has a missing label for that task (training leaves it out of that task). Within a
file a (subject_id, prediction_time) may appear once. Label files follow `meds.LabelSchema` (no extra columns);
ACES writes all four value columns, so exactly one of them must hold values, with no nulls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import meds
import numpy as np
import pandas as pd

from carebench.data.meds.source import (
    MAX_LISTED,
    MedsInputError,
    read_parquet_schema,
    schema_problem,
    sql_list,
)
from carebench.tasks import KINDS, TASKS

VALUE_COLUMNS = {
    "boolean_value": "binary",
    "integer_value": "multiclass",
    "categorical_value": "multiclass",
    "float_value": "regression",
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LabelOption:
    task: str
    label: str | None
    path: Path

    @property
    def option(self) -> str:
        name = self.task if self.label is None else f"{self.task}:{self.label}"
        return f"--labels {name}={self.path}"

    @property
    def column(self) -> str:
        return f"label_{self.task}" if self.label is None else f"label_{self.task}_{self.label}"


@dataclass
class LabelTask:
    """One task: its kind, its label columns (cohort.parquet) and, for a multiclass task, the class names."""

    name: str
    kind: str
    columns: list[str]
    classes: list[str] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    labels: list[str] = field(default_factory=list)  # multilabel: the LABEL part of each NAME:LABEL option

    def declaration(self) -> dict[str, Any]:
        """The task as `write_dataset` takes it: a registered task names its label columns only, a new one adds
        its spec (kind; class names of a multiclass task; label names of a multilabel task)."""
        out: dict[str, Any] = {"labels": list(self.columns)}
        if self.kind == "multilabel":
            out["label_names"] = list(self.labels)
        if self.name not in TASKS:
            spec: dict[str, Any] = {"kind": self.kind, "description": f"{self.name} (MEDS label files)"}
            if self.kind == "multiclass":
                spec["class_names"] = list(self.classes or [])
            out["spec"] = spec
        return out


def parse_label_options(values: list[str] | tuple[str, ...]) -> list[LabelOption]:
    """`NAME=PATH` or `NAME:LABEL=PATH` -> LabelOption, checking names and that paths exist."""
    out: list[LabelOption] = []
    if not values:
        raise MedsInputError("--labels: at least one NAME=PATH is needed (a MEDS label file per task)")
    for v in values:
        name, sep, path = str(v).partition("=")
        task, colon, label = name.partition(":")
        if not sep or not path or not _NAME.match(task) or (colon and not _NAME.match(label)):
            raise MedsInputError(
                f"--labels {v}: expected NAME=PATH or NAME:LABEL=PATH, NAME and LABEL identifiers "
                f"(letters, digits, _; e.g. mortality=labels/mortality.parquet)"
            )
        p = Path(path)
        if not p.exists():
            raise MedsInputError(
                f"--labels {v}: {p} does not exist (expected a MEDS label .parquet or directory)"
            )
        out.append(LabelOption(task, label or None, p))
    seen: set[str] = set()
    for o in out:
        if o.column in seen:
            raise MedsInputError(f"{o.option}: label {o.column} given twice")
        seen.add(o.column)
    for task in {o.task for o in out}:
        group = [o for o in out if o.task == task]
        if len(group) > 1 and any(o.label is None for o in group):
            raise MedsInputError(
                f"--labels {task}: given both as a single task ({task}=...) and with labels ({task}:LABEL=...)"
            )
    return out


def _files(opt: LabelOption) -> list[Path]:
    if opt.path.is_file():
        return [opt.path]
    files = sorted(p for p in opt.path.rglob("*.parquet") if p.is_file())
    if not files:
        raise MedsInputError(f"{opt.option}: no .parquet files under {opt.path} (expected MEDS label files)")
    return files


def _read_one(con: duckdb.DuckDBPyConnection, opt: LabelOption) -> tuple[pd.DataFrame, str, dict[str, Any]]:
    """The (subject_id, prediction_time, value) rows of one label option, its value column and stats."""
    files = _files(opt)
    for f in files:
        schema_problem(f, read_parquet_schema(f, "a MEDS label file"), meds.LabelSchema, "a MEDS label file")
    where = str(opt.path)
    rel = con.execute(f"SELECT * FROM read_parquet({sql_list(files)}, union_by_name = true)")
    cols = [d[0] for d in rel.description]
    present = [c for c in VALUE_COLUMNS if c in cols]
    counts = con.execute(
        "SELECT count(*), count(subject_id), count(prediction_time)"
        + "".join(f", count({c})" for c in present)
        + f" FROM read_parquet({sql_list(files)}, union_by_name = true)"
    ).fetchone()
    n, n_subj, n_time = counts[:3]
    nonnull = dict(zip(present, counts[3:], strict=True))
    if n == 0:
        raise MedsInputError(f"{where}: column 'subject_id': the label file has no rows ({opt.option})")
    for col, k in (("subject_id", n_subj), ("prediction_time", n_time)):
        if k < n:
            raise MedsInputError(f"{where}: column '{col}' has {n - k} null value(s) (MEDS labels need one)")
    used = [c for c, k in nonnull.items() if k > 0]
    if len(used) != 1:
        raise MedsInputError(
            f"{where}: expected exactly one of {', '.join(VALUE_COLUMNS)} to hold the labels, found "
            f"{', '.join(used) if used else 'none'} with values ({opt.option})"
        )
    value = used[0]
    if nonnull[value] < n:
        raise MedsInputError(
            f"{where}: column '{value}' has {n - nonnull[value]} null label(s) among {n} rows "
            f"(expected a label on every row)"
        )
    df = con.execute(
        f"SELECT subject_id, prediction_time, {value} AS value "
        f"FROM read_parquet({sql_list(files)}, union_by_name = true) ORDER BY subject_id, prediction_time"
    ).df()
    dup = df.duplicated(["subject_id", "prediction_time"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        raise MedsInputError(
            f"{where}: columns 'subject_id', 'prediction_time': ({first['subject_id']}, "
            f"{first['prediction_time']}) appears {int(dup.sum())} times among duplicated rows (expected one "
            f"label per subject and prediction time)"
        )
    stats = {
        "path": str(opt.path.absolute()),
        "files": [str(f.absolute()) for f in files],
        "rows": int(n),
        "subjects": int(df["subject_id"].nunique()),
        "value_column": value,
    }
    return df, value, stats


def _multiclass(opt: LabelOption, value_col: str, values: pd.Series) -> tuple[np.ndarray, list[str]]:
    registered = TASKS.get(opt.task)
    if value_col == "categorical_value":
        classes = sorted(values.astype(str).unique())
        if registered is not None:
            raise MedsInputError(
                f"{opt.option}: task {opt.task!r} is registered with integer classes; give its labels as "
                f"integer_value 0..{registered.num_outputs - 1}"
            )
        index = {c: k for k, c in enumerate(classes)}
        return values.astype(str).map(index).to_numpy(np.int64), classes
    ints = values.to_numpy(np.int64)
    k = registered.num_outputs if registered is not None else int(ints.max()) + 1
    bad = (ints < 0) | (ints >= k)
    if bad.any():
        raise MedsInputError(
            f"{opt.path}: column 'integer_value' has {int(bad.sum())} value(s) outside 0..{k - 1} "
            f"(e.g. {int(ints[bad][0])}); expected class indices"
            + (f" of task {opt.task!r}" if registered else "")
        )
    if registered is None and k < 2:
        raise MedsInputError(f"{opt.path}: column 'integer_value' has a single class (expected at least 2)")
    return ints, [str(c) for c in range(k)]


def read_labels(
    con: duckdb.DuckDBPyConnection, options: list[LabelOption]
) -> tuple[pd.DataFrame, list[LabelTask]]:
    """All label options -> one frame (subject_id, prediction_time, one column per label, in option order;
    rows sorted by subject and time) and the task declarations."""
    tasks: dict[str, LabelTask] = {}
    frames: list[pd.DataFrame] = []
    for opt in options:
        df, value_col, stats = _read_one(con, opt)
        kind = VALUE_COLUMNS[value_col]
        if opt.label is not None:
            if kind != "binary":
                raise MedsInputError(
                    f"{opt.option}: a multilabel task takes boolean_value files, this one holds {value_col}"
                )
            kind = "multilabel"
        if kind not in KINDS:
            raise MedsInputError(
                f"{opt.path}: column '{value_col}' makes task {opt.task!r} a {kind} task, which this carebench "
                f"cannot train (task kinds: {', '.join(KINDS)})"
            )
        registered = TASKS.get(opt.task)
        if registered is not None and registered.kind != kind:
            raise MedsInputError(
                f"{opt.option}: task {opt.task!r} is registered as {registered.kind}, but column "
                f"'{value_col}' makes it {kind}"
            )
        classes = None
        if kind == "multiclass":
            vals, classes = _multiclass(opt, value_col, df["value"])
            df["value"] = vals.astype(np.int8 if len(classes) <= 127 else np.int64)
        elif kind in ("binary", "multilabel"):
            df["value"] = df["value"].astype(bool).astype(np.int8)
        else:
            df["value"] = df["value"].astype(np.float32)
        task = tasks.get(opt.task)
        if task is None:
            task = tasks[opt.task] = LabelTask(opt.task, kind, [], classes)
        task.columns.append(opt.column)
        if opt.label is not None:
            task.labels.append(opt.label)
        task.files[opt.column] = stats
        frames.append(df.rename(columns={"value": opt.column}).set_index(["subject_id", "prediction_time"]))
    for t in tasks.values():
        registered = TASKS.get(t.name)
        if t.kind == "multilabel" and registered is not None and registered.num_outputs != len(t.columns):
            raise MedsInputError(
                f"--labels {t.name}: the registered task has {registered.num_outputs} labels, "
                f"{len(t.columns)} were given"
            )
    joined = pd.concat(frames, axis=1, join="outer").sort_index().reset_index()
    joined["subject_id"] = joined["subject_id"].astype(np.int64)
    joined["prediction_time"] = joined["prediction_time"].astype("datetime64[us]")
    for t in tasks.values():  # a complete label column keeps an integer type; a gap makes it float with NaN
        for c in t.columns:
            if joined[c].isna().any() or t.kind == "regression":
                joined[c] = joined[c].astype(np.float32)
            else:
                joined[c] = joined[c].astype(np.int8 if len(t.classes or [0, 1]) <= 127 else np.int64)
    return joined, list(tasks.values())


def check_subjects(labels: pd.DataFrame, options: list[LabelOption], known: set[int]) -> None:
    """Every labelled subject must have events in the MEDS data; the error names the label file."""
    for opt in options:
        subjects = labels.loc[labels[opt.column].notna(), "subject_id"].unique()
        unknown = sorted(int(s) for s in subjects if int(s) not in known)
        if unknown:
            shown = ", ".join(map(str, unknown[:MAX_LISTED])) + (" ..." if len(unknown) > MAX_LISTED else "")
            raise MedsInputError(
                f"{opt.path}: column 'subject_id' has {len(unknown)} subject(s) with no events in the MEDS data "
                f"({shown}); expected labels only for subjects of --meds"
            )
