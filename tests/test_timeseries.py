"""EHR time-series stage: pinned against values computed here with plain pandas from the raw demo csv.gz files,
plus synthetic raw tables in tmp_path for window edges, conversions and tie-breaks."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from carebench.data.definitions import Feature, FeatureSet, load_features
from carebench.data.mimic.tables import register_tables
from carebench.data.mimic.timeseries import TimeseriesError, extract_timeseries, timeseries_sql

SOURCES = {"chartevents", "labevents", "outputevents"}
VALUE = {"chartevents": "valuenum", "labevents": "valuenum", "outputevents": "value"}
KEY = {"chartevents": "stay_id", "labevents": "subject_id", "outputevents": "stay_id"}
FEATURES = load_features()
IDX = {f.name: k for k, f in enumerate(FEATURES.features)}


def make_cohort(con: duckdb.DuckDBPyConnection) -> None:
    """All ICU stays, row_idx in stay_id order (independent of the cohort stage)."""
    con.execute(
        "CREATE OR REPLACE TABLE cohort AS SELECT CAST(row_number() OVER (ORDER BY stay_id) - 1 AS INTEGER) "
        "AS row_idx, stay_id, subject_id, hadm_id, intime, outtime FROM icustays"
    )


def connect(root, names) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET threads = 2")
    register_tables(con, root, names)
    return con


@pytest.fixture(scope="module")
def demo_con(demo_root):
    con = connect(demo_root, ["icustays", *sorted(SOURCES)])
    make_cohort(con)
    yield con
    con.close()


@pytest.fixture(scope="module")
def result(demo_con):
    return extract_timeseries(demo_con, FEATURES, SOURCES)


@pytest.fixture(scope="module")
def raw(demo_root) -> dict[str, pd.DataFrame]:
    """The raw demo tables, read with pandas (only the columns the stage uses)."""

    def read(rel, cols, dates):
        return pd.read_csv(demo_root / rel, usecols=cols, parse_dates=dates)

    stays = read("icu/icustays.csv.gz", ["subject_id", "stay_id", "intime"], ["intime"])
    stays = stays.sort_values("stay_id").reset_index(drop=True)
    stays["row_idx"] = np.arange(len(stays))
    return {
        "stays": stays,
        "chartevents": read(
            "icu/chartevents.csv.gz", ["stay_id", "itemid", "charttime", "valuenum"], ["charttime"]
        ),
        "labevents": read(
            "hosp/labevents.csv.gz", ["subject_id", "itemid", "charttime", "valuenum"], ["charttime"]
        ),
        "outputevents": read(
            "icu/outputevents.csv.gz", ["stay_id", "itemid", "charttime", "value"], ["charttime"]
        ),
    }


def events_in_window(raw, feature: Feature, hours: int = 48) -> pd.DataFrame:
    """Non-null events of a feature inside [intime, intime + hours h), converted; columns row_idx, hour,
    charttime, v, ok (inside the valid range)."""
    parts = []
    for source, ids in feature.itemids.items():
        ev = raw[source]
        ev = ev[ev["itemid"].isin(ids) & ev[VALUE[source]].notna()]
        ev = ev.merge(raw["stays"], on=KEY[source], suffixes=("", "_stay"))
        ev = ev[
            (ev["charttime"] >= ev["intime"]) & (ev["charttime"] < ev["intime"] + pd.Timedelta(hours=hours))
        ]
        v = ev[VALUE[source]].astype(float)
        for itemid, conv in feature.convert.items():
            sel = ev["itemid"] == itemid
            if conv == "fahrenheit_to_celsius":
                v = v.where(~sel, (v - 32) * 5 / 9)
            elif conv == "fraction_to_percent":
                v = v.where(~(sel & (v <= 1)), v * 100)
        hour = ((ev["charttime"] - ev["intime"]).dt.total_seconds() // 3600).astype(int)
        parts.append(
            pd.DataFrame(
                {
                    "row_idx": ev["row_idx"].to_numpy(),
                    "hour": hour.to_numpy(),
                    "charttime": ev["charttime"].to_numpy(),
                    "v": v.to_numpy(),
                }
            )
        )
    out = pd.concat(parts, ignore_index=True)
    lo, hi = feature.valid_range
    out["ok"] = (out["v"] >= lo) & (out["v"] <= hi)
    return out


def expected_grid(raw, feature: Feature, n: int, hours: int = 48) -> np.ndarray:
    ev = events_in_window(raw, feature, hours)
    ev = ev[ev["ok"]]
    if feature.aggregation == "last":
        agg = ev.sort_values(["charttime", "v"]).groupby(["row_idx", "hour"])["v"].last()
    else:
        agg = ev.groupby(["row_idx", "hour"])["v"].agg(feature.aggregation)
    grid = np.full((n, hours), np.nan)
    grid[agg.index.get_level_values(0), agg.index.get_level_values(1)] = agg.to_numpy()
    return grid


@pytest.mark.parametrize("name", FEATURES.names)
def test_every_feature_matches_pandas(result, raw, name):
    """Whole [N, 48] slab and the four stats of each feature equal an independent pandas computation."""
    f = FEATURES.features[IDX[name]]
    n = len(raw["stays"])
    got = result.values[:, :, IDX[name]]
    want = expected_grid(raw, f, n)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)].astype(np.float32), rtol=1e-6)
    ev = events_in_window(raw, f)
    observed = ~np.isnan(want)
    assert result.stats[name] == {
        "rows_in_window": len(ev),
        "dropped_out_of_range": int((~ev["ok"]).sum()),
        "observed_bins": int(observed.sum()),
        "stays_observed": int(observed.any(axis=1).sum()),
    }


def test_shape_dtype_and_coverage(result, raw):
    assert result.values.shape == (140, 48, len(FEATURES.features))
    assert result.values.dtype == np.float32
    # every feature is seen somewhere in the demo, and nothing outside its valid range survives
    for k, f in enumerate(FEATURES.features):
        col = result.values[:, :, k]
        assert (~np.isnan(col)).any(), f.name
        assert np.nanmin(col) >= np.float32(f.valid_range[0]) and np.nanmax(col) <= np.float32(
            f.valid_range[1]
        )


def test_observed_hours_heart_rate_and_creatinine(result, raw):
    """Observed hours counted from the raw rows by explicit per-hour time intervals (not floor division)."""
    st = raw["stays"].set_index("stay_id")
    ce, le = raw["chartevents"], raw["labevents"]
    hr = ce[(ce["itemid"] == 220045) & ce["valuenum"].between(1, 300)]
    cr = le[(le["itemid"] == 50912) & le["valuenum"].between(0.05, 40)]
    times = {
        "heart_rate": {k: g.to_numpy() for k, g in hr.groupby("stay_id")["charttime"]},
        "creatinine": {k: g.to_numpy() for k, g in cr.groupby("subject_id")["charttime"]},
    }
    totals = {"heart_rate": 0, "creatinine": 0}
    per_stay = {}
    for stay_id, s in st.iterrows():
        edges = (s["intime"] + pd.to_timedelta(np.arange(49), unit="h")).to_numpy()
        for name, key in (("heart_rate", stay_id), ("creatinine", s["subject_id"])):
            t = times[name].get(key, np.array([], dtype=edges.dtype))
            hours = {h for h in range(48) if ((t >= edges[h]) & (t < edges[h + 1])).any()}
            totals[name] += len(hours)
            per_stay[(name, stay_id)] = hours
    for name in totals:
        got = ~np.isnan(result.values[:, :, IDX[name]])
        assert int(got.sum()) == totals[name] > 0
        for stay_id in (30057454, 39061571, 35128235):
            row = int(st.loc[stay_id, "row_idx"])
            assert set(np.flatnonzero(got[row]).tolist()) == per_stay[(name, stay_id)]
            assert len(per_stay[(name, stay_id)]) > 0


def test_exact_means_of_cells(result, raw):
    """Mean of each of the first heart-rate cells holding >= 3 readings, from the raw rows of that hour."""
    ce = raw["chartevents"]
    st = raw["stays"]
    hr = ce[ce["itemid"] == 220045].merge(st, on="stay_id")
    checked = 0
    for _, s in st.head(20).iterrows():
        for h in range(48):
            t0 = s["intime"] + pd.Timedelta(hours=h)
            rows = hr[
                (hr["stay_id"] == s["stay_id"])
                & (hr["charttime"] >= t0)
                & (hr["charttime"] < t0 + pd.Timedelta(hours=1))
            ]["valuenum"]
            if len(rows) >= 3 and len(set(rows)) > 1:
                assert result.values[s["row_idx"], h, IDX["heart_rate"]] == pytest.approx(
                    rows.mean(), rel=1e-6
                )
                checked += 1
    assert checked >= 5


def test_fahrenheit_converted_on_a_real_stay(result, raw):
    """Stay 39061571 charts Fahrenheit (223761); a cell with one Fahrenheit reading holds (F - 32) * 5/9."""
    s = raw["stays"].set_index("stay_id").loc[39061571]
    ce = raw["chartevents"]
    temp = ce[
        (ce["stay_id"] == 39061571)
        & ce["itemid"].isin([223761, 223762])
        & (ce["charttime"] >= s["intime"])
        & (ce["charttime"] < s["intime"] + pd.Timedelta(hours=48))
    ]
    hours = ((temp["charttime"] - s["intime"]).dt.total_seconds() // 3600).astype(int)
    single = temp[(temp["itemid"] == 223761) & hours.map(hours.value_counts()).eq(1)]
    assert len(single) >= 3
    for _, r in single.iterrows():
        h = int((r["charttime"] - s["intime"]).total_seconds() // 3600)
        got = result.values[int(s["row_idx"]), h, IDX["temperature"]]
        assert got == pytest.approx((r["valuenum"] - 32) * 5 / 9, rel=1e-6)
        assert 30 < got < 42


def test_temperature_out_of_range_counted(demo_con, raw):
    """The demo has Celsius readings typed in Fahrenheit (97.2, 99.0, 98.9) 72-81 h after intime; a 120 h
    window takes them in, and each is dropped and counted."""
    fs = dataclasses.replace(FEATURES, hours=120)
    res = extract_timeseries(demo_con, fs, SOURCES)
    ce, st = raw["chartevents"], raw["stays"]
    c = ce[(ce["itemid"] == 223762)].merge(st, on="stay_id")
    c = c[(c["charttime"] >= c["intime"]) & (c["charttime"] < c["intime"] + pd.Timedelta(hours=120))]
    bad = int(((c["valuenum"] < 25) | (c["valuenum"] > 45)).sum())
    assert bad == 3
    assert res.stats["temperature"]["dropped_out_of_range"] == bad
    assert res.values.shape == (140, 120, len(FEATURES.features))


def test_fio2_demo_handling(result, raw):
    """FiO2 is charted in percent in the demo; the one 4.0 inside the window is dropped, not scaled."""
    ce, st = raw["chartevents"], raw["stays"]
    f = ce[ce["itemid"] == 223835].merge(st, on="stay_id")
    f = f[(f["charttime"] >= f["intime"]) & (f["charttime"] < f["intime"] + pd.Timedelta(hours=48))]
    assert result.stats["fio2"]["dropped_out_of_range"] == int((f["valuenum"] < 21).sum()) == 1
    s = st.set_index("stay_id").loc[35128235]
    assert np.isnan(result.values[int(s["row_idx"]), 8, IDX["fio2"]])  # the 4.0 at 08:05 h was alone
    assert np.nanmin(result.values[:, :, IDX["fio2"]]) == 21.0


def test_urine_output_hourly_sums(result, raw):
    oe, st = raw["outputevents"], raw["stays"]
    u = oe[oe["itemid"].isin(FEATURES.features[IDX["urine_output"]].itemids["outputevents"])].merge(
        st, on="stay_id"
    )
    u = u[(u["charttime"] >= u["intime"]) & (u["charttime"] < u["intime"] + pd.Timedelta(hours=48))]
    u = u.assign(hour=((u["charttime"] - u["intime"]).dt.total_seconds() // 3600).astype(int))
    sums = u.groupby(["row_idx", "hour"])["value"].sum()
    multi = u.groupby(["row_idx", "hour"]).size()
    assert (multi > 1).sum() > 10  # real multi-row hours are summed
    got = result.values[:, :, IDX["urine_output"]]
    assert int((~np.isnan(got)).sum()) == len(sums)
    for (r, h), v in sums.items():
        assert got[r, h] == pytest.approx(v, rel=1e-6)
    # the GU irrigant out (227489) is not urine output
    assert 227489 not in FEATURES.features[IDX["urine_output"]].itemids["outputevents"]


def test_min_max_last(demo_con, raw):
    """gcs_eye (min) and fio2 (max) from the packaged file; heart rate re-aggregated as last, min and max."""
    n = len(raw["stays"])
    hr = FEATURES.features[IDX["heart_rate"]]
    variants = [dataclasses.replace(hr, name=f"hr_{a}", aggregation=a) for a in ("last", "min", "max")]
    fs = FeatureSet(hours=48, features=tuple(variants), source="test")
    res = extract_timeseries(demo_con, fs, {"chartevents"})
    for k, f in enumerate(variants):
        want = expected_grid(raw, f, n)
        np.testing.assert_array_equal(res.values[:, :, k], want.astype(np.float32))
    last, lo, hi = (res.values[:, :, k] for k in range(3))
    obs = ~np.isnan(last)
    assert np.sum(lo[obs] < hi[obs]) > 100 and np.sum(last[obs] != lo[obs]) > 100  # the three really differ
    for name in ("gcs_eye", "fio2"):
        f = FEATURES.features[IDX[name]]
        np.testing.assert_array_equal(
            extract_timeseries(demo_con, dataclasses.replace(FEATURES, features=(f,)), SOURCES).values[
                :, :, 0
            ],
            expected_grid(raw, f, n).astype(np.float32),
        )


def test_deterministic_across_runs(demo_con, result):
    again = extract_timeseries(demo_con, FEATURES, SOURCES)
    assert again.values.tobytes() == result.values.tobytes()
    assert again.stats == result.stats


# ----------------------------------------------------------------------------------------------------------
# synthetic raw tables: window edges, lab matching, conversions, tie-breaks

INTIME = pd.Timestamp("2150-01-01 10:00:00")


def write_raw(root, chart=(), lab=(), output=()):
    """Minimal raw files in the MIMIC-IV layout. Two stays of subject 1 (stays 100 and 101, the second
    starting 30 h after the first) and one stay of subject 2."""
    (root / "icu").mkdir(parents=True, exist_ok=True)
    (root / "hosp").mkdir(parents=True, exist_ok=True)
    stays = pd.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "hadm_id": [10, 11, 20],
            "stay_id": [100, 101, 200],
            "intime": [INTIME, INTIME + pd.Timedelta(hours=30), INTIME],
            "outtime": [
                INTIME + pd.Timedelta(hours=29),
                INTIME + pd.Timedelta(days=5),
                INTIME + pd.Timedelta(days=5),
            ],
        }
    )
    stays.to_csv(root / "icu" / "icustays.csv", index=False)
    pd.DataFrame(list(chart), columns=["subject_id", "stay_id", "itemid", "charttime", "valuenum"]).to_csv(
        root / "icu" / "chartevents.csv", index=False
    )
    labs = pd.DataFrame(list(lab), columns=["subject_id", "hadm_id", "itemid", "charttime", "valuenum"])
    labs.astype({"hadm_id": "Int64"}).to_csv(root / "hosp" / "labevents.csv", index=False)
    pd.DataFrame(list(output), columns=["subject_id", "stay_id", "itemid", "charttime", "value"]).to_csv(
        root / "icu" / "outputevents.csv", index=False
    )
    con = connect(root, ["icustays", "chartevents", "labevents", "outputevents"])
    make_cohort(con)
    return con


def at(hours=0, seconds=0, base=INTIME):
    return (base + pd.Timedelta(hours=hours, seconds=seconds)).strftime("%Y-%m-%d %H:%M:%S")


def feature(name, source, ids, rng=(0, 1000), agg="mean", convert=None):
    return Feature(
        name=name,
        unit="",
        itemids={source: tuple(ids)},
        valid_range=rng,
        aggregation=agg,
        convert=convert or {},
    )


def test_window_edges_chartevents(tmp_path):
    """intime-1s and intime+48h are out; intime is hour 0; intime+47:59:59 is hour 47; an event charted on
    another stay of the same subject does not leak in."""
    con = write_raw(
        tmp_path,
        chart=[
            (2, 200, 1, at(seconds=-1), 1.0),
            (2, 200, 1, at(), 2.0),
            (2, 200, 1, at(hours=47, seconds=3599), 3.0),
            (2, 200, 1, at(hours=48), 4.0),
            (2, 200, 1, at(hours=0, seconds=3599), 5.0),
            (1, 101, 1, at(hours=1), 6.0),  # stay 101 starts at +30 h: outside its own window
            (1, 100, 1, at(hours=1, seconds=1), None),  # NULL value: skipped, not counted
        ],
    )
    fs = FeatureSet(hours=48, features=(feature("x", "chartevents", [1]),), source="t")
    res = extract_timeseries(con, fs, {"chartevents"})
    v = res.values[:, :, 0]
    assert v[2, 0] == 3.5 and v[2, 47] == 3.0  # row 2 = stay 200: mean(2, 5) in hour 0
    assert np.count_nonzero(~np.isnan(v)) == 2
    assert res.stats["x"] == {
        "rows_in_window": 3,
        "dropped_out_of_range": 0,
        "observed_bins": 2,
        "stays_observed": 1,
    }


def test_labs_matched_by_subject_and_time(tmp_path):
    """Labs carry no stay_id: a lab belongs to every stay of its subject whose window holds its charttime
    (hadm_id may be NULL); edges as for chartevents."""
    con = write_raw(
        tmp_path,
        lab=[
            (1, 10, 7, at(seconds=-1), 1.0),  # before stay 100
            (1, None, 7, at(hours=2), 2.0),  # stay 100 hour 2 (no hadm_id)
            (1, 11, 7, at(hours=31, seconds=30), 3.0),  # stay 100 hour 31 and stay 101 hour 1
            (1, 11, 7, at(hours=78), 4.0),  # stay 101: exactly intime + 48 h, out
            (1, 11, 7, at(hours=77, seconds=3599), 5.0),  # stay 101 hour 47
            (2, 20, 7, at(hours=47, seconds=3599), 6.0),  # stay 200 hour 47
            (2, 20, 8, at(hours=3), 9.0),  # another itemid: ignored
        ],
    )
    fs = FeatureSet(hours=48, features=(feature("lab", "labevents", [7]),), source="t")
    v = extract_timeseries(con, fs, {"labevents"}).values[:, :, 0]
    observed = {(int(r), int(h)): float(v[r, h]) for r, h in zip(*np.nonzero(~np.isnan(v)), strict=True)}
    assert observed == {(0, 2): 2.0, (0, 31): 3.0, (1, 1): 3.0, (1, 47): 5.0, (2, 47): 6.0}


def test_conversions_ranges_and_sources_combined(tmp_path):
    """fraction_to_percent scales only x <= 1; Fahrenheit is converted before the range check; a feature with
    itemids in two tables is aggregated over both; urine output sums per hour."""
    con = write_raw(
        tmp_path,
        chart=[
            (2, 200, 11, at(hours=0), 0.5),
            (2, 200, 11, at(hours=1), 1.0),
            (2, 200, 11, at(hours=2), 0.0),
            (2, 200, 11, at(hours=3), 21.0),
            (2, 200, 11, at(hours=4), 4.0),
            (2, 200, 11, at(hours=5), 60.0),
            (2, 200, 21, at(hours=0), 98.6),
            (2, 200, 21, at(hours=1), 212.0),
            (2, 200, 22, at(hours=1), 37.5),
            (2, 200, 22, at(hours=2), 99.0),
            (2, 200, 31, at(hours=0, seconds=60), 100.0),
        ],
        lab=[(2, 20, 32, at(hours=0, seconds=120), 130.0), (2, 20, 32, at(hours=0, seconds=180), 150.0)],
        output=[
            (2, 200, 41, at(hours=6), 50.0),
            (2, 200, 42, at(hours=6, seconds=1800), 25.0),
            (2, 200, 41, at(hours=7), 6000.0),
        ],
    )
    glucose = Feature(
        name="glu",
        unit="",
        itemids={"chartevents": (31,), "labevents": (32,)},
        valid_range=(10, 2000),
        aggregation="mean",
    )
    fs = FeatureSet(
        hours=48,
        source="t",
        features=(
            feature("fio2", "chartevents", [11], (21, 100), "max", {11: "fraction_to_percent"}),
            feature("temp", "chartevents", [21, 22], (25, 45), "mean", {21: "fahrenheit_to_celsius"}),
            glucose,
            feature("uo", "outputevents", [41, 42], (0, 5000), "sum"),
        ),
    )
    res = extract_timeseries(con, fs, SOURCES)
    fio2, temp, glu, uo = (res.values[2, :, k] for k in range(4))
    np.testing.assert_array_equal(fio2[:6], np.array([50, 100, np.nan, 21, np.nan, 60], dtype=np.float32))
    assert temp[0] == np.float32(37.0) and temp[1] == np.float32(37.5) and np.isnan(temp[2])
    assert glu[0] == np.float32((100 + 130 + 150) / 3)
    assert uo[6] == 75.0 and np.isnan(uo[7])
    assert res.stats["fio2"]["dropped_out_of_range"] == 2
    assert res.stats["temp"]["dropped_out_of_range"] == 2  # 212 F = 100 C, and 99 "C"
    assert res.stats["uo"] == {
        "rows_in_window": 3,
        "dropped_out_of_range": 1,
        "observed_bins": 1,
        "stays_observed": 1,
    }


def test_last_breaks_charttime_ties_by_value(tmp_path):
    con = write_raw(
        tmp_path,
        chart=[
            (2, 200, 1, at(hours=0, seconds=10), 9.0),
            (2, 200, 1, at(hours=0, seconds=20), 4.0),
            (2, 200, 1, at(hours=0, seconds=20), 3.0),
            (2, 200, 1, at(hours=1, seconds=5), 7.0),
            (2, 200, 1, at(hours=1, seconds=50), 5000.0),  # latest but out of range: not "last"
        ],
    )
    fs = FeatureSet(hours=48, features=(feature("x", "chartevents", [1], agg="last"),), source="t")
    v = extract_timeseries(con, fs, {"chartevents"}).values[2, :, 0]
    assert v[0] == 4.0 and v[1] == 7.0


def test_errors_name_the_problem(tmp_path):
    con = write_raw(tmp_path)
    fs = FeatureSet(hours=48, features=(feature("lab", "labevents", [7]),), source="my_features.yaml")
    with pytest.raises(TimeseriesError, match=r"my_features\.yaml: features lab read table\(s\) labevents"):
        extract_timeseries(con, fs, {"chartevents"})
    con.execute("UPDATE cohort SET row_idx = row_idx + 1")
    with pytest.raises(TimeseriesError, match=r"row_idx must be 0\.\.2"):
        extract_timeseries(con, fs, SOURCES)
    con.execute("DROP TABLE cohort")
    with pytest.raises(TimeseriesError, match="table 'cohort'"):
        extract_timeseries(con, fs, SOURCES)


def test_empty_cohort(tmp_path):
    con = write_raw(tmp_path, chart=[(2, 200, 1, at(), 2.0)])
    con.execute("DELETE FROM cohort")
    fs = FeatureSet(hours=48, features=(feature("x", "chartevents", [1]),), source="t")
    res = extract_timeseries(con, fs, {"chartevents"})
    assert res.values.shape == (0, 48, 1) and res.stats["x"]["rows_in_window"] == 0


def test_sums_do_not_depend_on_thread_scheduling():
    """A floating-point SUM over 2 threads changes in its last bits from run to run (partials are combined in
    scheduling order); the stage's exact DECIMAL sums must give the same double every time."""
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute(f"""CREATE TABLE chartevents AS SELECT 200::BIGINT AS stay_id, 1 AS itemid,
        TIMESTAMP '{INTIME}' + to_seconds(i % 3600) AS charttime,
        ((i * 7919) % 100003) / 7.0 + 1e-3 * (i % 13) AS valuenum FROM range(600000) t(i)""")
    con.execute(
        f"CREATE TABLE cohort AS SELECT 0 AS row_idx, 200::BIGINT AS stay_id, 2::BIGINT AS subject_id, "
        f"TIMESTAMP '{INTIME}' AS intime"
    )
    for agg in ("sum", "mean"):
        fs = FeatureSet(hours=48, features=(feature("x", "chartevents", [1], (0, 1e6), agg),), source="t")
        sql = timeseries_sql(fs, ["chartevents"])
        got = {con.execute(sql).fetchall()[0][3] for _ in range(4)}
        assert len(got) == 1
        vals = con.execute("SELECT valuenum FROM chartevents").fetchnumpy()["valuenum"]
        exact = math.fsum(vals) / (1 if agg == "sum" else len(vals))
        assert got.pop() == pytest.approx(exact, rel=1e-14)


def test_docs_feature_table_matches_features_yaml():
    """docs/features.md lists every feature with the itemids, unit, range and aggregation of features.yaml."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "features.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in FEATURES.names:
            rows[cells[0]] = cells
    assert list(rows) == FEATURES.names
    for f in FEATURES.features:
        _, ids, unit, rng, agg, conv = rows[f.name]
        assert {int(x) for x in re.findall(r"\b\d{5,6}\b", ids)} == set(f.all_itemids()), f.name
        assert (unit, agg) == (f.unit, f.aggregation), f.name
        assert rng == f"{f.valid_range[0]:g}–{f.valid_range[1]:g}", f.name
        assert conv == (", ".join(f"{k}: {v}" for k, v in f.convert.items()) or "–"), f.name
