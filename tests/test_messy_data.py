"""Real-world variants of the MIMIC-IV demo give the right result, and every row the ETL drops is accounted for.

Variants are built in tmp from the demo (copied, renamed or re-encoded there, never in the repository):
- the MIMIC-IV v1.0 layout (patients and admissions under core/, race named `ethnicity`) and CSVs re-saved with a
  UTF-8 byte-order mark and CRLF line ends (as a spreadsheet writes them) give the pristine demo's dataset byte for
  byte (the manifest's content digests), with the release and layout recorded;
- stays whose out-time precedes their in-time are dropped and counted by reason in the manifest and `describe`;
- an empty feature group is accepted only with --allow-empty-features, loudly;
- the release's item dictionaries are checked against the features' itemids.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from carebench.cli import app
from carebench.data import store
from carebench.data.describe import summarize
from carebench.data.mimic.pipeline import prepare
from carebench.data.mimic.tables import describe_release, locate

TABLES = {
    "hosp": ["patients", "admissions", "labevents", "diagnoses_icd"],
    "icu": ["icustays", "chartevents", "outputevents"],
}


def _link_all(demo: Path, root: Path) -> None:
    for module, names in TABLES.items():
        (root / module).mkdir(parents=True, exist_ok=True)
        for t in names:
            os.symlink(demo / module / f"{t}.csv.gz", root / module / f"{t}.csv.gz")


def _read(demo: Path, module: str, table: str) -> pd.DataFrame:
    return pd.read_csv(demo / module / f"{table}.csv.gz", dtype=str, keep_default_na=False)


def _prepare(raw: Path, out: Path, **kw) -> dict:
    prepare(raw, out, threads=2, memory_limit="2GB", seed=0, console=Console(quiet=True), **kw)
    return json.loads((out / store.MANIFEST).read_text())


def _digests(root: Path) -> dict:
    return json.loads((root / store.MANIFEST).read_text())["content_sha256"]


def test_v1_core_layout_with_ethnicity_gives_the_demo_dataset(demo_root, prepared_demo, tmp_path):
    raw = tmp_path / "mimic-iv-1.0"
    _link_all(demo_root, raw)
    (raw / "core").mkdir()
    for t in ("patients", "admissions"):
        (raw / "hosp" / f"{t}.csv.gz").unlink()
    os.symlink(demo_root / "hosp" / "patients.csv.gz", raw / "core" / "patients.csv.gz")
    adm = _read(demo_root, "hosp", "admissions").rename(columns={"race": "ethnicity"})
    adm.to_csv(raw / "core" / "admissions.csv.gz", index=False)

    manifest = _prepare(raw, tmp_path / "out")
    assert _digests(tmp_path / "out") == _digests(prepared_demo)  # cohort.parquet and ehr.npy, byte for byte
    rel = manifest["release"]
    assert rel["release"] == "1.0" and rel["layout"] == "v1.0 (core/, hosp/, icu/)"
    assert rel["race_column"] == "ethnicity" and rel["legacy_tables"] == ["core/admissions", "core/patients"]
    assert rel["notes"] == []
    assert manifest["sources"]["mimic_iv"]["patients"]["table"] == "core/patients"
    cohort = pd.read_parquet(tmp_path / "out" / store.COHORT)
    assert cohort["race"].notna().all() and (cohort["race_group"] != "").all()


def test_bom_and_crlf_csvs_give_the_demo_dataset(demo_root, prepared_demo, tmp_path):
    """Spreadsheet-style CSVs: a UTF-8 byte-order mark before the header, CRLF line ends, plain and gzipped."""
    raw = tmp_path / "mimic-iv"
    _link_all(demo_root, raw)
    for module, t, ext in [
        ("hosp", "patients", ".csv"),
        ("hosp", "admissions", ".csv"),
        ("icu", "icustays", ".csv"),
        ("hosp", "diagnoses_icd", ".csv.gz"),
        ("icu", "outputevents", ".csv.gz"),
    ]:
        text = _read(demo_root, module, t).to_csv(index=False, lineterminator="\r\n")
        data = b"\xef\xbb\xbf" + text.encode("utf-8")
        (raw / module / f"{t}.csv.gz").unlink()
        path = raw / module / f"{t}{ext}"
        path.write_bytes(gzip.compress(data) if ext == ".csv.gz" else data)
    assert (raw / "hosp" / "patients.csv").read_bytes()[:3] == b"\xef\xbb\xbf"

    manifest = _prepare(raw, tmp_path / "out")
    assert _digests(tmp_path / "out") == _digests(prepared_demo)
    assert manifest["sources"]["mimic_iv"]["patients"]["format"] == ".csv"


def test_inverted_stay_times_are_dropped_and_counted_by_reason(demo_root, tmp_path):
    raw = tmp_path / "mimic-iv"
    _link_all(demo_root, raw)
    stays = _read(demo_root, "icu", "icustays")
    los = pd.to_datetime(stays["outtime"]) - pd.to_datetime(stays["intime"])
    long_ids = stays.loc[los >= pd.Timedelta(hours=48), "stay_id"].tolist()[:3]
    inverted = stays["stay_id"].isin(long_ids)
    stays.loc[inverted, ["intime", "outtime"]] = stays.loc[inverted, ["outtime", "intime"]].to_numpy()
    no_out = stays["stay_id"] == stays.loc[los >= pd.Timedelta(hours=48), "stay_id"].tolist()[3]
    stays.loc[no_out, "outtime"] = ""  # and one cohort stay without an out-time
    (raw / "icu" / "icustays.csv.gz").unlink()
    stays.to_csv(raw / "icu" / "icustays.csv.gz", index=False)

    manifest = _prepare(raw, tmp_path / "out")
    issues = {(i["stage"], i["reason"].split(":")[0]): i for i in manifest["data_issues"]}
    assert issues[("cohort", "outtime_before_intime")]["count"] == 3
    assert issues[("cohort", "outtime_before_intime")]["action"] == "stay dropped (malformed)"
    assert issues[("cohort", "no_outtime")]["count"] == 1
    assert issues[("cohort", "short_stay")]["count"] == 66  # the demo's short stays, as before
    steps = {s["step"]: s["stays"] for s in manifest["cohort_steps"]}
    assert steps["los_ge_48h"] == 74 - 4
    # the reasons of each step add up to the stays it removes
    per_step: dict[str, int] = {}
    for i in manifest["data_issues"]:
        if i["stage"] == "cohort":
            step = next(s for s in steps if i["reason"].split(":")[0] in _reasons_of(s))
            per_step[step] = per_step.get(step, 0) + i["count"]
    names = list(steps)
    assert all(per_step.get(b, 0) == steps[a] - steps[b] for a, b in itertools.pairwise(names))
    cohort = pd.read_parquet(tmp_path / "out" / store.COHORT)
    assert not set(long_ids) & set(cohort["stay_id"]) and len(cohort) == 70

    s = summarize(store.open_dataset(tmp_path / "out"))
    row = s.issues.set_index(s.issues["reason"].str.split(":").str[0]).loc["outtime_before_intime"]
    assert (row["table"], row["count"], row["unit"]) == ("icu/icustays", 3, "stays")
    res = CliRunner().invoke(app, ["describe", str(tmp_path / "out")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if "outtime_before_intime" in ln)
    assert "stay dropped (malformed)" in line and " 3 " in line


def _reasons_of(step: str) -> set[str]:
    from carebench.data.mimic.cohort import EXCLUSIONS

    short = {"linked": "linked", "age_ge_18": "age", "los_ge_48h": "los"}.get(step)
    return {reason for s, reason, *_ in EXCLUSIONS if s == short}


def test_event_rows_dropped_or_converted_are_counted(prepared_demo):
    """On the demo: out-of-range values per source add up to the per-feature counts, and every Fahrenheit
    temperature in the window is counted as converted."""
    m = json.loads((prepared_demo / store.MANIFEST).read_text())
    chart = [f for f, v in m["feature_stats"].items()]
    out_of_range = sum(v["dropped_out_of_range"] for v in m["feature_stats"].values())
    assert sum(s["out_of_range"] for s in m["source_stats"].values()) == out_of_range == 24
    issues = {(i["table"], i["reason"]): i["count"] for i in m["data_issues"]}
    assert issues[("icu/chartevents", "value outside the feature's valid_range")] == 24
    assert issues[("hosp/labevents", "no numeric value (value column empty)")] == 14
    assert issues[("icu/chartevents", "temperature: fahrenheit_to_celsius")] == 1009
    assert issues[("hosp/diagnoses_icd", "ICD code unknown to the code mapping")] == 1
    assert len(chart) == 39


def test_empty_feature_group_needs_the_option_and_is_loud(demo_root, tmp_path):
    raw = tmp_path / "mimic-iv"
    _link_all(demo_root, raw)
    (raw / "icu" / "outputevents.csv.gz").unlink()
    _read(demo_root, "icu", "outputevents").iloc[:0].to_csv(raw / "icu" / "outputevents.csv.gz", index=False)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prepare", "--mimic-iv", str(raw), "--out", str(out)])
    assert res.exit_code == 2 and "'urine output' is empty" in res.stderr and not out.exists()
    res = CliRunner().invoke(
        app, ["prepare", "--mimic-iv", str(raw), "--out", str(out), "--allow-empty-features"]
    )
    assert res.exit_code == 0, res.stderr
    warning = next(ln for ln in res.stderr.splitlines() if ln.startswith("warning: EMPTY FEATURE GROUP"))
    assert "icu/outputevents" in warning and "urine_output" in warning
    m = json.loads((out / store.MANIFEST).read_text())
    assert any("EMPTY FEATURE GROUP: icu/outputevents" in w for w in m["warnings"])
    assert m["producer"]["options"]["allow_empty_features"] is True
    ds = store.open_dataset(out)
    assert np.isnan(ds.ehr[:, :, ds.features.index("urine_output")]).all()
    assert not np.isnan(ds.ehr[:, :, ds.features.index("heart_rate")]).all()
    described = CliRunner().invoke(app, ["describe", str(out)])
    assert "warning: EMPTY FEATURE GROUP" in described.stdout


def test_itemids_missing_from_the_release_dictionary_are_named(demo_root, tmp_path):
    raw = tmp_path / "mimic-iv"
    _link_all(demo_root, raw)
    items = _read(demo_root, "icu", "d_items")
    items[items["itemid"] != "220045"].to_csv(raw / "icu" / "d_items.csv.gz", index=False)
    os.symlink(demo_root / "hosp" / "d_labitems.csv.gz", raw / "hosp" / "d_labitems.csv.gz")
    m = _prepare(raw, tmp_path / "out")
    check = m["release"]["item_check"]
    assert check["missing"] == {"heart_rate": {"chartevents": [220045]}}
    assert check["dictionaries"] == {
        "chartevents": "icu/d_items.csv.gz",
        "labevents": "hosp/d_labitems.csv.gz",
        "outputevents": "icu/d_items.csv.gz",
    }
    assert [w for w in m["warnings"] if w.startswith("feature ")] == [
        "feature heart_rate: none of its itemids {'chartevents': [220045]} is in this release's item dictionary "
        "(hosp/d_labitems.csv.gz, icu/d_items.csv.gz); renumbered or dropped by the release?"
    ]


def test_itemids_partly_missing_are_recorded_without_a_warning(demo_root, tmp_path):
    raw = tmp_path / "mimic-iv"
    _link_all(demo_root, raw)
    items = _read(demo_root, "icu", "d_items")
    items[items["itemid"] != "220050"].to_csv(raw / "icu" / "d_items.csv.gz", index=False)  # sbp keeps 220179
    m = _prepare(raw, tmp_path / "out")
    assert m["release"]["item_check"]["missing"] == {"sbp": {"chartevents": [220050]}}
    assert m["warnings"] == []


@pytest.mark.parametrize(
    "folder,legacy,release,notes",
    [
        ("mimic-iv-demo-2.2", False, "2.2", 0),
        ("3.1", False, "3.1", 0),
        ("mimiciv-v1.0", True, "1.0", 0),
        ("mimic-iv", True, "1.x", 0),
        ("mimic-iv", False, "2.0 or later", 0),
        ("2.2", True, "2.2", 1),  # a folder named 2.2 holding the v1.0 layout: said in the notes
    ],
)
def test_release_from_folder_and_layout(demo_root, tmp_path, folder, legacy, release, notes):
    raw = tmp_path / folder
    _link_all(demo_root, raw)
    if legacy:
        (raw / "core").mkdir()
        os.replace(raw / "hosp" / "patients.csv.gz", raw / "core" / "patients.csv.gz")
    rel = describe_release(raw, locate(raw, ["patients", "admissions"]))
    assert rel["release"] == release and len(rel["notes"]) == notes
    assert rel["layout"].startswith("v1.0") == legacy
