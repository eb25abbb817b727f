"""`carebench synth` raw output, checked directly (no `prepare`): file layout and headers against the real
MIMIC-IV demo, value formats, cohort-rule edge cases, X-ray study layout, codes -> labels, determinism."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from carebench.cli import app
from carebench.data.definitions import load_features, load_phenotypes
from carebench.data.mimic.phenotypes import ccs_mapping
from carebench.data.mimic.tables import register_tables
from carebench.data.synthetic.simulator import SynthError, synthesize

STAYS, SEED, SIZE = 400, 3, 32


@pytest.fixture(scope="session")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "raw"
    synthesize(out, stays=STAYS, seed=SEED, image_size=SIZE, workers=1, chunk_stays=150)
    return out


def _read(raw: Path, name: str, **kw) -> pd.DataFrame:
    return pd.read_csv(raw / name, keep_default_na=True, **kw)


def _header(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        return fh.readline().rstrip("\n").split(",")


MIMIC_FILES = [
    "hosp/patients",
    "hosp/admissions",
    "hosp/diagnoses_icd",
    "hosp/labevents",
    "hosp/d_labitems",
    "icu/icustays",
    "icu/chartevents",
    "icu/outputevents",
    "icu/d_items",
]


@pytest.mark.parametrize("name", MIMIC_FILES)
def test_headers_match_the_real_mimic_iv_demo(raw: Path, demo_root: Path, name: str) -> None:
    assert _header(raw / "mimic-iv" / f"{name}.csv.gz") == _header(demo_root / f"{name}.csv.gz")


def test_timestamps_and_values_use_mimic_formats(raw: Path, demo_root: Path) -> None:
    ce = _read(raw, "mimic-iv/icu/chartevents.csv.gz", dtype=str, nrows=5000)
    assert ce["charttime"].str.fullmatch(r"2\d{3}-\d\d-\d\d \d\d:\d\d:00").all()
    stays = _read(raw, "mimic-iv/icu/icustays.csv.gz", dtype=str)
    assert stays["intime"].str.fullmatch(r"2\d{3}-\d\d-\d\d \d\d:\d\d:\d\d").all()
    assert stays["intime"].str[:4].astype(int).between(2110, 2210).all()  # shifted future years, as in MIMIC
    pats = _read(raw, "mimic-iv/hosp/patients.csv.gz", dtype=str)
    assert pats["dod"].dropna().str.fullmatch(r"\d{4}-\d\d-\d\d").all()
    assert pats["subject_id"].str.fullmatch(r"1\d{7}").all()
    assert stays["stay_id"].str.fullmatch(r"3\d{7}").all() and stays["hadm_id"].str.fullmatch(r"2\d{7}").all()
    # numbers as text beside valuenum, as in the demo
    num = ce[ce["itemid"] == "220045"]
    assert (num["value"].astype(float) == num["valuenum"].astype(float)).all()


def test_register_tables_reads_every_table_with_canonical_types(raw: Path) -> None:
    con = duckdb.connect()
    register_tables(con, raw / "mimic-iv")
    n_stays = con.execute("SELECT count(*), count(DISTINCT stay_id) FROM icustays").fetchone()
    assert n_stays == (STAYS, STAYS)
    types = dict(
        con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'chartevents'"
        ).fetchall()
    )
    assert types["charttime"] == "TIMESTAMP" and types["valuenum"] == "DOUBLE"
    # every event belongs to a known stay / admission
    orphans = con.execute(
        "SELECT count(*) FROM chartevents c LEFT JOIN icustays i USING (stay_id) WHERE i.stay_id IS NULL"
    ).fetchone()[0]
    assert orphans == 0
    lab_orphans = con.execute(
        "SELECT count(*) FROM labevents l LEFT JOIN admissions a USING (hadm_id) WHERE a.hadm_id IS NULL"
    ).fetchone()[0]
    assert lab_orphans == 0


def test_cohort_edge_cases_are_present_and_counted_in_planted(raw: Path) -> None:
    pats = _read(raw, "mimic-iv/hosp/patients.csv.gz")
    stays = _read(raw, "mimic-iv/icu/icustays.csv.gz", parse_dates=["intime", "outtime"])
    df = stays.merge(pats, on="subject_id")
    age = df["anchor_age"] + df["intime"].dt.year - df["anchor_year"]
    hours = (df["outtime"] - df["intime"]).dt.total_seconds() / 3600
    realized = json.loads((raw / "planted.json").read_text())["realized"]
    assert realized["minor_stays"] == int((age < 18).sum()) > 0
    assert realized["short_stays"] == int((hours < 48).sum()) > 0
    assert realized["cohort_stays"] == int(((age >= 18) & (hours >= 48)).sum())
    # some minors at anchor become adults by the year of their ICU stay (the rule uses year(intime))
    assert ((df["anchor_age"] < 18) & (age >= 18)).any() or (df["anchor_age"] < 18).sum() < 5
    # several stays per subject and several admissions per subject exist
    assert stays["subject_id"].duplicated().any()
    assert stays.groupby("hadm_id").size().max() >= 2


def test_in_icu_deaths_lie_inside_the_stay_and_no_one_returns_after_death(raw: Path) -> None:
    adm = _read(raw, "mimic-iv/hosp/admissions.csv.gz", parse_dates=["admittime", "dischtime", "deathtime"])
    stays = _read(raw, "mimic-iv/icu/icustays.csv.gz", parse_dates=["intime", "outtime"])
    truth = _read(raw, "planted_stays.csv.gz")
    df = stays.merge(adm[["hadm_id", "deathtime", "admittime", "dischtime"]], on="hadm_id").merge(
        truth[["stay_id", "died_in_icu"]], on="stay_id"
    )
    in_icu = (df["deathtime"] >= df["intime"]) & (df["deathtime"] <= df["outtime"])
    assert (in_icu.astype(int) == df["died_in_icu"]).all()
    assert (df["intime"] > df["admittime"]).all() and (df["outtime"] <= df["dischtime"]).all()
    last_admit = adm.groupby("subject_id")["admittime"].max()
    dead = adm.dropna(subset=["deathtime"])
    assert (dead["admittime"].to_numpy() == last_admit.loc[dead["subject_id"]].to_numpy()).all()


def test_events_use_features_yaml_itemids_with_the_planted_quirks(raw: Path) -> None:
    features = load_features()
    ce = _read(raw, "mimic-iv/icu/chartevents.csv.gz", usecols=["itemid", "valuenum"])
    le = _read(raw, "mimic-iv/hosp/labevents.csv.gz", usecols=["itemid", "valuenum", "value"])
    oe = _read(raw, "mimic-iv/icu/outputevents.csv.gz", usecols=["itemid", "value"])
    emitted = {
        "chartevents": set(ce["itemid"]),
        "labevents": set(le["itemid"]),
        "outputevents": set(oe["itemid"]),
    }
    for f in features.features:  # every feature is emitted through at least one of its itemids
        assert any(set(ids) & emitted[t] for t, ids in f.itemids.items()), f.name
    temp = ce[ce["itemid"].isin([223761, 223762])]
    f_share = (temp["itemid"] == 223761).mean()
    assert 0.5 < f_share < 0.9  # temperature mostly in Fahrenheit
    assert ((temp["itemid"] == 223762) & (temp["valuenum"] > 45)).sum() > 0  # F typed into the C field
    fio2 = ce.loc[ce["itemid"] == 223835, "valuenum"]
    assert ((fio2 <= 1).mean() > 0.03) and ((fio2 >= 21).mean() > 0.8)  # some FiO2 as a fraction
    assert (ce.loc[ce["itemid"] == 220045, "valuenum"] == 0).sum() > 0  # heart rate 0: out of range
    assert (le["value"] == "___").sum() > 0  # de-identified glucose text
    assert {220046, 226707} <= emitted["chartevents"] and 227489 in emitted["outputevents"]  # non-features


def test_diagnosis_codes_encode_exactly_the_planted_labels(raw: Path) -> None:
    """Independent of prepare: map the written codes with the CCS table and compare to the truth."""
    dx = _read(raw, "mimic-iv/hosp/diagnoses_icd.csv.gz", dtype={"icd_code": str})
    assert set(dx["icd_version"]) == {9, 10}
    table = ccs_mapping()
    mapped = dx.merge(table, on=["icd_version", "icd_code"], how="inner")
    truth = _read(raw, "planted_stays.csv.gz").drop_duplicates("hadm_id").set_index("hadm_id")
    for p in load_phenotypes():
        coded = set(mapped.loc[mapped["ccs"] == p.ccs, "hadm_id"])
        planted = set(truth.index[truth[p.column] == 1])
        assert coded == planted, p.column
    assert not dx.duplicated(["hadm_id", "icd_code"]).any()
    seq = dx.groupby("hadm_id")["seq_num"].agg(["min", "max", "size"])
    assert (seq["min"] == 1).all() and (seq["max"] == seq["size"]).all()


def test_xray_files_views_and_study_times(raw: Path) -> None:
    meta = _read(raw, "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz", dtype={"dicom_id": str})
    assert set(meta["ViewPosition"]) == {"AP", "PA", "LATERAL"}
    assert (
        meta["dicom_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all() and meta["dicom_id"].is_unique
    )
    for r in meta.sample(20, random_state=0).itertuples():
        s = str(r.subject_id)
        path = (
            raw / "mimic-cxr-jpg" / "files" / f"p{s[:2]}" / f"p{s}" / f"s{r.study_id}" / f"{r.dicom_id}.jpg"
        )
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (SIZE, SIZE) and im.mode == "L"
    n_files = sum(1 for _ in (raw / "mimic-cxr-jpg" / "files").rglob("*.jpg"))
    assert n_files == len(meta)
    # study time relative to the subject's ICU stays: before, inside and after the 48 h window, and at 48 h
    t = pd.to_datetime(meta["StudyDate"].astype(str), format="%Y%m%d") + pd.to_timedelta(
        meta["StudyTime"].map(lambda x: f"{int(x) // 10000:02d}:{int(x) // 100 % 100:02d}:{int(x) % 100:02d}")
    )
    meta = meta.assign(t=t)
    stays = _read(raw, "mimic-iv/icu/icustays.csv.gz", parse_dates=["intime"])
    j = meta.merge(stays[["subject_id", "stay_id", "intime"]], on="subject_id")
    hours = (j["t"] - j["intime"]).dt.total_seconds() / 3600
    assert (hours.between(-24, 0, inclusive="left")).any()
    assert (hours.between(0, 48, inclusive="left")).any()
    assert (hours == 48).any() and (hours > 48).any()
    # stays with a frontal study inside the window are exactly the planted ones
    truth = _read(raw, "planted_stays.csv.gz").set_index("stay_id")
    frontal = j[hours.between(0, 48, inclusive="left") & j["ViewPosition"].isin(["AP", "PA"])]
    assert set(frontal["stay_id"]) == set(truth.index[truth["cxr_in_window"] == 1])
    lateral_only = j[hours.between(0, 48, inclusive="left")].groupby("stay_id")["ViewPosition"].agg(set)
    assert (lateral_only == {"LATERAL"}).any()


def test_planted_json_describes_the_truth(raw: Path) -> None:
    planted = json.loads((raw / "planted.json").read_text())
    kinds = planted["phenotypes"]
    assert list(kinds) == [p.column for p in load_phenotypes()]
    counts = pd.Series(kinds).value_counts()
    assert counts["ehr"] >= 4 and counts["cxr"] >= 4 and counts["both"] >= 4 and counts["none"] >= 1
    assert planted["subgroup"]["attribute"] == "race_group" and planted["subgroup"]["ehr_effect_scale"] < 1
    assert planted["missingness"]["slope"] > 0 and planted["seed"] == SEED
    assert planted["parameters"] == {
        "stays": STAYS,
        "seed": SEED,
        "image_size": SIZE,
        "cxr_rate": 0.3,
        "chunk_stays": 150,
    }


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_whatever_the_workers(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", stays=120, seed=5, image_size=32, workers=1, chunk_stays=50).path
    b = synthesize(tmp_path / "b", stays=120, seed=5, image_size=32, workers=2, chunk_stays=50).path
    c = synthesize(tmp_path / "c", stays=120, seed=6, image_size=32, workers=1, chunk_stays=50).path
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert len(da) > 10 and da == db
    assert da["mimic-iv/icu/chartevents.csv.gz"] != dc["mimic-iv/icu/chartevents.csv.gz"]


def test_bad_options_and_existing_output(tmp_path: Path) -> None:
    with pytest.raises(SynthError, match="--stays"):
        synthesize(tmp_path / "x", stays=0, seed=0)
    with pytest.raises(SynthError, match="--image-size"):
        synthesize(tmp_path / "x", stays=10, seed=0, image_size=8)
    with pytest.raises(SynthError, match="--cxr-rate"):
        synthesize(tmp_path / "x", stays=10, seed=0, cxr_rate=1.5)
    assert not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "taken"), "--stays", "5", "--seed", "0"])
    assert res.exit_code == 2 and "already exists" in res.output
    assert list(tmp_path.iterdir()) == [tmp_path / "taken"]  # no temporary directory left behind


def test_cli_writes_the_tree(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "synth",
            "--out",
            str(tmp_path / "r"),
            "--stays",
            "30",
            "--seed",
            "1",
            "--image-size",
            "32",
            "--workers",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "mimic-iv" / "icu" / "chartevents.csv.gz").is_file()
    assert json.loads((tmp_path / "r" / "planted.json").read_text())["parameters"]["stays"] == 30
    stays = pd.read_csv(tmp_path / "r" / "mimic-iv" / "icu" / "icustays.csv.gz")
    assert len(stays) == 30 and np.isfinite(stays["los"]).all()
