"""Per-row demographics from codes: `age` (from the birth code) and the spec's attributes (fairness groups).

- age: whole years from the subject's birth event to the prediction time (calendar years: a birthday at the same
  month, day and time counts), from the last birth event at or before the prediction time. A subject without one
  gets a missing age (counted in the manifest).
- an attribute: the value of the subject's last matching event at or before the prediction time, static events
  (no time) counting as the earliest; ties at one time go to the larger code. No matching event: missing.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from carebench.data.meds.source import sql_str
from carebench.data.meds.spec import AttributeSpec, MedsSpec


def ages(con: duckdb.DuckDBPyConnection, birth_code: str, n: int) -> np.ndarray:
    """float64 [n]: whole years at the prediction time, NaN without a birth event. Needs `rows` and `events`."""
    df = con.execute(
        f"""
        SELECT r.row_idx, r.prediction_time, max(e.time) AS birth
        FROM rows r JOIN events e ON e.subject_id = r.subject_id
        WHERE e.code = {sql_str(birth_code)} AND e.time IS NOT NULL AND e.time <= r.prediction_time
        GROUP BY r.row_idx, r.prediction_time"""
    ).df()
    out = np.full(n, np.nan)
    if len(df):
        pt = pd.to_datetime(df["prediction_time"])
        b = pd.to_datetime(df["birth"])
        years = pt.dt.year - b.dt.year
        before = (pt.dt.month, pt.dt.day, pt.dt.hour, pt.dt.minute, pt.dt.second, pt.dt.microsecond)
        born = (b.dt.month, b.dt.day, b.dt.hour, b.dt.minute, b.dt.second, b.dt.microsecond)
        earlier = pd.Series(False, index=df.index)
        equal = pd.Series(True, index=df.index)
        for x, y in zip(before, born, strict=True):
            earlier |= equal & (x < y)
            equal &= x == y
        out[df["row_idx"].to_numpy()] = (years - earlier.astype(int)).to_numpy(dtype=np.float64)
    return out


def _condition(attr: AttributeSpec) -> str:
    if attr.prefix is not None:
        return f"starts_with(e.code, {sql_str(attr.prefix)})"
    return "e.code IN (" + ", ".join(sql_str(c) for c in attr.codes) + ")"


def attribute_values(con: duckdb.DuckDBPyConnection, attr: AttributeSpec, n: int) -> pd.Series:
    """object [n]: the attribute's value per row (None when no matching event)."""
    df = con.execute(
        f"""
        SELECT r.row_idx,
               arg_max(e.code, struct_pack(t := COALESCE(e.time, TIMESTAMP '0001-01-01'), c := e.code)) AS code
        FROM rows r JOIN events e ON e.subject_id = r.subject_id
        WHERE {_condition(attr)} AND (e.time IS NULL OR e.time <= r.prediction_time)
        GROUP BY r.row_idx"""
    ).df()
    out = pd.Series([None] * n, dtype=object)
    for row, code in zip(df["row_idx"], df["code"], strict=True):
        out.iat[int(row)] = attr.value(code)
    return out


def demographics(con: duckdb.DuckDBPyConnection, spec: MedsSpec, n: int) -> tuple[pd.DataFrame, dict]:
    """The age column (if the spec has a birth code) and one column per attribute, with missing counts."""
    cols: dict[str, object] = {}
    stats: dict[str, dict[str, object]] = {}
    if spec.birth_code is not None:
        age = ages(con, spec.birth_code, n)
        cols["age"] = age
        stats["age"] = {"code": spec.birth_code, "missing": int(np.isnan(age).sum())}
    for attr in spec.attributes:
        vals = attribute_values(con, attr, n)
        cols[attr.name] = vals
        counts = vals.fillna("<missing>").value_counts().sort_index()
        stats[attr.name] = {
            "missing": int(vals.isna().sum()),
            "groups": {str(k): int(v) for k, v in counts.items()},
        }
    return pd.DataFrame(cols, index=range(n)), stats
