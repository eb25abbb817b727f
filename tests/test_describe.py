"""`carebench describe`: the numbers it reports equal independent computations on the dataset files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from rich.console import Console
from typer.testing import CliRunner

from carebench.cli import app
from carebench.data import store
from carebench.data.definitions import LOS_CLASS_NAMES, load_phenotypes
from carebench.data.describe import feature_coverage, print_summary, summarize


def test_summary_numbers(prepared_demo):
    ds = store.open_dataset(prepared_demo)
    s = summarize(ds)
    cohort = pd.read_parquet(prepared_demo / store.COHORT)
    ehr = np.load(prepared_demo / store.EHR)
    manifest = json.loads((prepared_demo / store.MANIFEST).read_text())

    assert s.n_stays == len(cohort) == 74
    assert s.steps["stays"].tolist() == [x["stays"] for x in manifest["cohort_steps"]]
    assert s.steps["excluded"].tolist() == [0, 0, 0, 66]

    # every output of every declared task, in declaration order (mortality, phenotype, los)
    assert list(dict.fromkeys(s.labels["task"])) == ["mortality", "phenotype", "los"]
    labels = s.labels.set_index("name")
    assert (
        labels.loc["in-ICU death after the first 48 h", "positives"] == cohort["label_mortality"].sum() == 9
    )
    for k, name in enumerate(LOS_CLASS_NAMES):
        assert labels.loc[f"class {k}: {name}", "positives"] == (cohort["label_los"] == k).sum()
    for p in load_phenotypes():
        assert labels.loc[p.name, "positives"] == cohort[p.column].sum()
        assert labels.loc[p.name, "label"] == p.column
    assert np.allclose(s.labels["prevalence"], s.labels["positives"] / 74)
    assert len(s.labels) == 1 + 25 + 7

    folds = s.folds.set_index("fold")
    assert folds["stays"].sum() == 74 and folds["mortality"].sum() == 9  # positives of the binary task
    assert folds["subjects"].sum() == cohort["subject_id"].nunique()

    cov = s.coverage.set_index("feature")
    assert list(cov.index) == ds.features
    observed = ~np.isnan(ehr)
    np.testing.assert_array_equal(cov["observed_hours"].to_numpy(), observed.sum(axis=(0, 1)))
    np.testing.assert_array_equal(cov["stays_observed"].to_numpy(), observed.any(axis=1).sum(axis=0))
    np.testing.assert_allclose(cov["coverage"].to_numpy(), observed.mean(axis=(0, 1)))
    assert cov.loc["heart_rate", "unit"] == "bpm"

    cxr = dict(zip(s.cxr["item"], s.cxr["value"], strict=True))
    assert cxr["stays with an X-ray"] == "0 / 74 (0.0%)"
    assert cxr["images in cache"] == "0"


def test_coverage_is_chunked_correctly():
    rng = np.random.default_rng(0)
    ehr = rng.normal(size=(5000, 4, 3)).astype(np.float32)
    ehr[rng.random(ehr.shape) < 0.3] = np.nan
    ehr[:, :, 2] = np.nan
    cov = feature_coverage(ehr, ["a", "b", "c"])
    np.testing.assert_array_equal(cov["observed_hours"], (~np.isnan(ehr)).sum(axis=(0, 1)))
    assert cov["coverage"].iloc[2] == 0.0 and cov["stays_observed"].iloc[2] == 0


def test_cli_prints_the_tables(prepared_demo):
    res = CliRunner().invoke(app, ["describe", str(prepared_demo)])
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    for title in [
        "Cohort steps",
        "Folds (patient-disjoint)",
        "Label prevalence",
        "Chest X-rays",
        "Feature coverage",
    ]:
        assert title in out
    assert "74 stays" in out
    assert "in-ICU death" in out and "12.2%" in out  # 9 / 74
    assert "los_ge_48h" in out


def test_print_summary_renders_every_feature(prepared_demo):
    console = Console(record=True, width=200)
    s = summarize(store.open_dataset(prepared_demo))
    print_summary(s, console)
    text = console.export_text()
    for f in s.coverage["feature"]:
        assert f in text


def test_cli_rejects_a_non_dataset(tmp_path):
    res = CliRunner().invoke(app, ["describe", str(tmp_path)])
    assert res.exit_code == 2
    assert (
        res.stderr.strip() == f"error: {tmp_path / store.MANIFEST}: missing (expected a dataset written by "
        f"`carebench prepare`)"
    )
