"""The MIMIC-IV demo through the MEDS ecosystem's own ETL and ACES, then `prepare --meds`, against `prepare
--mimic-iv` on the same demo (benchmarks/meds_crosscheck.py; the figures are those of docs/dataset.md, "MEDS").

Slow: it creates the ETL's virtual environment on first use (.venv-meds-etl beside the checkout's src, from
benchmarks/meds/requirements-etl.txt; PyPI), runs the ETL (about 20 s) and four `prepare`s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crosscheck(demo_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("crosscheck") / "run"
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "meds_crosscheck.py"),
            "--demo",
            str(demo_root),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "crosscheck.json").read_text())


@pytest.mark.slow
def test_the_community_etl_and_aces_ran(crosscheck):
    etl = crosscheck["etl"]
    assert etl["versions"]["MIMIC-IV-MEDS"] == "0.2.0" and etl["versions"]["es-aces"] == "0.7.3"
    assert (
        etl["meds_dataset"]["dataset_name"] == "MIMIC-IV"
        and etl["meds_dataset"]["dataset_version"] == "2.2:0.2.0"
    )
    assert etl["concept_maps"] == "header-only stand-ins" and etl["events"] == 1_022_970
    assert crosscheck["labels"] == {"rows": 74, "positive": 9}


@pytest.mark.slow
def test_same_stays_labels_and_demographics(crosscheck):
    r = crosscheck["as_is"]
    assert (r["stays_mimic"], r["rows_meds"], r["matched"], r["only_mimic"], r["only_meds"]) == (
        74,
        74,
        74,
        0,
        0,
    )
    assert (r["labels_agree"], r["deaths_mimic"], r["deaths_meds"]) == (74, 9, 9)
    assert (r["gender_agree"], r["age_agree"]) == (74, 73)
    # the one age difference: a stay whose 48 h cross New Year (MIMIC counts the year of ICU admission)
    assert r["age_mismatches"] == [{"subject_id": 10010867, "intime": "2147-12-30 09:33:00", "age_mimic": 28,
                                    "age_meds": 29}]  # fmt: skip


@pytest.mark.slow
def test_hourly_values_as_is(crosscheck):
    r = crosscheck["as_is"]
    assert r["total"]["observed_agree"] == 30_017 and r["total"]["observed_either"] == 40_648
    f = r["features"]
    for name in ("temperature", "gcs_eye", "gcs_verbal", "gcs_motor", "fio2", "weight"):
        assert f[name]["agree_observed"] == f[name]["observed_either"], name  # charted, never on a boundary
    assert f["creatinine"]["observed_both"] == 10  # lab results: charttime (MIMIC) vs storetime (ETL)


@pytest.mark.slow
def test_differences_are_the_documented_ones(crosscheck):
    window, labs, both = (
        crosscheck["window_aligned"],
        crosscheck["lab_time_aligned"],
        crosscheck["both_aligned"],
    )
    assert (window["total"]["observed_agree"], window["total"]["observed_either"]) == (30_034, 40_657)
    assert (labs["total"]["observed_agree"], labs["total"]["observed_either"]) == (35_570, 35_695)
    assert (both["total"]["observed_agree"], both["total"]["observed_either"]) == (35_646, 35_646)
    assert both["total"]["agree"] == both["total"]["cells"] == 74 * 48 * 39
    assert max(v["max_abs_diff"] for v in both["features"].values()) < 1e-5  # float32 rounding only
    assert both["labels_agree"] == 74
