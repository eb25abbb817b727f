"""End-to-end `prepare` on the real MIMIC-IV demo: the dataset contract, numbers checked against plain pandas,
byte-for-byte reproducibility, format independence (csv.gz / csv / parquet), folds, and X-ray integration."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

from carebench.cli import app
from carebench.data import store
from carebench.data.definitions import load_features, load_phenotypes
from carebench.data.describe import summarize
from carebench.data.mimic.pipeline import COHORT_COLUMNS, prepare
from carebench.data.store import HASH_MAX_BYTES, dataset_fingerprint
from test_cohort import expected_demo_cohort

TABLES = {
    "hosp": ["patients", "admissions", "labevents", "diagnoses_icd"],
    "icu": ["icustays", "chartevents", "outputevents"],
}
PHENO = [p.column for p in load_phenotypes()]
QUIET = Console(quiet=True)


def _bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


# ---------------------------------------------------------------- the contract


def test_dataset_contract(prepared_demo):
    ds = store.open_dataset(prepared_demo)
    features = load_features()
    assert list(ds.cohort.columns) == list(COHORT_COLUMNS) + PHENO
    assert set(store.REQUIRED_COLUMNS) <= set(COHORT_COLUMNS)
    # the declarations: the three tasks with their label columns, in order; the fairness attributes
    assert ds.tasks == ["mortality", "phenotype", "los"]
    assert ds.label_columns("mortality") == ["label_mortality"] and ds.label_columns("los") == ["label_los"]
    assert ds.label_columns("phenotype") == PHENO
    assert ds.attributes == ["age_band", "gender", "race_group", "admission_type", "insurance", "has_cxr"]
    assert ds.ehr.dtype == np.float32
    assert ds.ehr.shape == (74, features.hours, len(features.names)) == (74, 48, len(features.names))
    assert ds.features == features.names
    # prepared without --mimic-cxr: no image cache, no stay has an X-ray
    assert ds.cxr is None and not (prepared_demo / store.CXR).exists()
    c = ds.cohort
    assert not c["has_cxr"].any()
    assert (c["cxr_index"] == -1).all()
    assert c["cxr_dicom_id"].isna().all() and c["cxr_view"].isna().all()
    assert c["cxr_time"].isna().all() and c["cxr_hours"].isna().all()
    schema = pq.read_schema(prepared_demo / store.COHORT)
    assert str(schema.field("cxr_dicom_id").type) == "string"
    assert str(schema.field("intime").type) == "timestamp[us]"
    for col in ["fold", "label_mortality", "label_los", *PHENO]:
        assert str(schema.field(col).type) == "int8", col
    assert set(c["race_group"]) <= {"WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO", "ASIAN", "OTHER"}
    # nothing but the dataset files in the directory (the DuckDB spill dir is gone)
    assert sorted(p.name for p in prepared_demo.iterdir()) == sorted(
        [store.MANIFEST, store.COHORT, store.EHR]
    )


def test_cohort_matches_pandas(prepared_demo, demo_root):
    got = store.open_dataset(prepared_demo).cohort
    exp, _ = expected_demo_cohort(demo_root)
    for col in [
        "stay_id",
        "subject_id",
        "hadm_id",
        "age",
        "gender",
        "race",
        "admission_type",
        "insurance",
        "label_mortality",
        "label_los",
    ]:
        assert got[col].tolist() == exp[col].tolist(), col
    assert got["intime"].tolist() == exp["intime"].tolist()
    assert got["outtime"].tolist() == exp["outtime"].tolist()
    np.testing.assert_allclose(got["los_days"], exp["los_days"], rtol=1e-12)
    assert int(got["label_mortality"].sum()) == 9


def test_manifest(prepared_demo, demo_root):
    m = json.loads((prepared_demo / store.MANIFEST).read_text())
    _, steps = expected_demo_cohort(demo_root)
    assert m["format_version"] == store.FORMAT_VERSION
    assert [s["step"] for s in m["cohort_steps"]] == list(steps)
    assert [s["stays"] for s in m["cohort_steps"]] == list(steps.values())
    assert all(s["rule"] for s in m["cohort_steps"])
    opts = m["producer"]["options"]
    assert m["producer"]["name"] == "mimic"
    assert opts["seed"] == 0 and opts["threads"] == 2 and opts["memory_limit"] == "2GB"
    assert opts["mimic_iv"] == str(demo_root.absolute()) and opts["mimic_cxr"] is None
    assert m["time_grid"] == {"steps": 48, "step_hours": 1.0, "hours": 48.0} and m["images"] is None
    assert m["cohort"]["stays"] == 74 and m["cohort"]["subjects"] == len(
        set(pd.read_parquet(prepared_demo / store.COHORT)["subject_id"])
    )
    assert sum(f["stays"] for f in m["cohort"]["folds"].values()) == 74
    assert m["features"] == load_features().names
    assert set(m["feature_stats"]) == set(m["features"])
    assert set(m["timings_s"]) == {"tables", "cohort", "folds", "phenotypes", "timeseries", "write", "total"}
    assert m["peak_rss_mib"] > 10
    assert m["cxr"] is None and m["warnings"] == []
    srcs = m["sources"]["mimic_iv"]
    assert set(srcs) == {n for names in TABLES.values() for n in names}
    for module, names in TABLES.items():
        for name in names:
            path = demo_root / module / f"{name}.csv.gz"
            rec = srcs[name]
            assert rec["path"] == str(path.absolute()) and rec["format"] == ".csv.gz"
            assert rec["bytes"] == path.stat().st_size
            assert path.stat().st_size <= HASH_MAX_BYTES
            assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_folds_on_demo_are_patient_disjoint_and_balanced(prepared_demo):
    c = pd.read_parquet(prepared_demo / store.COHORT)
    assert (c.groupby("subject_id")["fold"].nunique() == 1).all()
    per_subject = c.groupby("subject_id").agg(fold=("fold", "first"), died=("label_mortality", "max"))
    assert set(per_subject["fold"]) == {1, 2, 3, 4, 5}
    sizes = per_subject["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    dying = (
        per_subject.loc[per_subject["died"] == 1, "fold"].value_counts().reindex(range(1, 6), fill_value=0)
    )
    assert dying.max() - dying.min() <= 1


def test_heart_rate_grid_matches_pandas(prepared_demo, demo_root):
    """The hourly heart-rate grid (mean of in-range values per hour of [intime, intime + 48 h)) recomputed from
    chartevents with pandas: same observed cells, same values."""
    ds = store.open_dataset(prepared_demo)
    hr = next(f for f in load_features().features if f.name == "heart_rate")
    ce = pd.read_csv(
        demo_root / "icu" / "chartevents.csv.gz",
        usecols=["stay_id", "itemid", "charttime", "valuenum"],
        parse_dates=["charttime"],
    )
    lo, hi = hr.valid_range
    ce = ce[ce["itemid"].isin(hr.itemids["chartevents"]) & ce["valuenum"].between(lo, hi)]
    c = ds.cohort[["stay_id", "intime"]].reset_index().rename(columns={"index": "row"})
    ev = ce.merge(c, on="stay_id")
    ev["hour"] = np.floor((ev["charttime"] - ev["intime"]) / pd.Timedelta(hours=1)).astype(int)
    ev = ev[(ev["hour"] >= 0) & (ev["hour"] < 48)]
    means = ev.groupby(["row", "hour"])["valuenum"].mean()
    expected = np.full((len(c), 48), np.nan, dtype=np.float32)
    expected[means.index.get_level_values(0), means.index.get_level_values(1)] = means.to_numpy()
    got = np.asarray(ds.ehr[:, :, ds.features.index("heart_rate")])
    assert int((~np.isnan(got)).sum()) == len(means) > 3000
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)


# ---------------------------------------------------------------- reproducibility, seed, overwrite (CLI)


def test_rerun_is_byte_identical_and_seed_changes_only_folds(prepared_demo, demo_root, tmp_path):
    out = tmp_path / "again"
    prepare(demo_root, out, threads=1, memory_limit="1GB", seed=0, console=QUIET)
    for name in (store.COHORT, store.EHR):
        assert _bytes(out / name) == _bytes(prepared_demo / name), name
    # the fingerprint of runs is the content: another build of the same data (other path, time, threads) keeps it
    content = json.loads((out / store.MANIFEST).read_text())["content_sha256"]
    assert content == {n: hashlib.sha256(_bytes(out / n)).hexdigest() for n in (store.COHORT, store.EHR)}
    assert (
        json.loads((out / store.MANIFEST).read_text())["declarations_sha256"]
        == json.loads((prepared_demo / store.MANIFEST).read_text())["declarations_sha256"]
    )
    assert dataset_fingerprint(out) == dataset_fingerprint(prepared_demo)
    first = dataset_fingerprint(out)

    # the CLI: a different seed over the existing dataset with --overwrite
    res = CliRunner().invoke(
        app,
        [
            "prepare",
            "--mimic-iv",
            str(demo_root),
            "--out",
            str(out),
            "--seed",
            "1",
            "--threads",
            "2",
            "--memory-limit",
            "2GB",
            "--overwrite",
        ],
    )
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == str(out.absolute())
    assert "Building the cohort: 74 stays" in res.stderr
    a = pd.read_parquet(prepared_demo / store.COHORT)
    b = pd.read_parquet(out / store.COHORT)
    assert (a["fold"] != b["fold"]).any()
    assert (b.groupby("subject_id")["fold"].nunique() == 1).all()
    pd.testing.assert_frame_equal(a.drop(columns="fold"), b.drop(columns="fold"))
    assert _bytes(out / store.EHR) == _bytes(prepared_demo / store.EHR)
    m = json.loads((out / store.MANIFEST).read_text())
    assert m["producer"]["options"]["seed"] == 1 and m["producer"]["options"]["overwrite"] is True
    assert dataset_fingerprint(out) != first  # other folds: other data
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temp or old dirs left beside it


# ---------------------------------------------------------------- formats


def _convert_demo(demo_root: Path, dest: Path, fmt: str) -> None:
    """The 7 tables as plain csv (decompressed bytes) or parquet (DuckDB's own csv reading, typed columns)."""
    con = duckdb.connect()
    con.execute("SET threads = 2")
    for module, names in TABLES.items():
        (dest / module).mkdir(parents=True)
        for name in names:
            src = demo_root / module / f"{name}.csv.gz"
            if fmt == "csv":
                with gzip.open(src, "rb") as fi, open(dest / module / f"{name}.csv", "wb") as fo:
                    shutil.copyfileobj(fi, fo)
            else:
                con.execute(
                    f"COPY (SELECT * FROM read_csv('{src}', header=true)) "
                    f"TO '{dest / module / (name + '.parquet')}' (FORMAT parquet)"
                )


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_formats_give_identical_datasets(prepared_demo, demo_root, tmp_path, fmt):
    raw = tmp_path / "raw"
    _convert_demo(demo_root, raw, fmt)
    out = prepare(raw, tmp_path / "out", console=QUIET)
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / store.COHORT), pd.read_parquet(prepared_demo / store.COHORT)
    )
    assert _bytes(out / store.EHR) == _bytes(prepared_demo / store.EHR)
    assert _bytes(out / store.COHORT) == _bytes(prepared_demo / store.COHORT)
    m = json.loads((out / store.MANIFEST).read_text())
    assert {r["format"] for r in m["sources"]["mimic_iv"].values()} == {f".{fmt}"}


# ---------------------------------------------------------------- with X-rays


def _cxr_fixture(root: Path, cxr_open: Path, cohort: pd.DataFrame) -> dict[str, int]:
    """A MIMIC-CXR-JPG-shaped root whose images are real open radiographs linked to three demo stays:
    one AP image 10 h after admission (linked), one PA image 50 h after (after the 48 h prediction time: not
    linked) and one AP image 2 h before admission (outside the default window: not linked)."""
    files = sorted((cxr_open / "hannover").glob("*.jpg"))[:3]
    picks = cohort.drop_duplicates("subject_id").iloc[:3]
    rows = []
    for k, ((_, stay), f, offset, view) in enumerate(
        zip(picks.iterrows(), files, [10, 50, -2], ["AP", "PA", "AP"], strict=True)
    ):
        t = stay["intime"] + pd.Timedelta(hours=offset)
        subject, study, dicom = int(stay["subject_id"]), 50_000_000 + k, f"dicom{k}"
        d = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
        d.mkdir(parents=True)
        os.symlink(f, d / f"{dicom}.jpg")
        rows.append(
            {
                "dicom_id": dicom,
                "subject_id": subject,
                "study_id": study,
                "ViewPosition": view,
                "StudyDate": int(t.strftime("%Y%m%d")),
                "StudyTime": float(t.strftime("%H%M%S")),
            }
        )
    pd.DataFrame(rows).to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    return {"linked_stay": int(picks.iloc[0]["stay_id"])}


def test_prepare_with_cxr(prepared_demo, demo_root, cxr_open_root, tmp_path):
    base = store.open_dataset(prepared_demo).cohort
    info = _cxr_fixture(tmp_path / "cxr", cxr_open_root, base)
    res = CliRunner().invoke(
        app,
        [
            "prepare",
            "--mimic-iv",
            str(demo_root),
            "--mimic-cxr",
            str(tmp_path / "cxr"),
            "--out",
            str(tmp_path / "out"),
            "--image-size",
            "64",
        ],
    )
    assert res.exit_code == 0, res.stderr
    ds = store.open_dataset(tmp_path / "out")
    c = ds.cohort
    assert c.loc[c["has_cxr"], "stay_id"].tolist() == [info["linked_stay"]]
    assert ds.cxr is not None and ds.cxr.shape == (1, 64, 64) and ds.cxr.dtype == np.uint8
    assert ds.cxr[0].std() > 0  # a real image, not a blank
    row = c[c["has_cxr"]].iloc[0]
    assert row["cxr_index"] == 0 and row["cxr_view"] == "AP" and row["cxr_hours"] == 10.0
    assert row["cxr_dicom_id"] == "dicom0"
    # same schema as without X-rays; everything but the X-ray columns identical
    assert pq.read_schema(tmp_path / "out" / store.COHORT) == pq.read_schema(prepared_demo / store.COHORT)
    xcols = ["has_cxr", "cxr_dicom_id", "cxr_time", "cxr_hours", "cxr_view", "cxr_index"]
    pd.testing.assert_frame_equal(c.drop(columns=xcols), base.drop(columns=xcols))
    m = ds.manifest
    assert m["cxr"]["stays_with_image"] == 1 and m["producer"]["options"]["image_size"] == 64
    assert m["images"] == {"file": store.CXR, "count": 1, "size": 64}
    meta = tmp_path / "cxr" / "mimic-cxr-2.0.0-metadata.csv.gz"
    assert m["sources"]["mimic_cxr"]["metadata"]["sha256"] == hashlib.sha256(meta.read_bytes()).hexdigest()
    assert "timeseries" in m["timings_s"] and "cxr" in m["timings_s"]
    # describe reports the linked image
    items = dict(zip(*[summarize(ds).cxr[c] for c in ("item", "value")], strict=True))
    assert items["stays with an X-ray"] == "1 / 74 (1.4%)"
    assert items["images in cache"] == "1" and items["image size"] == "64 x 64"
