"""A small MEDS dataset with known answers, written with the `meds` package's schemas (tests of `prepare --meds`).

Six subjects, one prediction time each (PT = 2100-01-03 12:00), a 4-hour window on a 1-hour grid: step k covers
(08:00 + k h, 08:00 + (k + 1) h]. Subject 1 carries the events whose places and values the tests check; the
others have one heart-rate value each. Splits: subjects 1-4 train, 5 tuning, 6 held_out (one shard per split).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

PT = datetime(2100, 1, 3, 12, 0, 0)
SPEC = """\
version: 1
hours: 4
step_hours: 1
features:
  - name: hr
    unit: bpm
    codes: [{prefix: "HR//"}]
    valid_range: [1, 300]
    aggregation: mean
  - name: temp
    unit: degC
    codes: ["TEMP//C", {code: "TEMP//F", convert: fahrenheit_to_celsius}]
    valid_range: [25, 45]
    aggregation: mean
  - name: urine
    unit: mL
    codes: [{regex: "^URINE$"}]
    valid_range: [0, 5000]
    aggregation: sum
  - name: potassium
    unit: mEq/L
    codes: ["K"]
    valid_range: [1, 15]
    aggregation: last
age: {birth_code: MEDS_BIRTH}
attributes:
  sex: {codes: {"GENDER//F": F, "GENDER//M": M}}
  ward: {prefix: "WARD//"}
fairness: [sex, ward]
"""


def _t(s: str | None) -> datetime | None:
    return None if s is None else datetime.fromisoformat(s)


def events() -> list[tuple[int, str | None, str, float | None]]:
    """(subject_id, time, code, numeric_value), sorted as MEDS requires (static events first)."""
    d = "2100-01-03"
    ev = [
        (1, None, "GENDER//F", None),
        (1, "2000-01-03 12:00:00", "MEDS_BIRTH", None),  # exactly 100 years before PT
        (1, "2100-01-01 00:00:00", "WARD//A", None),
        (1, f"{d} 08:00:00", "HR//bpm", 80.0),  # the window start itself: excluded
        (1, f"{d} 08:00:01", "HR//bpm", 90.0),  # step 0
        (1, f"{d} 08:30:00", "HR//bpm", 100.0),  # step 0 -> mean 95
        (1, f"{d} 09:10:00", "TEMP//F", 98.6),  # 37.0 degC, step 1
        (1, f"{d} 09:20:00", "TEMP//C", 37.4),  # step 1 -> mean 37.2
        (1, f"{d} 10:05:00", "URINE", 100.0),  # step 2
        (1, f"{d} 10:30:00", "HR//bpm", 500.0),  # out of range: dropped, step 2 stays NaN
        (1, f"{d} 10:55:00", "URINE", 50.0),  # step 2 -> sum 150
        (1, f"{d} 11:00:00", "WARD//B", None),
        (1, f"{d} 11:05:00", "K", 3.9),
        (1, f"{d} 11:10:00", "K", 4.0),  # a tie at 11:10: `last` takes the larger value
        (1, f"{d} 11:10:00", "K", 4.4),
        (1, f"{d} 12:00:00", "HR//beats", 120.0),  # at PT: included, last step; another code of HR//
        (1, f"{d} 12:00:01", "HR//bpm", 70.0),  # after PT: excluded
        (1, f"{d} 13:00:00", "WARD//C", None),  # after PT: not the ward at PT
        (2, None, "GENDER//M", None),
        (2, "2000-01-03 12:00:01", "MEDS_BIRTH", None),  # one second short of 100 years at PT
        (2, f"{d} 11:59:00", "HR//bpm", 60.0),
    ]
    for s, sex in zip(range(3, 7), "FMFM", strict=True):
        ev += [
            (s, None, f"GENDER//{sex}", None),
            (s, "1950-06-01 00:00:00", "MEDS_BIRTH", None),
            (s, f"{d} 10:00:00", "HR//bpm", 70.0 + s),  # step 1 (the step ends at 10:00 inclusive)
        ]
    return ev


SPLITS = {1: "train", 2: "train", 3: "train", 4: "train", 5: "tuning", 6: "held_out"}
MORTALITY = {1: True, 2: False, 3: False, 4: True, 5: False, 6: False}


def data_table(rows: list[tuple]) -> pa.Table:
    t = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([_t(r[1]) for r in rows], pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.string()),
            "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
        }
    )
    return meds.DataSchema.align(t)


def label_table(values: dict[int, object], column: str = "boolean_value", time: datetime = PT) -> pa.Table:
    subjects = sorted(values)
    cols: dict[str, pa.Array] = {
        "subject_id": pa.array(subjects, pa.int64()),
        "prediction_time": pa.array([time] * len(subjects), pa.timestamp("us")),
    }
    cols[column] = pa.array([values[s] for s in subjects], meds.LabelSchema.schema().field(column).type)
    return meds.LabelSchema.align(pa.table(cols))


def write_meds(root: Path, rows: list[tuple] | None = None, splits: dict[int, str] | None = SPLITS) -> Path:
    """The MEDS root: data/<split>/0.parquet (or data/0.parquet without splits), metadata/."""
    rows = events() if rows is None else rows
    (root / "metadata").mkdir(parents=True)
    if splits is None:
        (root / "data").mkdir()
        pq.write_table(data_table(rows), root / "data" / "0.parquet")
    else:
        for split in sorted(set(splits.values())):
            part = [r for r in rows if splits.get(r[0]) == split]
            (root / "data" / split).mkdir(parents=True)
            pq.write_table(data_table(part), root / "data" / split / "0.parquet")
        table = meds.SubjectSplitSchema.align(
            pa.table({"subject_id": pa.array(list(splits), pa.int64()), "split": list(splits.values())})
        )
        pq.write_table(table, root / meds.subject_splits_filepath)
    (root / meds.dataset_metadata_filepath).write_text(
        json.dumps({"dataset_name": "toy", "dataset_version": "1", "meds_version": meds.__version__})
    )
    return root


def write_inputs(tmp: Path, **kw) -> dict[str, Path]:
    """MEDS root, the mortality label file, the spec; returns their paths."""
    root = write_meds(tmp / "meds", **kw)
    labels = tmp / "labels"
    labels.mkdir()
    pq.write_table(label_table(MORTALITY), labels / "mortality.parquet")
    spec = tmp / "spec.yaml"
    spec.write_text(SPEC)
    return {"meds": root, "labels": labels / "mortality.parquet", "spec": spec}


def write_image(path: Path, value: int, size: tuple[int, int] = (20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8), mode="L").save(path)
    return path


def write_image_table(tmp: Path, rows: list[tuple[int, str, str]]) -> Path:
    """rows: (subject_id, time, relative path); the table lives in tmp/images/."""
    d = tmp / "images"
    d.mkdir(parents=True, exist_ok=True)
    t = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([_t(r[1]) for r in rows], pa.timestamp("us")),
            "path": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    pq.write_table(t, d / "images.parquet")
    return d / "images.parquet"
