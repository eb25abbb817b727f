"""The report holds aggregates only, so it can be shared under the MIMIC data use agreement (docs/report.md,
"What the report contains"): no stay, patient or admission id, no per-stay row, no date of a stay, and no text of
the data other than the group labels of closed vocabularies (gender, admission type, insurance) and carebench's own
groups (race group, age band) - never the raw race text.

Checked on a report of the real MIMIC-IV demo: ten runs (two methods x five folds, so every stay is predicted),
with fairness and missingness tables, every CSV of report/tables and the HTML page.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest

from benchmark_fixture import write_run
from carebench.analysis.analyze import analyze
from carebench.data import store
from carebench.report import build_report

ID_COLUMNS = ("stay_id", "subject_id", "hadm_id")
OPEN_TEXT = ("race",)  # text of the data that is not a closed vocabulary
DATE_COLUMNS = ("intime", "outtime", "cxr_time")


@pytest.fixture(scope="module")
def report(prepared_demo, tmp_path_factory):
    runs = tmp_path_factory.mktemp("privacy") / "runs"
    for method, signal in (("lstm", 0.8), ("transformer", 1.4)):
        for fold in range(1, 6):
            write_run(prepared_demo, runs, method, "mortality", fold, 0, signal)
    analyze(runs, n_bootstrap=30, n_permutations=30, ablation=False)
    html = build_report(runs)
    return html, sorted((html.parent / "tables").glob("*.csv")), store.open_dataset(prepared_demo).cohort


def _texts(report) -> dict[str, str]:
    html, csvs, _ = report
    return {"index.html": html.read_text(), **{p.name: p.read_text() for p in csvs}}


def test_every_stay_is_predicted_so_the_check_means_something(report):
    html, csvs, cohort = report
    names = {p.stem for p in csvs}
    assert {"leaderboard", "fairness_groups", "fairness_summary", "missingness_natural", "runs"} <= names
    groups = pd.read_csv(html.parent / "tables" / "fairness_groups.csv")
    assert set(groups["attribute"]) >= {"gender", "race_group", "insurance", "age_band"}
    assert (pd.read_csv(html.parent / "tables" / "leaderboard.csv")["n_stays"] == len(cohort)).all()


def test_no_id_of_a_stay_patient_or_admission(report):
    _, _, cohort = report
    ids = {str(int(v)) for c in ID_COLUMNS for v in cohort[c]}
    for name, text in _texts(report).items():
        numbers = set(re.findall(r"(?<![\d.])\d{6,}(?![\d.])", text))
        assert numbers & ids == set(), name


def test_no_per_stay_rows_and_no_dates_of_stays(report):
    _, csvs, cohort = report
    for p in csvs:
        if not p.read_text().strip():
            continue  # an empty table (e.g. no ablation without checkpoints)
        cols = set(pd.read_csv(p, nrows=0).columns)
        assert cols & {*ID_COLUMNS, *DATE_COLUMNS, "cxr_dicom_id"} == set(), p.name
    days = {str(t.date()) for c in ("intime", "outtime") for t in cohort[c]}
    for name, text in _texts(report).items():
        assert set(re.findall(r"\d{4}-\d{2}-\d{2}", text)) & days == set(), name


def test_no_free_text_of_the_data(report):
    _, _, cohort = report
    groups = set(cohort["race_group"])
    raw = {v for c in OPEN_TEXT for v in cohort[c].dropna()} - groups
    assert len(raw) >= 5  # the demo has raw race text beyond the five groups (e.g. 'WHITE - OTHER EUROPEAN')
    for name, text in _texts(report).items():
        assert [v for v in raw if v in text] == [], name
