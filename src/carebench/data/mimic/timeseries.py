"""EHR time-series stage of `carebench prepare`: raw events -> float32 [N, hours, F] hourly grid.

All filtering, unit conversion, range checking, binning and hourly aggregation runs in ONE DuckDB query that
scans each referenced source table once (chartevents, labevents, outputevents), so raw events are never held in
Python and DuckDB keeps memory under its `memory_limit` (its hash aggregate spills). Only the aggregated long
result (row_idx, hour, feature_idx, value, counts) reaches Python, in Arrow batches, and is scattered into the
NaN-filled array. Rules (window, lab matching, conversions, ranges) are documented in docs/features.md.

Determinism: DuckDB combines per-thread partial aggregates in scheduling order, so a floating-point `sum`
can differ in its last bits between runs. Means and sums are therefore accumulated as exact fixed-point
DECIMAL sums (integer arithmetic, order independent) and divided once at the end; min/max are order
independent, and `last` breaks charttime ties by the larger value. Two runs give byte-identical arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import duckdb
import numpy as np

from carebench.data.definitions import SOURCE_TABLES, FeatureSet
from carebench.errors import UserError


class TimeseriesError(UserError, ValueError):
    """The features file and the registered raw tables / cohort do not fit together."""


@dataclass(frozen=True)
class TimeseriesResult:
    """`values[row_idx, hour, feature]` (float32, NaN = no valid value in that hour) and, per feature name,
    stats: rows_in_window (non-null events of its itemids inside the window), dropped_out_of_range,
    observed_bins (non-NaN cells) and stays_observed (stays with at least one non-NaN cell).

    `row_issues`, per feature: events of its itemids in the window dropped because they have no numeric value
    (`no_value`: valuenum / value NULL, e.g. text-only charting) and events whose value was converted
    (`converted`: Fahrenheit to Celsius, a fraction to a percentage). `sources`, per source table read:
    `rows_in_window` (non-null events of the features' itemids in the cohort's windows), `kept` (in range, used),
    `out_of_range` and `no_value` (dropped)."""

    values: np.ndarray
    stats: dict[str, dict[str, int]]
    row_issues: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)


# Which column holds the number, and how an event finds its stay.
VALUE_COLUMN = {"chartevents": "valuenum", "labevents": "valuenum", "outputevents": "value"}
STAY_KEY = {"chartevents": "stay_id", "labevents": "subject_id", "outputevents": "stay_id"}

# Small integer codes used inside the SQL (a CASE on an integer is cheaper than on a string).
CONVERSION_CODES = {"fahrenheit_to_celsius": 1, "fraction_to_percent": 2}
AGGREGATION_CODES = {"mean": 0, "sum": 1, "min": 2, "max": 3, "last": 4}

_US_PER_HOUR = 3_600_000_000
_DECIMAL_SCALE = 12  # digits after the point for exact sums; 1e-12 is far below float32 resolution
_BATCH_ROWS = 1 << 20


def referenced_sources(features: FeatureSet) -> list[str]:
    """The source tables a features file uses, in SOURCE_TABLES order."""
    used = {t for f in features.features for t in f.itemids}
    return [t for t in SOURCE_TABLES if t in used]


def _item_rows(features: FeatureSet) -> list[tuple[str, int, int, int, float, float, int]]:
    """(source, itemid, feature_idx, conversion code, low, high, aggregation code) for every itemid."""
    rows = []
    for idx, f in enumerate(features.features):
        for source, ids in f.itemids.items():
            for itemid in ids:
                conv = CONVERSION_CODES[f.convert[itemid]] if itemid in f.convert else 0
                rows.append(
                    (
                        source,
                        itemid,
                        idx,
                        conv,
                        f.valid_range[0],
                        f.valid_range[1],
                        AGGREGATION_CODES[f.aggregation],
                    )
                )
    return rows


def _sql_float(x: float) -> str:
    return f"CAST({x!r} AS DOUBLE)"


def _decimal_type(features: FeatureSet) -> str:
    """A DECIMAL wide enough for every in-range value (the range bounds them), with _DECIMAL_SCALE decimals.
    Sums of DECIMAL(p<=18) accumulate in 128-bit integers, so they cannot overflow for any realistic bin."""
    bound = max(max(abs(f.valid_range[0]), abs(f.valid_range[1])) for f in features.features)
    int_digits = max(1, math.floor(math.log10(bound)) + 1) if bound >= 1 else 1
    precision = int_digits + _DECIMAL_SCALE
    if precision > 38:
        raise TimeseriesError(
            f"{features.source}: a valid_range bound of {bound:g} is too large to aggregate "
            f"exactly (expected |bound| < 1e{38 - _DECIMAL_SCALE})"
        )
    return f"DECIMAL({max(precision, 18)}, {_DECIMAL_SCALE})"


def timeseries_sql(features: FeatureSet, sources: list[str]) -> str:
    """The single aggregation query: one row per (row_idx, hour, feature_idx) with any event in the window.

    Columns: row_idx, hour, feature_idx, value (NULL when no event had a value in range), n_kept, n_dropped (out of
    range), n_null (no value), n_converted, and per source `kept_<source>`, `valued_<source>`, `null_<source>`.
    """
    items = _item_rows(features)
    values = ",\n    ".join(
        f"('{s}', {i}, {k}, {c}, {_sql_float(lo)}, {_sql_float(hi)}, {a})" for s, i, k, c, lo, hi, a in items
    )
    branches = []
    for source in sources:
        ids = sorted({i for s, i, *_ in items if s == source})
        key = STAY_KEY[source]
        branches.append(
            f"SELECT s.row_idx, s.intime, '{source}' AS source, e.itemid, e.charttime, "
            f"e.{VALUE_COLUMN[source]} AS raw\n"
            f"  FROM {source} e JOIN stays s ON e.{key} = s.{key}\n"
            f"  WHERE e.itemid IN ({', '.join(map(str, ids))})\n"
            f"    AND e.charttime >= s.intime AND e.charttime < s.window_end"
        )
    union = "\n  UNION ALL\n  ".join(branches)
    dec = _decimal_type(features)
    per_source = ",\n  ".join(
        f"count(vin) FILTER (WHERE source = '{src}') AS kept_{src},\n"
        f"  count(v) FILTER (WHERE source = '{src}') AS valued_{src},\n"
        f"  count(*) FILTER (WHERE source = '{src}' AND v IS NULL) AS null_{src}"
        for src in sources
    )
    m, s_, mn, mx, last = (AGGREGATION_CODES[a] for a in ("mean", "sum", "min", "max", "last"))
    return f"""
WITH items(source, itemid, feature_idx, conversion, lo, hi, agg) AS (VALUES
    {values}),
stays AS (
  SELECT row_idx, stay_id, subject_id, intime, intime + INTERVAL ({int(features.hours)}) HOUR AS window_end
  FROM cohort),
events AS (
  {union}),
converted AS (
  SELECT ev.row_idx, i.feature_idx, i.agg, ev.charttime, i.lo, i.hi, ev.source,
         ev.raw IS NOT NULL AND (i.conversion = {CONVERSION_CODES["fahrenheit_to_celsius"]}
           OR (i.conversion = {CONVERSION_CODES["fraction_to_percent"]} AND ev.raw <= 1)) AS conv,
         CAST((epoch_us(ev.charttime) - epoch_us(ev.intime)) // {_US_PER_HOUR} AS INTEGER) AS hour,
         CASE i.conversion
           WHEN {CONVERSION_CODES["fahrenheit_to_celsius"]} THEN (ev.raw - 32) * 5 / 9
           WHEN {CONVERSION_CODES["fraction_to_percent"]} THEN
             CASE WHEN ev.raw <= 1 THEN ev.raw * 100 ELSE ev.raw END
           ELSE ev.raw END AS v
  FROM events ev JOIN items i ON i.source = ev.source AND i.itemid = ev.itemid),
checked AS (
  SELECT row_idx, feature_idx, agg, charttime, hour, source, conv, v,
         CASE WHEN v BETWEEN lo AND hi THEN v END AS vin
  FROM converted)
SELECT row_idx, hour, feature_idx,
  CASE agg
    WHEN {m} THEN CAST(sum(CAST(CASE WHEN agg IN ({m}, {s_}) THEN vin END AS {dec})) AS DOUBLE) / count(vin)
    WHEN {s_} THEN CAST(sum(CAST(CASE WHEN agg IN ({m}, {s_}) THEN vin END AS {dec})) AS DOUBLE)
    WHEN {mn} THEN min(CASE WHEN agg = {mn} THEN vin END)
    WHEN {mx} THEN max(CASE WHEN agg = {mx} THEN vin END)
    ELSE arg_max(vin, CASE WHEN agg = {last} AND vin IS NOT NULL THEN struct_pack(t := charttime, v := vin) END)
  END AS value,
  count(vin) AS n_kept,
  count(v) - count(vin) AS n_dropped,
  count(*) - count(v) AS n_null,
  count(*) FILTER (WHERE conv) AS n_converted,
  {per_source}
FROM checked
GROUP BY row_idx, hour, feature_idx, agg
"""


def _cohort_size(con: duckdb.DuckDBPyConnection) -> int:
    """N, after checking that cohort.row_idx is exactly 0..N-1 (the array row of each stay)."""
    try:
        n, lo, hi, distinct = con.execute(
            "SELECT count(*), min(row_idx), max(row_idx), count(DISTINCT row_idx) FROM cohort"
        ).fetchone()
        con.execute("SELECT stay_id, subject_id, intime FROM cohort LIMIT 0").fetchall()
    except duckdb.Error as e:
        raise TimeseriesError(
            f"table 'cohort': expected columns row_idx, stay_id, subject_id, intime ({e})"
        ) from e
    if n and (lo != 0 or hi != n - 1 or distinct != n):
        raise TimeseriesError(
            f"table 'cohort': row_idx must be 0..{n - 1} without gaps or repeats "
            f"(found min {lo}, max {hi}, {distinct} distinct)"
        )
    return int(n)


def extract_timeseries(
    con: duckdb.DuckDBPyConnection, features: FeatureSet, tables: set[str]
) -> TimeseriesResult:
    """Hourly feature grid for every cohort stay over [intime, intime + features.hours h).

    `tables` names the raw event views registered on `con`; every source the features file references must
    be among them (a features file need not use all three).
    """
    sources = referenced_sources(features)
    missing = [s for s in sources if s not in tables]
    if missing:
        users = sorted({f.name for f in features.features for t in f.itemids if t in missing})
        raise TimeseriesError(
            f"{features.source}: features {', '.join(users)} read table(s) "
            f"{', '.join(missing)}, which were not registered (available: "
            f"{', '.join(sorted(tables)) or 'none'})"
        )
    n = _cohort_size(con)
    n_feat, hours = len(features.features), int(features.hours)
    values = np.full((n, hours, n_feat), np.nan, dtype=np.float32)
    in_window = np.zeros(n_feat, dtype=np.int64)
    dropped = np.zeros(n_feat, dtype=np.int64)
    no_value = np.zeros(n_feat, dtype=np.int64)
    converted = np.zeros(n_feat, dtype=np.int64)
    per_source = {
        src: dict.fromkeys(("rows_in_window", "kept", "out_of_range", "no_value"), 0) for src in sources
    }
    if n and sources:
        reader = con.sql(timeseries_sql(features, sources)).to_arrow_reader(_BATCH_ROWS)
        for batch in reader:
            row = batch.column("row_idx").to_numpy()
            hour = batch.column("hour").to_numpy()
            feat = batch.column("feature_idx").to_numpy()
            kept = batch.column("n_kept").to_numpy()
            drop = batch.column("n_dropped").to_numpy()
            # value is NULL (-> NaN) exactly when no event of the cell had a value in range
            values[row, hour, feat] = batch.column("value").to_numpy(zero_copy_only=False)
            in_window += np.bincount(feat, weights=kept + drop, minlength=n_feat).astype(np.int64)
            dropped += np.bincount(feat, weights=drop, minlength=n_feat).astype(np.int64)
            no_value += np.bincount(feat, weights=batch.column("n_null").to_numpy(), minlength=n_feat).astype(
                np.int64
            )
            converted += np.bincount(
                feat, weights=batch.column("n_converted").to_numpy(), minlength=n_feat
            ).astype(np.int64)
            for src, c in per_source.items():
                k, valued = (int(batch.column(f"{x}_{src}").to_numpy().sum()) for x in ("kept", "valued"))
                c["kept"] += k
                c["rows_in_window"] += valued
                c["out_of_range"] += valued - k
                c["no_value"] += int(batch.column(f"null_{src}").to_numpy().sum())
    observed = ~np.isnan(values)
    bins = observed.sum(axis=(0, 1))
    stays = observed.any(axis=1).sum(axis=0)
    stats = {
        f.name: {
            "rows_in_window": int(in_window[k]),
            "dropped_out_of_range": int(dropped[k]),
            "observed_bins": int(bins[k]),
            "stays_observed": int(stays[k]),
        }
        for k, f in enumerate(features.features)
    }
    issues = {
        f.name: {"no_value": int(no_value[k]), "converted": int(converted[k])}
        for k, f in enumerate(features.features)
    }
    return TimeseriesResult(values=values, stats=stats, row_issues=issues, sources=per_source)
