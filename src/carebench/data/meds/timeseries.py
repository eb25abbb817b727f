"""The EHR grid of `prepare --meds`: matched events -> float32 [N, steps, F], NaN where nothing was observed.

Window: the `hours` up to the prediction time, (prediction_time - hours, prediction_time]. The end is inclusive
because a MEDS prediction time is the last moment whose data may be used (`meds.LabelSchema`); the start is
exclusive so that the window holds exactly `hours`. Step k of T = hours / step_hours covers
(start + k * step, start + (k + 1) * step], so an event at the prediction time falls in the last step.

Which events: those whose code a feature's matchers select (spec.py), with a numeric_value that is not null or
NaN and a time (static events have none). Each value is converted (if the matcher says so), range-checked (values
outside are dropped and counted), then aggregated per step. As in the MIMIC producer, means and sums are exact
DECIMAL sums divided once, and `last` breaks time ties by the larger value, so the array is byte-identical
between runs whatever DuckDB's thread schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from carebench.data.meds.source import MedsInputError
from carebench.data.meds.spec import AGGREGATIONS, NO_CONVERSION, MedsSpec

_US_PER_HOUR = 3_600_000_000
_DECIMAL_SCALE = 12
_BATCH_ROWS = 1 << 20
CONVERSION_CODES = {"none": 0, "fahrenheit_to_celsius": 1, "fraction_to_percent": 2, "linear": 3}
AGG_CODES = {a: k for k, a in enumerate(AGGREGATIONS)}


@dataclass
class CodeMap:
    """Which data codes feed which feature. `table` has one row per matched code (code, feature_idx,
    conversion, multiply, add, lo, hi, agg); `matched` lists each feature's codes with their event counts;
    `warnings` names the matchers that matched no code."""

    table: pd.DataFrame
    matched: dict[str, list[dict[str, object]]]
    warnings: list[str]


def map_codes(codes: pd.DataFrame, spec: MedsSpec) -> CodeMap:
    """Match the data's distinct codes (frame with columns code, events, numeric_events) against the spec."""
    rows: list[tuple] = []
    owner: dict[str, tuple[str, str]] = {}  # code -> (feature, matcher) that took it
    hits = {(f.name, m.describe()): 0 for f in spec.features for m in f.matchers}
    matched: dict[str, list[dict[str, object]]] = {f.name: [] for f in spec.features}
    exact: dict[str, list[tuple[int, int]]] = {}
    others: list[tuple[int, int]] = []
    for fi, f in enumerate(spec.features):
        for mi, m in enumerate(f.matchers):
            (exact.setdefault(m.pattern, []) if m.kind == "code" else others).append((fi, mi))
    for code, n, n_num in codes[["code", "events", "numeric_events"]].itertuples(index=False):
        cands = list(exact.get(code, ()))
        cands += [(fi, mi) for fi, mi in others if spec.features[fi].matchers[mi].matches(code)]
        if not cands:
            continue
        taken: dict[int, int] = {}
        for fi, mi in cands:
            f, m = spec.features[fi], spec.features[fi].matchers[mi]
            hits[(f.name, m.describe())] += 1
            if fi in taken:
                prev = f.matchers[taken[fi]]
                if prev.conversion != m.conversion:
                    raise MedsInputError(
                        f"{spec.source}: feature '{f.name}': code {code!r} is matched by {prev.describe()} and "
                        f"{m.describe()} with different conversions (expected one conversion per code)"
                    )
                continue
            taken[fi] = mi
        if len(taken) > 1:
            names = [spec.features[fi].name for fi in taken]
            raise MedsInputError(
                f"{spec.source}: code {code!r} is matched by features {', '.join(names)} (expected each code "
                f"to feed at most one feature)"
            )
        fi, mi = next(iter(taken.items()))
        f, m = spec.features[fi], spec.features[fi].matchers[mi]
        conv = m.conversion or NO_CONVERSION
        lo, hi = f.valid_range if f.valid_range is not None else (-math.inf, math.inf)
        rows.append(
            (code, fi, CONVERSION_CODES[conv.name], conv.multiply, conv.add, lo, hi, AGG_CODES[f.aggregation])
        )
        owner[code] = (f.name, m.describe())
        matched[f.name].append({"code": code, "events": int(n), "numeric_events": int(n_num)})
    warnings = [
        f"feature spec: feature '{name}': {desc} matches no code of the MEDS data"
        for (name, desc), k in hits.items()
        if k == 0
    ]
    table = pd.DataFrame(
        rows, columns=["code", "feature_idx", "conversion", "multiply", "add", "lo", "hi", "agg"]
    ).astype({"feature_idx": np.int32, "conversion": np.int8, "agg": np.int8})
    if table.empty:
        raise MedsInputError(
            f"{spec.source}: no code of the MEDS data matches any feature (expected at least one matching "
            f"code; the data has {len(codes)} distinct codes)"
        )
    return CodeMap(table=table, matched=matched, warnings=warnings)


def _decimal_type(spec: MedsSpec, table: pd.DataFrame) -> str:
    bounds = [abs(x) for f in spec.features if f.valid_range is not None for x in f.valid_range]
    if len(bounds) < 2 * len(spec.features):
        return "DOUBLE"  # a feature without a range has unbounded values: no exact DECIMAL fits them all
    bound = max([*bounds, 1.0])
    int_digits = max(1, math.floor(math.log10(bound)) + 1)
    return f"DECIMAL({max(int_digits + _DECIMAL_SCALE, 18)}, {_DECIMAL_SCALE})"


def grid_sql(spec: MedsSpec, dec: str) -> str:
    """One row per (row_idx, step, feature_idx) with an event in the window: value (NULL when every event was out
    of range), n_kept, n_dropped. Needs tables `events`, `code_map` and `rows(row_idx, subject_id,
    prediction_time)` on the connection."""
    h_us, s_us, t = spec.hours * _US_PER_HOUR, spec.step_hours * _US_PER_HOUR, spec.steps
    c = CONVERSION_CODES
    a = AGG_CODES
    exact = "DOUBLE" if dec == "DOUBLE" else dec
    return f"""
WITH w AS (SELECT row_idx, subject_id, epoch_us(prediction_time) AS pt FROM rows),
ev AS (
  SELECT w.row_idx, m.feature_idx, m.agg, m.lo, m.hi, e.time,
         CAST({t - 1} - (w.pt - epoch_us(e.time)) // {s_us} AS INTEGER) AS step,
         CASE m.conversion
           WHEN {c["fahrenheit_to_celsius"]} THEN (CAST(e.numeric_value AS DOUBLE) - 32) * 5 / 9
           WHEN {c["fraction_to_percent"]} THEN
             CASE WHEN e.numeric_value <= 1 THEN CAST(e.numeric_value AS DOUBLE) * 100
                  ELSE CAST(e.numeric_value AS DOUBLE) END
           WHEN {c["linear"]} THEN CAST(e.numeric_value AS DOUBLE) * m.multiply + m.add
           ELSE CAST(e.numeric_value AS DOUBLE) END AS v
  FROM events e
  JOIN code_map m ON e.code = m.code
  JOIN w ON e.subject_id = w.subject_id
  WHERE e.numeric_value IS NOT NULL AND NOT isnan(e.numeric_value) AND e.time IS NOT NULL
    AND epoch_us(e.time) > w.pt - {h_us} AND epoch_us(e.time) <= w.pt),
checked AS (SELECT row_idx, feature_idx, agg, time, step, CASE WHEN v BETWEEN lo AND hi THEN v END AS vin FROM ev)
SELECT row_idx, step, feature_idx,
  CASE agg
    WHEN {a["mean"]} THEN CAST(sum(CAST(CASE WHEN agg IN ({a["mean"]}, {a["sum"]}) THEN vin END AS {exact}))
                               AS DOUBLE) / count(vin)
    WHEN {a["sum"]} THEN CAST(sum(CAST(CASE WHEN agg IN ({a["mean"]}, {a["sum"]}) THEN vin END AS {exact}))
                              AS DOUBLE)
    WHEN {a["min"]} THEN min(CASE WHEN agg = {a["min"]} THEN vin END)
    WHEN {a["max"]} THEN max(CASE WHEN agg = {a["max"]} THEN vin END)
    ELSE arg_max(vin, CASE WHEN agg = {a["last"]} AND vin IS NOT NULL THEN struct_pack(t := time, v := vin) END)
  END AS value,
  count(vin) AS n_kept,
  count(*) - count(vin) AS n_dropped
FROM checked
GROUP BY row_idx, step, feature_idx, agg
"""


@dataclass(frozen=True)
class GridResult:
    values: np.ndarray  # float32 [N, steps, F]
    stats: dict[str, dict[str, int]]


def extract_grid(con: duckdb.DuckDBPyConnection, spec: MedsSpec, code_map: CodeMap, n: int) -> GridResult:
    """Fill the [n, steps, F] grid; `rows` (row_idx 0..n-1) and `events` must be on the connection."""
    con.register("_code_map_df", code_map.table)
    con.execute("CREATE OR REPLACE TEMP TABLE code_map AS SELECT * FROM _code_map_df")
    con.unregister("_code_map_df")
    n_feat = len(spec.features)
    values = np.full((n, spec.steps, n_feat), np.nan, dtype=np.float32)
    in_window = np.zeros(n_feat, dtype=np.int64)
    dropped = np.zeros(n_feat, dtype=np.int64)
    if n:
        reader = con.sql(grid_sql(spec, _decimal_type(spec, code_map.table))).to_arrow_reader(_BATCH_ROWS)
        for batch in reader:
            row = batch.column("row_idx").to_numpy()
            step = batch.column("step").to_numpy()
            feat = batch.column("feature_idx").to_numpy()
            kept = batch.column("n_kept").to_numpy()
            drop = batch.column("n_dropped").to_numpy()
            values[row, step, feat] = batch.column("value").to_numpy(zero_copy_only=False)
            in_window += np.bincount(feat, weights=kept + drop, minlength=n_feat).astype(np.int64)
            dropped += np.bincount(feat, weights=drop, minlength=n_feat).astype(np.int64)
    observed = ~np.isnan(values)
    bins = observed.sum(axis=(0, 1))
    stays = observed.any(axis=1).sum(axis=0)
    stats = {
        f.name: {
            "events_in_window": int(in_window[k]),
            "dropped_out_of_range": int(dropped[k]),
            "observed_bins": int(bins[k]),
            "rows_observed": int(stays[k]),
        }
        for k, f in enumerate(spec.features)
    }
    return GridResult(values=values, stats=stats)


def code_counts(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Distinct codes of the data with their event and numeric-event counts (input of `map_codes`)."""
    return con.execute(
        "SELECT code, count(*) AS events, count(numeric_value) AS numeric_events FROM events "
        "GROUP BY code ORDER BY code"
    ).df()
