"""synth -> prepare -> describe end to end, and the planted structure recovered by simple outside models.

One synthetic cohort (2000 ICU stays, 64 px radiographs) goes through the real `prepare`. Then:
- the prepared labels, X-ray availability and mortality equal the planted truth stay by stay;
- logistic regression on per-stay EHR summaries (from ehr.npy) separates "ehr" phenotypes and is at chance
  on "cxr" and "none" phenotypes; logistic regression on 16x16 downsampled pixels (from cxr.npy) detects
  "cxr" phenotypes and is at chance on "ehr" ones; "both" phenotypes are predicted clearly better from the
  two modalities together (gradient boosting on both) than from either alone;
- the planted subgroup has lower EHR AUROC; X-ray availability rises with acuity (missing not at random).
Every AUROC is out of sample: cross-validation over the five patient-disjoint folds of the dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from carebench.cli import app
from carebench.data.definitions import LOS_BINS_DAYS, load_phenotypes
from carebench.data.mimic.pipeline import prepare
from carebench.data.store import ProcessedDataset, open_dataset
from carebench.data.synthetic.simulator import synthesize

STAYS, SEED, SIZE = 2000, 11, 64


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("planted") / "raw"
    synthesize(raw, stays=STAYS, seed=SEED, image_size=SIZE, workers=2)
    return raw


@pytest.fixture(scope="session")
def prepared(synth_raw: Path) -> ProcessedDataset:
    out = synth_raw.parent / "data"
    prepare(synth_raw / "mimic-iv", out, mimic_cxr=synth_raw / "mimic-cxr-jpg", image_size=SIZE, threads=2)
    return open_dataset(out, mmap=True)


@pytest.fixture(scope="session")
def planted(synth_raw: Path) -> dict:
    return json.loads((synth_raw / "planted.json").read_text())


@pytest.fixture(scope="session")
def truth(synth_raw: Path, prepared: ProcessedDataset) -> pd.DataFrame:
    """planted_stays rows in cohort row order."""
    t = pd.read_csv(synth_raw / "planted_stays.csv.gz").set_index("stay_id")
    return t.loc[prepared.cohort["stay_id"].to_numpy()].reset_index()


def _kind(planted: dict, kind: str) -> list[str]:
    return [c for c, k in planted["phenotypes"].items() if k == kind]


def test_describe_and_required_ranges(prepared: ProcessedDataset, synth_raw: Path) -> None:
    c = prepared.cohort
    for p in load_phenotypes():
        assert 0.01 <= c[p.column].mean() <= 0.60, p.column
    assert 0.03 <= c["label_mortality"].mean() <= 0.30
    assert set(c["label_los"]) == set(range(len(LOS_BINS_DAYS)))
    assert 0.15 <= c["has_cxr"].mean() <= 0.60
    res = CliRunner().invoke(app, ["describe", str(prepared.root)])
    assert res.exit_code == 0, res.output
    assert f"{len(c)} stays of {c['subject_id'].nunique()}" in res.output


def test_prepare_recovers_the_planted_truth_stay_by_stay(
    prepared: ProcessedDataset, truth: pd.DataFrame, planted: dict, synth_raw: Path
) -> None:
    c = prepared.cohort
    assert len(c) == planted["realized"]["cohort_stays"]
    assert (truth["age"] >= 18).all()
    for p in load_phenotypes():
        assert (c[p.column].to_numpy() == truth[p.column].to_numpy()).all(), p.column
    assert (c["has_cxr"].astype(int).to_numpy() == truth["cxr_in_window"].to_numpy()).all()
    assert (c["label_mortality"].to_numpy() == truth["died_in_icu"].to_numpy()).all()
    # minors and short stays were generated and dropped
    assert planted["realized"]["minor_stays"] > 0 and planted["realized"]["short_stays"] > 0
    raw_stays = pd.read_csv(synth_raw / "mimic-iv" / "icu" / "icustays.csv.gz")
    assert len(raw_stays) == STAYS > len(c)


# ------------------------------------------------------------------------ recoverability by outside models


def _ehr_summaries(ehr: np.ndarray) -> np.ndarray:
    """Per stay and feature: mean, min, max, std over 48 h and the observed fraction; NaN -> column median."""
    x = np.asarray(ehr, dtype=np.float64)
    observed = ~np.isnan(x)
    any_obs = observed.any(axis=1)
    filled = np.where(observed, x, 0.0)
    n = np.maximum(observed.sum(axis=1), 1)
    mean = filled.sum(axis=1) / n
    std = np.sqrt(np.maximum((filled**2).sum(axis=1) / n - mean**2, 0.0))
    mn = np.where(observed, x, np.inf).min(axis=1)
    mx = np.where(observed, x, -np.inf).max(axis=1)
    parts = []
    for part in (mean, mn, mx, std):
        part = np.where(any_obs, part, np.nan)
        med = np.nanmedian(part, axis=0)
        parts.append(np.where(np.isnan(part), np.where(np.isnan(med), 0.0, med), part))
    return np.concatenate([*parts, observed.mean(axis=1)], axis=1)


def _pixels(prepared: ProcessedDataset, rows: np.ndarray) -> np.ndarray:
    idx = prepared.cohort["cxr_index"].to_numpy()[rows]
    img = np.asarray(prepared.cxr)[idx].astype(np.float64) / 255.0
    k = img.shape[1] // 16
    return img.reshape(len(idx), 16, k, 16, k).mean(axis=(2, 4)).reshape(len(idx), -1)


@pytest.fixture(scope="session")
def design(prepared: ProcessedDataset) -> dict:
    c = prepared.cohort
    has = c["has_cxr"].astype(bool).to_numpy()
    return {
        "ehr": _ehr_summaries(prepared.ehr),
        "fold": c["fold"].to_numpy(),
        "has": has,
        "pix": _pixels(prepared, np.flatnonzero(has)),
        "sub": (c["race_group"] == "BLACK/AFRICAN AMERICAN").to_numpy(),
    }


def _lr(c: float):
    return lambda: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))


def _boosted():
    return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.15, max_bins=32, random_state=0)


def _auroc(
    make: object, x: np.ndarray, y: np.ndarray, fold: np.ndarray, groups: np.ndarray | None = None
) -> float | tuple[float, float]:
    """Mean over the five patient-disjoint folds of the test-fold AUROC of a model fit on the other four.

    AUROC is computed within each test fold and then averaged: pooling out-of-fold predictions of different
    models biases an uninformative model's AUROC below 0.5 (each fit's intercept tracks its training prevalence).
    With `groups`, returns (mean AUROC inside the group, mean AUROC outside it).
    """
    inside, outside, whole = [], [], []
    for k in range(1, 6):
        test = fold == k
        model = make()
        model.fit(x[~test], y[~test])
        p = model.predict_proba(x[test])[:, 1]
        yt = y[test]
        if groups is None:
            whole.append(roc_auc_score(yt, p))
            continue
        g = groups[test]
        if 0 < yt[g].sum() < g.sum():
            inside.append(roc_auc_score(yt[g], p[g]))
        outside.append(roc_auc_score(yt[~g], p[~g]))
    if groups is None:
        return float(np.mean(whole))
    return float(np.mean(inside)), float(np.mean(outside))


@pytest.fixture(scope="session")
def scores(prepared: ProcessedDataset, design: dict, planted: dict) -> pd.DataFrame:
    """Out-of-sample AUROC per phenotype: EHR-only (all stays), EHR-only and pixels-only (stays with an
    X-ray), and, for "both" phenotypes, boosted trees on both modalities (stays with an X-ray)."""
    c = prepared.cohort
    has, fold = design["has"], design["fold"]
    rows = []
    for col, kind in planted["phenotypes"].items():
        y = c[col].to_numpy()
        r = {
            "col": col,
            "kind": kind,
            "ehr": _auroc(_lr(0.05), design["ehr"], y, fold),
            "ehr_x": _auroc(_lr(0.05), design["ehr"][has], y[has], fold[has]),
            "pix": _auroc(_lr(0.01), design["pix"], y[has], fold[has]),
        }
        if kind == "both":
            both = np.concatenate([design["ehr"][has], design["pix"]], axis=1)
            r["fused"] = _auroc(_boosted, both, y[has], fold[has])
        rows.append(r)
    return pd.DataFrame(rows).set_index("col")


def test_ehr_phenotypes_are_visible_in_the_ehr_only(scores: pd.DataFrame) -> None:
    s = scores[scores["kind"] == "ehr"]
    assert (s["ehr"] >= 0.80).all(), s["ehr"].to_dict()
    assert s["ehr"].mean() >= 0.88
    # pixels: no label above what chance gives ~40 positives among ~500 images, and chance on average
    assert (s["pix"] <= 0.72).all() and abs(s["pix"].mean() - 0.5) < 0.05, s["pix"].to_dict()


def test_cxr_phenotypes_are_visible_on_the_xray_only(scores: pd.DataFrame) -> None:
    s = scores[scores["kind"] == "cxr"]
    assert (s["ehr"] <= 0.60).all() and abs(s["ehr"].mean() - 0.5) < 0.05, s["ehr"].to_dict()
    assert (s["pix"] >= 0.68).all(), s["pix"].to_dict()
    assert s["pix"].mean() >= 0.78


def test_both_phenotypes_need_both_modalities(scores: pd.DataFrame) -> None:
    s = scores[scores["kind"] == "both"]
    best_single = s[["ehr_x", "pix"]].max(axis=1)
    assert (s["ehr_x"] <= 0.85).all() and (s["pix"] <= 0.88).all(), s.to_dict()
    assert (s["fused"] >= best_single + 0.04).all(), s.to_dict()
    assert (s["fused"] - best_single).mean() >= 0.08
    # the XOR phenotype is invisible to each modality alone
    xor = s.loc["pheno_coronary_atherosclerosis"]
    assert abs(xor["ehr_x"] - 0.5) < 0.08 and abs(xor["pix"] - 0.5) < 0.08 and xor["fused"] >= 0.65


def test_none_phenotypes_are_invisible(scores: pd.DataFrame) -> None:
    """A leak would push AUROC up; below 0.5 is noise (a 3% label has ~50 positives here)."""
    s = scores[scores["kind"] == "none"]
    assert (s[["ehr", "pix"]] <= 0.62).all().all(), s.to_dict()
    assert abs(s["ehr"].mean() - 0.5) < 0.06 and abs(s["pix"].mean() - 0.5) < 0.06


def test_subgroup_has_planted_lower_ehr_sensitivity(
    prepared: ProcessedDataset, design: dict, planted: dict
) -> None:
    assert planted["subgroup"]["value"] == "BLACK/AFRICAN AMERICAN"
    sub = design["sub"]
    assert sub.sum() >= 100
    gaps = []
    for col in _kind(planted, "ehr"):
        y = prepared.cohort[col].to_numpy()
        inside, outside = _auroc(_lr(0.05), design["ehr"], y, design["fold"], groups=sub)
        gaps.append(outside - inside)
    assert np.mean(gaps) >= 0.05, gaps
    assert sum(g > 0 for g in gaps) >= 0.75 * len(gaps)


def test_xray_availability_depends_on_acuity(
    prepared: ProcessedDataset, truth: pd.DataFrame, planted: dict
) -> None:
    has = prepared.cohort["has_cxr"].astype(int).to_numpy()
    assert abs(has.mean() - planted["missingness"]["target_rate"]) < 0.04  # --cxr-rate is met
    acuity = truth["acuity"].to_numpy()
    fit = LogisticRegression(C=1e6).fit(acuity[:, None], has)
    slope = planted["missingness"]["slope"]
    assert abs(fit.coef_[0, 0] - slope) < 0.35, fit.coef_
    # and, through acuity, the imaged stays die more often
    mort = prepared.cohort["label_mortality"].to_numpy()
    assert mort[has == 1].mean() > 1.3 * mort[has == 0].mean()
