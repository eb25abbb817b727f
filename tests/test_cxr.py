"""CXR linkage and image cache on real demo stays + real open radiographs (tests/cxr_fixture.py)."""

from __future__ import annotations

import io
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from carebench.data.images import load_square_gray, square_geometry, to_gray8
from carebench.data.mimic.cxr import image_path, prepare_cxr, register_cxr_metadata
from carebench.errors import UserError
from cxr_fixture import (
    SCENARIOS,
    UNKNOWN_SUBJECT,
    build_cxr_fixture,
    dicom_id_for,
    read_metadata,
    scenario_stays,
)

S = 256


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stays(demo_root: Path) -> pd.DataFrame:
    """Demo icustays read with plain pandas; row_idx in stay_id order (what the cohort stage guarantees)."""
    st = pd.read_csv(demo_root / "icu" / "icustays.csv.gz", parse_dates=["intime", "outtime"])
    st = st.sort_values("stay_id").reset_index(drop=True)
    st["row_idx"] = np.arange(len(st), dtype=np.int32)
    return st[["row_idx", "stay_id", "subject_id", "hadm_id", "intime", "outtime"]]


def connect(stays: pd.DataFrame) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register("stays_df", stays)
    con.execute(
        "CREATE TABLE cohort AS SELECT CAST(row_idx AS INTEGER) AS row_idx, stay_id, subject_id, hadm_id, "
        "CAST(intime AS TIMESTAMP) AS intime, CAST(outtime AS TIMESTAMP) AS outtime FROM stays_df"
    )
    con.unregister("stays_df")
    return con


@pytest.fixture(scope="module")
def built(tmp_path_factory, stays, cxr_open_root):
    """The fixture tree and one prepare_cxr run with the default window."""
    root = tmp_path_factory.mktemp("cxr")
    expected = build_cxr_fixture(root / "mimic-cxr-jpg", stays, cxr_open_root)
    out = root / "out" / "cxr.npy"
    res = prepare_cxr(connect(stays), root / "mimic-cxr-jpg", out, image_size=S, threads=2)
    cols = res.columns.assign(stay_id=stays["stay_id"].to_numpy())
    anchor = scenario_stays(stays)
    # the multi_stay anchor is the first of a subject's two closest stays; name the second one too
    first = stays[stays["stay_id"] == anchor["multi_stay"]].iloc[0]
    later = stays[(stays["subject_id"] == first["subject_id"]) & (stays["intime"] > first["intime"])]
    anchor["multi_stay_2"] = int(later.sort_values("intime")["stay_id"].iloc[0])
    return {
        "root": root / "mimic-cxr-jpg",
        "expected": expected,
        "res": res,
        "cols": cols,
        "out": out,
        "anchor": anchor,
    }


def row_of(built, scenario: str) -> pd.Series:
    c = built["cols"]
    return c.loc[c["stay_id"] == built["anchor"][scenario]].iloc[0]


def parse_meta_times(meta: pd.DataFrame) -> pd.Series:
    """Independent StudyDate/StudyTime parse: zero-pad the integer part of HHMMSS, split the fraction."""
    out = []
    for d, t in zip(meta["StudyDate"], meta["StudyTime"], strict=True):
        if not isinstance(t, str) or not t.strip():
            out.append(pd.NaT)
            continue
        whole, _, frac = t.strip().partition(".")
        whole = whole.zfill(6)
        us = int((frac + "000000")[:6]) if frac else 0
        out.append(
            pd.Timestamp(f"{d}"[:4] + "-" + f"{d}"[4:6] + "-" + f"{d}"[6:8])
            + pd.Timedelta(
                hours=int(whole[:2]), minutes=int(whole[2:4]), seconds=int(whole[4:6]), microseconds=us
            )
        )
    return pd.Series(out, index=meta.index, dtype="datetime64[us]")


# ---------------------------------------------------------------- linkage


def test_linkage_equals_expected_for_every_stay(built, stays):
    exp = built["expected"]
    got = dict(zip(built["cols"]["stay_id"], built["cols"]["cxr_dicom_id"], strict=True))
    assert len(got) == len(stays) == 140
    assert got == exp
    n_img = sum(v is not None for v in exp.values())
    assert (
        n_img == 15
    )  # 19 anchored stays; before_intime, at_prediction, after, lateral_only, truncated_only: none
    assert built["res"].stats["stays_with_image"] == n_img
    assert (built["cols"]["has_cxr"] == built["cols"]["cxr_dicom_id"].notna()).all()


@pytest.mark.parametrize(
    ("scenario", "k"),
    [
        ("single_ap", 0),
        ("at_intime", 0),
        ("two_eligible", 1),
        ("before_and_in", 1),
        ("just_before_prediction", 0),
        ("lateral_later", 0),
        ("other_views", 0),
        ("corrupt_fallback", 0),
        ("missing_fallback", 0),
        ("fractional", 0),
        ("nih_png", 0),
        ("large_jpeg", 0),
    ],
)
def test_scenario_picks_named_image(built, scenario, k):
    r = row_of(built, scenario)
    assert r["cxr_dicom_id"] == dicom_id_for(scenario, k)
    assert r["cxr_hours"] == pytest.approx(SCENARIOS[scenario][k].hours, abs=1e-9)
    assert r["cxr_view"] == SCENARIOS[scenario][k].view.upper()


@pytest.mark.parametrize(
    "scenario", ["before_intime", "at_prediction", "after", "lateral_only", "truncated_only"]
)
def test_scenario_without_image(built, scenario):
    r = row_of(built, scenario)
    assert not r["has_cxr"] and r["cxr_dicom_id"] is None and r["cxr_view"] is None
    assert pd.isna(r["cxr_time"]) and np.isnan(r["cxr_hours"]) and r["cxr_index"] == -1


def test_tie_on_study_time_takes_larger_dicom_id(built):
    r = row_of(built, "same_time")
    assert r["cxr_dicom_id"] == max(dicom_id_for("same_time", 0), dicom_id_for("same_time", 1))


def test_multi_stay_subject_each_stay_gets_its_own_window(built, stays):
    first, second = built["anchor"]["multi_stay"], built["anchor"]["multi_stay_2"]
    gap = stays.set_index("stay_id").loc[second, "intime"] - stays.set_index("stay_id").loc[first, "intime"]
    assert (
        pd.Timedelta(hours=0.5) < gap < pd.Timedelta(hours=5)
    )  # the demo pair (39 min) the fixture relies on
    c = built["cols"].set_index("stay_id")
    # Stays 39 min apart: +5 h is inside both windows, but +48.5 h (after the first stay's window) only the second's.
    assert c.loc[first, "cxr_dicom_id"] == dicom_id_for("multi_stay", 1)
    assert c.loc[second, "cxr_dicom_id"] == dicom_id_for("multi_stay", 2)


def test_no_image_at_or_after_prediction_time(built, stays):
    c = built["cols"][built["cols"]["has_cxr"]]
    assert (c["cxr_hours"] >= 0).all() and (c["cxr_hours"] < 48).all()
    # The fixture really holds images at exactly intime + 48 h for cohort subjects, none of which is linked.
    meta = read_metadata(built["root"])
    meta["t"] = parse_meta_times(meta)
    m = meta.merge(stays, on="subject_id")
    at_48 = m[m["t"] == m["intime"] + pd.Timedelta(hours=48)]
    assert set(at_48["dicom_id"]) == {
        dicom_id_for("at_prediction", 0),
        dicom_id_for("just_before_prediction", 1),
    }
    assert not set(at_48["dicom_id"]) & set(c["cxr_dicom_id"])


def test_times_and_hours_match_metadata(built, stays):
    meta = read_metadata(built["root"]).set_index("dicom_id")
    t = parse_meta_times(meta)
    c = built["cols"][built["cols"]["has_cxr"]]
    intime = stays.set_index("stay_id").loc[c["stay_id"], "intime"].to_numpy()
    assert (c["cxr_time"].to_numpy() == t.loc[c["cxr_dicom_id"]].to_numpy()).all()
    hours = (t.loc[c["cxr_dicom_id"]].to_numpy() - intime) / np.timedelta64(1, "h")
    np.testing.assert_allclose(c["cxr_hours"].to_numpy(), hours, rtol=0, atol=1e-12)
    assert row_of(built, "fractional")["cxr_time"].microsecond == 500_000


def test_columns_dtypes_and_cache_index(built):
    c, res = built["cols"], built["res"]
    assert list(res.columns.columns) == [
        "has_cxr",
        "cxr_dicom_id",
        "cxr_time",
        "cxr_hours",
        "cxr_view",
        "cxr_index",
    ]
    assert c["has_cxr"].dtype == bool and c["cxr_index"].dtype == np.int32
    idx = c["cxr_index"].to_numpy()
    assert (idx[~c["has_cxr"]] == -1).all()
    assert list(idx[c["has_cxr"].to_numpy()]) == list(range(int(c["has_cxr"].sum())))  # 0..M-1 in row order
    assert set(c["cxr_view"].dropna()) == {"AP", "PA"}
    cache = np.load(built["out"], mmap_mode="r")
    assert cache.dtype == np.uint8 and cache.shape == (15, S, S)
    assert sorted(p.name for p in built["out"].parent.iterdir()) == ["cxr.npy"]  # no temp files left


def test_bad_files_reported_and_fall_back(built):
    st, warns = built["res"].stats, built["res"].warnings
    assert st["missing_files"] == 1 and st["corrupt_files"] == 2
    assert st["stays_fallback"] == 2  # corrupt_fallback and missing_fallback
    text = "\n".join(warns)
    assert dicom_id_for("missing_fallback", 1) in text
    assert dicom_id_for("corrupt_fallback", 1) in text and dicom_id_for("truncated_only", 0) in text
    meta = read_metadata(built["root"]).set_index("dicom_id").loc[dicom_id_for("missing_fallback", 1)]
    assert not image_path(built["root"], meta["subject_id"], meta["study_id"], meta.name).exists()


def test_stats_counts_from_metadata(built, stays):
    meta = read_metadata(built["root"])
    meta["t"] = parse_meta_times(meta)
    st = built["res"].stats
    assert st["metadata_rows"] == len(meta) == 34
    assert st["metadata_rows_invalid_time"] == int(meta["t"].isna().sum()) == 1
    appa = meta[
        meta["ViewPosition"].fillna("").str.strip().str.upper().isin(["AP", "PA"]) & meta["t"].notna()
    ]
    assert st["ap_pa_rows"] == len(appa)
    pairs = appa.merge(stays, on="subject_id")
    in_win = pairs[(pairs["t"] >= pairs["intime"]) & (pairs["t"] < pairs["intime"] + pd.Timedelta(hours=48))]
    assert st["candidates_in_window"] == len(in_win)
    assert st["stays_with_candidate"] == in_win["stay_id"].nunique()
    assert UNKNOWN_SUBJECT not in set(pairs["subject_id"])


@pytest.mark.parametrize(
    ("lookback", "prediction", "changed"),
    [
        (12.0, 48.0, {"before_intime": ("before_intime", 0)}),
        (
            0.0,
            24.0,
            {
                "two_eligible": ("two_eligible", 0),
                "just_before_prediction": None,
                "multi_stay_2": ("multi_stay", 1),
            },
        ),
    ],
)
def test_window_options_move_the_window(tmp_path, stays, cxr_open_root, built, lookback, prediction, changed):
    expected = build_cxr_fixture(
        tmp_path / "cxr", stays, cxr_open_root, lookback_hours=lookback, prediction_hours=prediction
    )
    res = prepare_cxr(
        connect(stays),
        tmp_path / "cxr",
        tmp_path / "c.npy",
        image_size=32,
        lookback_hours=lookback,
        prediction_hours=prediction,
    )
    got = dict(zip(stays["stay_id"], res.columns["cxr_dicom_id"], strict=True))
    assert got == expected
    hours = res.columns["cxr_hours"].dropna()
    assert (hours >= -lookback).all() and (hours < prediction).all()
    base = dict(zip(built["cols"]["stay_id"], built["cols"]["cxr_dicom_id"], strict=True))
    diff = {s for s in got if got[s] != base[s]}
    anchors = built["anchor"]
    assert {s: got[s] for s in diff} == {
        anchors[name]: (dicom_id_for(*v) if v else None) for name, v in changed.items()
    }
    if lookback:
        r = res.columns[stays["stay_id"] == anchors["before_intime"]].iloc[0]
        assert r["cxr_hours"] == pytest.approx(-6.0)


def test_thread_count_does_not_change_result(built, stays, tmp_path):
    res = prepare_cxr(connect(stays), built["root"], tmp_path / "one.npy", image_size=S, threads=1)
    pd.testing.assert_frame_equal(res.columns, built["res"].columns)
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(built["out"]))


# ---------------------------------------------------------------- pixels


def reference_pixels(path: Path, size: int) -> np.ndarray:
    """Independent reference: full decode, PIL resize of the shorter side, then a centre crop."""
    with Image.open(path) as im:
        g = im.convert("L")
        w, h = g.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        r = g.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = round((nw - size) / 2), round((nh - size) / 2)
        return np.asarray(r.crop((left, top, left + size, top + size)), dtype=np.int16)


@pytest.mark.parametrize("scenario", ["single_ap", "two_eligible", "nih_png", "fractional"])
def test_cached_pixels_equal_pil_resize_crop(built, scenario):
    r = row_of(built, scenario)
    meta = read_metadata(built["root"]).set_index("dicom_id").loc[r["cxr_dicom_id"]]
    path = image_path(built["root"], meta["subject_id"], meta["study_id"], r["cxr_dicom_id"])
    cache = np.load(built["out"], mmap_mode="r")
    got = cache[r["cxr_index"]].astype(np.int16)
    ref = reference_pixels(path, S)
    assert np.abs(got - ref).max() <= 1
    assert got.std() > 20  # a real radiograph, not a blank


def test_large_jpeg_reduced_decode_is_close_to_full_decode(built):
    r = row_of(built, "large_jpeg")
    meta = read_metadata(built["root"]).set_index("dicom_id").loc[r["cxr_dicom_id"]]
    path = image_path(built["root"], meta["subject_id"], meta["study_id"], r["cxr_dicom_id"])
    with Image.open(path) as im:
        assert min(im.size) >= 4 * S  # big enough that the JPEG is decoded at 1/2 scale
    got = np.load(built["out"], mmap_mode="r")[r["cxr_index"]].astype(np.int16)
    d = np.abs(got - reference_pixels(path, S))
    assert d.mean() < 0.5 and (d <= 1).mean() > 0.99 and d.max() <= 16
    assert not np.array_equal(load_square_gray(path, S, draft=False).astype(np.int16), got)  # draft was used


def test_geometry_matches_torchvision(cxr_open_root):
    import torchvision.transforms as T

    for p in [
        *sorted((cxr_open_root / "hannover").glob("*.jpg"))[:3],
        *sorted((cxr_open_root / "nih").glob("*.png")),
    ]:
        for size in (64, 225):
            with Image.open(p) as im:
                ref = np.asarray(T.CenterCrop(size)(T.Resize(size)(im.convert("L"))), dtype=np.int16)
            got = load_square_gray(p, size, draft=False).astype(np.int16)
            assert got.shape == (size, size) and np.abs(got - ref).max() <= 1


def test_square_geometry_known_values():
    # 512x419 landscape -> 312x256 (int(256*512/419) = 312), crop left round(56/2) = 28
    assert square_geometry(512, 419, 256) == pytest.approx((28 * 512 / 312, 0, 284 * 512 / 312, 419))
    # portrait 434x512 -> 256x302 (131072/434 = 302.009), crop top round(46/2) = 23
    assert square_geometry(434, 512, 256) == pytest.approx((0, 23 * 512 / 302, 434, 279 * 512 / 302))
    # 512x421 -> 311x256, crop left round(55/2) = 28 (Python rounds half to even, as torchvision does)
    assert square_geometry(512, 421, 256) == pytest.approx((28 * 512 / 311, 0, 284 * 512 / 311, 421))
    assert square_geometry(512, 512, 256) == (0, 0, 512, 512)


def test_to_gray8_modes(cxr_open_root):
    with Image.open(sorted((cxr_open_root / "nih").glob("*.png"))[0]) as im:
        u8 = np.asarray(im.convert("L"))
    rgb = Image.merge("RGB", [Image.fromarray(u8)] * 3)
    assert np.array_equal(np.asarray(to_gray8(rgb)), u8)
    assert np.array_equal(np.asarray(to_gray8(Image.merge("LA", [Image.fromarray(u8)] * 2))), u8)
    # 16-bit PNG, full range (value x 257): exact round trip
    full = u8.astype(np.uint16) * 257
    lo, hi = int(u8.min()), int(u8.max())
    stretched = np.rint((u8.astype(float) - lo) * 255 / (hi - lo)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(full).save(buf, "PNG")
    buf.seek(0)
    with Image.open(buf) as im16:
        assert im16.mode.startswith("I")
        assert np.array_equal(np.asarray(to_gray8(im16)), stretched)
    # 12-bit data in a 16-bit container is stretched to the full 8-bit range, not left near black
    twelve = Image.fromarray(u8.astype(np.uint16) * 16)
    assert np.array_equal(np.asarray(to_gray8(twelve)), stretched)
    assert np.asarray(to_gray8(Image.fromarray(np.full((4, 4), 700, np.uint16)))).max() == 0
    f32 = Image.fromarray(u8.astype(np.float32) / 255.0, mode="F")
    assert np.abs(np.asarray(to_gray8(f32)).astype(int) - stretched).max() <= 1
    pal = Image.fromarray(u8).convert("P")
    assert np.abs(np.asarray(to_gray8(pal)).astype(int) - u8).max() <= 8


def test_load_square_gray_16bit_png_file(tmp_path, cxr_open_root):
    src = sorted((cxr_open_root / "nih").glob("*.png"))[1]
    with Image.open(src) as im:
        u8 = np.asarray(im.convert("L"))
    lo, hi = int(u8.min()), int(u8.max())
    stretched = np.rint((u8.astype(float) - lo) * 255 / (hi - lo)).astype(np.uint8)
    Image.fromarray(u8.astype(np.uint16) * 257).save(tmp_path / "x16.png")
    Image.fromarray(stretched).save(tmp_path / "x8.png")
    got = load_square_gray(tmp_path / "x16.png", 100)
    assert np.array_equal(got, load_square_gray(tmp_path / "x8.png", 100))
    assert np.array_equal(got.astype(np.int16), reference_pixels(tmp_path / "x8.png", 100))


# ---------------------------------------------------------------- metadata parsing and errors


TIME_CASES = [  # (StudyDate, StudyTime text, expected timestamp or None)
    (21800723, "134512.5", "2180-07-23 13:45:12.5"),
    (21800723, "93000", "2180-07-23 09:30:00"),
    (21800723, "93000.000", "2180-07-23 09:30:00"),
    (21800723, "507.25", "2180-07-23 00:05:07.25"),
    (21800723, "0", "2180-07-23 00:00:00"),
    (21800723, "235959.999999", "2180-07-23 23:59:59.999999"),
    (21800723, "213014.531", "2180-07-23 21:30:14.531"),
    (21000101, "1", "2100-01-01 00:00:01"),
    (21800723, "240000", None),  # hour 24
    (21800723, "126000", None),  # minute 60
    (21800723, "125960", None),  # second 60
    (21800723, "-5", None),
    (21800723, "abc", None),
    (21800723, "", None),
    (21801323, "120000", None),  # month 13
]


def write_meta(root: Path, df: pd.DataFrame, name="mimic-cxr-2.0.0-metadata.csv") -> None:
    root.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet"):
        df.to_parquet(root / name)
    else:
        df.to_csv(root / name, index=False)


def time_meta() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "dicom_id": [f"d{i:02d}" for i in range(len(TIME_CASES))],
            "subject_id": 10000032,
            "study_id": 50000001,
            "PerformedProcedureStepDescription": "CHEST",
            "ViewPosition": ["AP", " pa", "LATERAL", "", "AP AXIAL"] * 3,
            "Rows": 3000,
            "Columns": 2500,
            "StudyDate": [d for d, _, _ in TIME_CASES],
            "StudyTime": [t for _, t, _ in TIME_CASES],
        }
    )


@pytest.mark.parametrize(
    "name",
    ["mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.parquet"],
)
def test_study_time_parsing(tmp_path, name):
    df = time_meta()
    if name.endswith(".gz"):
        df.to_csv(tmp_path / name, index=False, compression="gzip")
    else:
        write_meta(tmp_path, df, name)
    con = duckdb.connect()
    assert register_cxr_metadata(con, tmp_path) == tmp_path / name
    got = con.execute("SELECT dicom_id, study_time, view_position FROM cxr_metadata ORDER BY dicom_id").df()
    exp = [pd.Timestamp(e) if e else pd.NaT for _, _, e in TIME_CASES]
    for g, e, case in zip(got["study_time"], exp, TIME_CASES, strict=True):
        assert (pd.isna(g) and pd.isna(e)) or g == e, case
    views = [None if pd.isna(v) else v for v in got["view_position"][:5]]
    assert views == ["AP", "PA", "LATERAL", None, "AP AXIAL"]


def test_parquet_with_numeric_study_time(tmp_path):
    df = pd.DataFrame(
        {
            "dicom_id": ["a", "b", "c"],
            "subject_id": [1, 1, 1],
            "study_id": [2, 2, 2],
            "ViewPosition": ["AP", "PA", None],
            "StudyDate": [21800723, 21800724, 21800725],
            "StudyTime": [134512.5, 93000.0, 5.0],
        }
    )
    write_meta(tmp_path, df, "mimic-cxr-2.0.0-metadata.parquet")
    con = duckdb.connect()
    register_cxr_metadata(con, tmp_path)
    got = [r[0] for r in con.execute("SELECT study_time FROM cxr_metadata ORDER BY dicom_id").fetchall()]
    assert [pd.Timestamp(t) for t in got] == [
        pd.Timestamp("2180-07-23 13:45:12.5"),
        pd.Timestamp("2180-07-24 09:30:00"),
        pd.Timestamp("2180-07-25 00:00:05"),
    ]


def one_line_error(fn) -> str:
    with pytest.raises(UserError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_error_missing_root_and_metadata(tmp_path, stays):
    con = connect(stays)
    msg = one_line_error(lambda: prepare_cxr(con, tmp_path / "nope", tmp_path / "o" / "c.npy"))
    assert str(tmp_path / "nope") in msg and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    msg = one_line_error(lambda: prepare_cxr(con, tmp_path / "empty", tmp_path / "o" / "c.npy"))
    assert "mimic-cxr-2.0.0-metadata.csv.gz" in msg and str(tmp_path / "empty") in msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("column", ["StudyTime", "ViewPosition", "dicom_id", "study_id"])
def test_error_missing_column(tmp_path, stays, column):
    write_meta(tmp_path / "cxr", time_meta().drop(columns=[column]))
    msg = one_line_error(lambda: prepare_cxr(connect(stays), tmp_path / "cxr", tmp_path / "c.npy"))
    assert f"missing column '{column}'" in msg and "mimic-cxr-2.0.0-metadata.csv" in msg
    assert not (tmp_path / "c.npy").exists()


def test_error_unreadable_metadata(tmp_path, stays):
    (tmp_path / "cxr").mkdir()
    (tmp_path / "cxr" / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(b"not gzip at all")
    msg = one_line_error(lambda: prepare_cxr(connect(stays), tmp_path / "cxr", tmp_path / "c.npy"))
    assert "mimic-cxr-2.0.0-metadata.csv.gz" in msg


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"lookback_hours": -1.0}, "lookback_hours"),
        ({"prediction_hours": 0.0}, "prediction_hours"),
        ({"image_size": 4}, "image_size"),
        ({"threads": 0}, "threads"),
    ],
)
def test_error_bad_options(tmp_path, stays, kw, name):
    msg = one_line_error(lambda: prepare_cxr(connect(stays), tmp_path, tmp_path / "c.npy", **kw))
    assert msg.startswith(name)


def test_interrupted_run_leaves_nothing(built, stays, tmp_path):
    def boom(done, total):
        if done == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        prepare_cxr(
            connect(stays), built["root"], tmp_path / "out" / "c.npy", image_size=32, on_progress=boom
        )
    assert list((tmp_path / "out").iterdir()) == []
