"""Fairness: age bands, validation thresholds, group metrics vs fairlearn, direction, suppression, intersections,
missing-X-ray correlation, multiclass class indexing, bootstrap kernels and CIs, analysis of a run's predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equalized_odds_difference,
    equalized_odds_ratio,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from scipy import stats
from sklearn import metrics as skm

from carebench.analysis.fairness import analyze_fairness
from carebench.data.store import FairnessAttribute
from carebench.evaluation import fairness as F
from carebench.evaluation.metrics import expected_calibration_error
from carebench.evaluation.statistics import bootstrap_ci
from carebench.runs import RunsError

RACES = ["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO", "ASIAN", "OTHER"]


def _data(n=1200, seed=0):
    """Random stays with every attribute; the score depends on the label (AUROC ~0.8)."""
    rng = np.random.default_rng(seed)
    groups = pd.DataFrame(
        {
            "age_band": F.age_bands(rng.uniform(18, 95, n)),
            "gender": rng.choice(["F", "M"], n),
            "race_group": rng.choice(RACES, n, p=[0.4, 0.2, 0.15, 0.15, 0.1]),
            "admission_type": rng.choice(["EW EMER.", "URGENT", "ELECTIVE"], n),
            "insurance": rng.choice(["Medicare", "Medicaid", "Other"], n),
            "has_cxr": rng.random(n) < 0.6,
        }
    )
    y = (rng.random(n) < 0.25).astype(np.int64)
    p = np.clip(0.3 + 0.25 * y + rng.normal(0, 0.18, n), 0, 1)
    return y, p, groups


# ------------------------------------------------------------------------------------------------ age bands
def test_age_bands_edges_and_no_mutation():
    ages = pd.Series([0.0, 39.99, 40.0, 59.999, 60.0, 79.9, 80.0, 104.0, np.nan], index=list("abcdefghi"))
    before = ages.copy()
    edges_before = tuple(F.AGE_EDGES)
    bands = F.age_bands(ages)
    assert bands.astype(object).tolist()[:8] == [
        "0-40",
        "0-40",
        "40-60",
        "40-60",
        "60-80",
        "60-80",
        "80+",
        "80+",
    ]
    assert pd.isna(bands.iloc[8]) and list(bands.index) == list("abcdefghi")
    pd.testing.assert_series_equal(ages, before)
    assert F.AGE_EDGES == edges_before  # calling twice changes nothing (the reference appended inf)
    assert F.age_bands(ages).astype(object).tolist()[:8] == bands.astype(object).tolist()[:8]
    with pytest.raises(F.FairnessInputError, match="age"):
        F.age_bands([30, -1])


# ------------------------------------------------------------------------------------------------ thresholds
def _brute_force(y, p, score):
    """Best threshold by trying every distinct score, highest threshold on ties (independent of the code)."""
    best, best_t = -np.inf, None
    for t in sorted(np.unique(p), reverse=True):
        d = p >= t
        tp, fp = np.sum(d & (y == 1)), np.sum(d & (y == 0))
        fn, tn = np.sum(~d & (y == 1)), np.sum(~d & (y == 0))
        v = tp / (tp + fn) - fp / (fp + tn) if score == "youden" else (2 * tp / (2 * tp + fp + fn))
        if v > best + 1e-12:
            best, best_t = v, t
    return best_t


def test_choose_threshold_matches_brute_force_and_rules():
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.round(np.clip(0.35 + 0.2 * y + rng.normal(0, 0.2, 300), 0, 1), 2)  # ties
    for rule in ("youden", "f1"):
        assert F.choose_threshold(y, p, rule) == pytest.approx(_brute_force(y, p, rule))
    # known tiny example: scores 0.1 0.4 | 0.35 0.8 -> Youden picks 0.35 (TPR 1, FPR 0.5) vs 0.8 (0.5, 0): tie
    # in J = 0.5 -> the highest threshold 0.8
    assert F.choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], "youden") == 0.8
    multi = F.choose_threshold(np.c_[y, 1 - y], np.c_[p, 1 - p], "youden")
    assert multi.shape == (2,) and multi[0] == pytest.approx(_brute_force(y, p, "youden"))
    assert F.choose_threshold(y, p, 0.3) == 0.3
    with pytest.raises(F.FairnessInputError, match="one class"):
        F.choose_threshold([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(F.FairnessInputError, match="threshold rule"):
        F.choose_threshold(y, p, "best")
    with pytest.raises(F.FairnessInputError, match="threshold rule"):
        F.choose_threshold(y, p, 1.5)


AGE_BAND = FairnessAttribute("age_band", "age", (0.0, 40.0, 60.0, 80.0), ("0-40", "40-60", "60-80", "80+"))


def _frames(y, p, groups, seed):
    """Predictions and the groups of their stays as `ProcessedDataset.groups()` derives them from a cohort: the
    declared attributes (age banded from age) and has_cxr."""
    stay = np.arange(len(y)) + 1000 * seed
    preds = pd.DataFrame(
        {"stay_id": stay, "cxr_input": groups["has_cxr"].to_numpy(), "y_mortality": y, "p_mortality": p}
    )
    rng = np.random.default_rng(seed)
    cohort = pd.DataFrame({"stay_id": stay, "age": rng.uniform(18, 95, len(y))})
    by_stay = pd.DataFrame(
        {
            "stay_id": stay,
            "age_band": AGE_BAND.groups(cohort).to_numpy(),
            "gender": groups["gender"],
            "race_group": groups["race_group"],
            "admission_type": groups["admission_type"],
            "insurance": groups["insurance"],
            "has_cxr": groups["has_cxr"],
        }
    )
    by_stay.attrs["age"] = cohort["age"]
    return preds, by_stay


def test_threshold_is_chosen_on_validation_not_test():
    y, p, g = _data(600, seed=1)
    yv, pv, gv = _data(600, seed=2)
    pv = np.clip(pv + 0.2, 0, 1)  # shifted validation scores: a different optimal threshold
    test, cohort_t = _frames(y, p, g, 1)
    val, _ = _frames(yv, pv, gv, 2)
    rep = analyze_fairness(test, cohort_t, "mortality", val_predictions=val, n_resamples=20)
    t_val, t_test = _brute_force(yv, pv, "youden"), _brute_force(y, p, "youden")
    assert t_val != pytest.approx(t_test)
    assert rep.thresholds == {"mortality": pytest.approx(t_val)}
    overall = rep.groups.query("attribute == 'overall'").iloc[0]
    assert overall["threshold"] == pytest.approx(t_val)
    assert overall["tpr"] == pytest.approx(np.mean(p[y == 1] >= t_val))
    assert overall["tpr"] != pytest.approx(np.mean(p[y == 1] >= t_test))
    with pytest.raises(F.FairnessInputError, match="val_predictions"):
        analyze_fairness(test, cohort_t, "mortality", n_resamples=20)


# ------------------------------------------------------------------------------------------------ vs fairlearn
def test_group_metrics_and_parity_agree_with_fairlearn():
    y, p, g = _data()
    thr = 0.45
    table = F.group_metrics(y, p, g, thr, labels=["mortality"], intersections=[])
    summary = F.fairness_summary(table)
    pred = (p >= thr).astype(int)
    for attr in ["age_band", "gender", "race_group", "admission_type", "insurance", "has_cxr"]:
        sf = g[attr].astype(str)
        mf = MetricFrame(
            metrics={"tpr": true_positive_rate, "fpr": false_positive_rate, "sel": selection_rate},
            y_true=y,
            y_pred=pred,
            sensitive_features=sf,
        )
        rows = table[table.attribute == attr].set_index("group")
        assert sorted(rows.index) == sorted(sf.unique())
        for grp, ref in mf.by_group.iterrows():
            r = rows.loc[grp]
            m = (sf == grp).to_numpy()
            assert r["n"] == m.sum() and r["n_pos"] == y[m].sum()
            assert r["tpr"] == pytest.approx(ref["tpr"]) and r["fpr"] == pytest.approx(ref["fpr"])
            assert r["positive_rate"] == pytest.approx(ref["sel"])
            assert r["auroc"] == pytest.approx(skm.roc_auc_score(y[m], p[m]))
            assert r["auprc"] == pytest.approx(skm.average_precision_score(y[m], p[m]))
            assert r["ece"] == pytest.approx(expected_calibration_error(y[m], p[m]))
            assert r["missing_cxr_rate"] == pytest.approx(1 - g["has_cxr"].to_numpy()[m].mean())
        s = summary[summary.attribute == attr].set_index("metric")
        assert s.loc["equalized_odds", "gap"] == pytest.approx(
            equalized_odds_difference(y, pred, sensitive_features=sf)
        )
        assert s.loc["equalized_odds", "ratio"] == pytest.approx(
            equalized_odds_ratio(y, pred, sensitive_features=sf)
        )
        assert s.loc["equal_opportunity", "gap"] == pytest.approx(
            equal_opportunity_difference(y, pred, sensitive_features=sf)
        )
        assert s.loc["demographic_parity", "gap"] == pytest.approx(
            demographic_parity_difference(y, pred, sensitive_features=sf)
        )
        assert s.loc["demographic_parity", "ratio"] == pytest.approx(
            demographic_parity_ratio(y, pred, sensitive_features=sf)
        )
        assert s.loc["tpr", "gap"] == pytest.approx(mf.difference()["tpr"])
        assert s.loc["tpr", "ratio"] == pytest.approx(mf.ratio()["tpr"])
    overall = table[table.attribute == "overall"].iloc[0]
    assert overall["group"] == "all" and overall["n"] == len(y)
    assert overall["auroc"] == pytest.approx(skm.roc_auc_score(y, p))


def test_fairlearn_engine_gives_the_same_table():
    y, p, g = _data(120, seed=6)
    y2, p2 = np.c_[y, 1 - y], np.c_[p, 1 - p]
    kw = dict(
        labels=["a", "b"], attributes=["gender", "race_group"], intersections=[("race_group", "gender")]
    )
    kernel = F.group_metrics(y2, p2, g, [0.4, 0.6], **kw)
    mf = F.group_metrics(y2, p2, g, [0.4, 0.6], engine="fairlearn", **kw)
    assert kernel.suppressed.any() and (~kernel.suppressed).sum() > 10
    pd.testing.assert_frame_equal(kernel, mf, check_exact=False, rtol=1e-12, atol=1e-12)
    with pytest.raises(F.FairnessInputError, match="engine"):
        F.group_metrics(y, p, g, 0.5, engine="numpy")


def test_worst_group_is_direction_aware():
    table = pd.DataFrame(
        {
            "label": "y",
            "attribute": "a",
            "group": ["g1", "g2", "g3"],
            "suppressed": False,
            "missing_cxr_rate": [0.1, 0.2, 0.3],
            "auroc": [0.7, 0.9, 0.8],
            "auprc": [0.5, 0.3, 0.4],
            "tpr": [0.6, 0.8, 0.7],
            "fpr": [0.1, 0.3, 0.2],
            "ece": [0.05, 0.02, 0.09],
            "positive_rate": [0.2, 0.3, 0.4],
        }
    )
    s = F.fairness_summary(table).set_index("metric")
    assert s.loc["auroc", ["worst_group", "best_group"]].tolist() == ["g1", "g2"]
    assert s.loc["auprc", ["worst_group", "best_group"]].tolist() == ["g2", "g1"]
    assert s.loc["tpr", ["worst_group", "best_group"]].tolist() == ["g1", "g2"]
    assert s.loc["fpr", ["worst_group", "best_group"]].tolist() == ["g2", "g1"]  # highest FPR is worst
    assert s.loc["ece", ["worst_group", "worst_value"]].tolist() == ["g3", 0.09]  # highest ECE is worst
    assert pd.isna(s.loc["positive_rate", "worst_group"])
    assert s.loc["fpr", "gap"] == pytest.approx(0.2) and s.loc["fpr", "ratio"] == pytest.approx(1 / 3)
    assert s.loc["equalized_odds", "gap"] == pytest.approx(0.2)
    assert s.loc["equal_opportunity", "gap"] == pytest.approx(0.2)
    assert s.loc["demographic_parity", "ratio"] == pytest.approx(0.5)


def test_groups_below_min_size_are_suppressed():
    rng = np.random.default_rng(5)
    sizes = {"a": 9, "b": 10, "c": 40}
    g = pd.DataFrame({"site": np.repeat(list(sizes), list(sizes.values()))})
    n = len(g)
    y = np.tile([0, 1], n // 2 + 1)[:n]
    p = rng.random(n)
    t = F.group_metrics(y, p, g, 0.5, attributes=["site"], intersections=[]).set_index("group")
    assert t.loc["a", "suppressed"] and pd.isna(t.loc["a", "n"]) and pd.isna(t.loc["a", "n_pos"])
    assert t.loc["a", list(F.METRICS)].isna().all() and np.isnan(t.loc["a", "missing_cxr_rate"])
    assert not t.loc["b", "suppressed"] and t.loc["b", "n"] == 10
    assert t.loc["b", "auroc"] == pytest.approx(skm.roc_auc_score(y[9:19], p[9:19]))
    s = F.fairness_summary(t.reset_index()).set_index("metric")
    assert s.loc["auroc", "n_groups"] == 2
    assert s.loc["auroc", "gap"] == pytest.approx(abs(t.loc["b", "auroc"] - t.loc["c", "auroc"]))
    t20 = F.group_metrics(y, p, g, 0.5, attributes=["site"], intersections=[], min_group_size=20)
    assert t20.set_index("group").loc[["a", "b"], "suppressed"].all()
    with pytest.raises(F.FairnessInputError, match="min_group_size"):
        F.group_metrics(y, p, g, 0.5, attributes=["site"], intersections=[], min_group_size=0)


def test_intersections_have_exact_values_and_subset_metrics():
    y, p, g = _data(1500, seed=4)
    t = F.group_metrics(y, p, g, 0.5, attributes=["race_group"], intersections=[("race_group", "gender")])
    inter = t[t.attribute == "race_group:gender"]
    counts = g.groupby(["race_group", "gender"]).size()
    assert len(inter) == len(counts)
    for (race, sex), cnt in counts.items():
        row = inter[(inter.race_group == race) & (inter.gender == sex)]
        assert len(row) == 1 and row["group"].iloc[0] == f"{race} & {sex}"
        m = ((g.race_group == race) & (g.gender == sex)).to_numpy()
        assert row["n"].iloc[0] == cnt
        assert row["auroc"].iloc[0] == pytest.approx(skm.roc_auc_score(y[m], p[m]))
        assert row["tpr"].iloc[0] == pytest.approx(np.mean(p[m & (y == 1)] >= 0.5))
    single = t[t.attribute == "race_group"]
    assert single["gender"].isna().all() and set(single["race_group"]) == set(RACES)  # "/" kept verbatim
    with pytest.raises(F.FairnessInputError, match="missing attribute"):
        F.group_metrics(y, p, g, 0.5, attributes=["race_group"], intersections=[("race_group", "ward")])
    with pytest.raises(F.FairnessInputError, match="two or more"):
        F.group_metrics(y, p, g, 0.5, attributes=["race_group"], intersections=[("race_group",)])


def test_missing_cxr_correlation_known_value_and_exclusions():
    # 4 wards of 20 stays; X-ray missing in 2, 4, 10, 16 of them; positive decisions in 5, 10, 10, 15.
    missing = [2, 4, 10, 16]
    positive = [5, 10, 10, 15]
    rows = []
    for w, (mi, po) in enumerate(zip(missing, positive, strict=True)):
        for i in range(20):
            rows.append({"ward": f"w{w}", "has_cxr": i >= mi, "p": 0.9 if i < po else 0.1, "y": i % 2})
    d = pd.DataFrame(rows)
    t = F.group_metrics(
        d.y,
        d.p,
        d[["ward", "has_cxr"]],
        0.5,
        attributes=["ward", "has_cxr"],
        intersections=[("ward", "has_cxr")],
    )
    s = F.fairness_summary(t)
    r = s[(s.attribute == "ward") & (s.metric == "positive_rate")].iloc[0]
    expect = stats.pearsonr(np.array(positive) / 20, np.array(missing) / 20).statistic
    assert r["pearson_missing_cxr"] == pytest.approx(expect) and r["pearson_note"] == ""
    # by hand: deviations (-.25, 0, 0, .25) and (-.3, -.2, .1, .4) -> .175 / sqrt(.125 x .30)
    assert expect == pytest.approx(0.175 / np.sqrt(0.125 * 0.30), abs=1e-12)
    for attr in ("has_cxr", "ward:has_cxr"):  # the reference reported 0.0 here; we exclude with a reason
        rr = s[(s.attribute == attr) & (s.metric == "positive_rate")].iloc[0]
        assert np.isnan(rr["pearson_missing_cxr"]) and "availability" in rr["pearson_note"]
    hc = t[t.attribute == "has_cxr"].set_index("group")
    assert hc.loc["True", "missing_cxr_rate"] == 0.0 and hc.loc["False", "missing_cxr_rate"] == 1.0
    two = F.fairness_summary(t[t.group.isin(["w0", "w1"]) | (t.attribute != "ward")])
    assert "fewer than 3" in two[(two.attribute == "ward") & (two.metric == "auroc")].iloc[0]["pearson_note"]


def test_multiclass_uses_the_actual_class_columns():
    rng = np.random.default_rng(7)
    n = 400
    y = rng.integers(0, 7, n)
    g = pd.DataFrame({"unit": np.where(np.arange(n) < 200, "A", "B")})
    y[:200] = rng.choice([3, 4], 200)  # unit A: only classes 3 and 4 occur
    logits = rng.normal(0, 1, (n, 7))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = [f"los_{k}" for k in range(7)]
    t = F.group_metrics(y, p, g, None, labels=names, attributes=["unit"], intersections=[])
    a = t[(t.attribute == "unit") & (t.group == "A")].set_index("label")
    pred = p.argmax(1)
    m = np.arange(n) < 200
    for k in (3, 4):
        assert a.loc[f"los_{k}", "tpr"] == pytest.approx(np.mean(pred[m & (y == k)] == k))
        assert a.loc[f"los_{k}", "auroc"] == pytest.approx(skm.roc_auc_score(y[m] == k, p[m, k]))
    assert np.isnan(a.loc["los_0", "tpr"]) and np.isnan(a.loc["los_0", "auroc"])
    assert a.loc["los_0", "fpr"] == pytest.approx(np.mean(pred[m] == 0))
    # macro TPR over the classes present (3, 4), not over class indices 0..1 as the reference did
    assert a.loc["macro", "tpr"] == pytest.approx(np.mean([np.mean(pred[m & (y == k)] == k) for k in (3, 4)]))
    with pytest.raises(F.FairnessInputError, match="argmax"):
        F.group_metrics(y, p, g, 0.5, attributes=["unit"], intersections=[])


def test_multilabel_per_label_thresholds_and_macro():
    y, p, g = _data(500, seed=8)
    y2 = np.c_[y, 1 - y]
    p2 = np.c_[p, 1 - p]
    t = F.group_metrics(y2, p2, g, [0.4, 0.6], labels=["a", "b"], attributes=["gender"], intersections=[])
    f = t[(t.attribute == "gender") & (t.group == "F")].set_index("label")
    m = (g.gender == "F").to_numpy()
    assert f.loc["a", "tpr"] == pytest.approx(np.mean(p[m & (y == 1)] >= 0.4))
    assert f.loc["b", "tpr"] == pytest.approx(np.mean((1 - p)[m & (y == 0)] >= 0.6))
    assert f.loc["macro", "auroc"] == pytest.approx((f.loc["a", "auroc"] + f.loc["b", "auroc"]) / 2)
    assert f.loc[["a", "b"], "threshold"].tolist() == [0.4, 0.6]
    # a label with one class in validation gets no threshold: its decision metrics are NaN, the others stand
    thr = F.choose_threshold(np.c_[y, np.zeros_like(y)], p2, "youden")
    assert thr[0] == pytest.approx(_brute_force(y, p, "youden")) and np.isnan(thr[1])
    t = F.group_metrics(y2, p2, g, thr, labels=["a", "b"], attributes=["gender"], intersections=[])
    f = t[(t.attribute == "gender") & (t.group == "F")].set_index("label")
    assert f.loc["b", ["tpr", "fpr", "positive_rate"]].isna().all()
    assert f.loc["b", "auroc"] == pytest.approx(skm.roc_auc_score(1 - y[m], 1 - p[m]))
    assert f.loc["macro", "tpr"] == pytest.approx(f.loc["a", "tpr"])
    gci, _ = F.bootstrap_fairness(
        y2, p2, g, thr, labels=["a", "b"], attributes=["gender"], intersections=[], n_resamples=20
    )
    assert gci[(gci.label == "b") & (gci.metric == "tpr")].n_valid.eq(0).all()


def test_bad_inputs_are_clear_errors():
    y, p, g = _data(100)
    with pytest.raises(F.FairnessInputError, match="threshold: required"):
        F.group_metrics(y, p, g)
    for bad in ("high", [0.5, 0.5], 1.2, float("nan")):
        with pytest.raises(F.FairnessInputError, match="threshold: expected"):
            F.group_metrics(y, p, g, bad)
    with pytest.raises(F.FairnessInputError, match="probabilities"):
        F.group_metrics(y, p * 3, g, 0.5)
    with pytest.raises(F.FairnessInputError, match="same stays"):
        F.group_metrics(y[:50], p[:50], g, 0.5)
    with pytest.raises(F.FairnessInputError, match="clash"):
        F.group_metrics(
            y, p, g.rename(columns={"gender": "auroc"}), 0.5, attributes=["auroc"], intersections=[]
        )
    with pytest.raises(F.FairnessInputError, match="group table"):
        F.fairness_summary(pd.DataFrame({"label": []}))


# ------------------------------------------------------------------------------------------------ bootstrap
def test_weighted_kernel_equals_sklearn_on_repeated_stays():
    rng = np.random.default_rng(11)
    m = 80
    s = np.round(rng.random(m), 1)  # many ties
    y = (rng.random(m) < 0.4).astype(int)
    pred = (s >= 0.5).astype(int)
    w = rng.integers(0, 4, size=(6, m))
    got = F.weighted_group_metrics(s, y, pred, w, n_bins=10)
    for b in range(6):
        ys, ss, ds = np.repeat(y, w[b]), np.repeat(s, w[b]), np.repeat(pred, w[b])
        assert got["auroc"][b] == pytest.approx(skm.roc_auc_score(ys, ss), abs=1e-12)
        assert got["auprc"][b] == pytest.approx(skm.average_precision_score(ys, ss), abs=1e-12)
        assert got["ece"][b] == pytest.approx(expected_calibration_error(ys, ss), abs=1e-12)
        assert got["tpr"][b] == pytest.approx(np.mean(ds[ys == 1]))
        assert got["fpr"][b] == pytest.approx(np.mean(ds[ys == 0]))
        assert got["positive_rate"][b] == pytest.approx(ds.mean())
    one = F.weighted_group_metrics(s, np.ones(m, int), pred, w[:1])
    assert np.isnan(one["auroc"][0]) and np.isnan(one["fpr"][0])


def test_bootstrap_is_seeded_and_covers_point_estimates():
    y, p, g = _data(800, seed=9)
    p = np.where((g.race_group == "ASIAN") & (y == 1), p * 0.6, p)  # planted: lower TPR in one group
    kw = dict(attributes=["race_group", "gender"], intersections=[], n_resamples=200)
    gci, sci = F.bootstrap_fairness(y, p, g, 0.5, seed=3, **kw)
    gci2, sci2 = F.bootstrap_fairness(y, p, g, 0.5, seed=3, **kw)
    pd.testing.assert_frame_equal(gci, gci2)
    pd.testing.assert_frame_equal(sci, sci2)
    gci3, _ = F.bootstrap_fairness(y, p, g, 0.5, seed=4, **kw)
    assert not np.allclose(gci.ci_low, gci3.ci_low)
    point = F.group_metrics(y, p, g, 0.5, attributes=["race_group", "gender"], intersections=[])
    merged = gci.merge(
        point.melt(
            id_vars=["label", "attribute", "group"],
            value_vars=list(F.METRICS),
            var_name="metric",
            value_name="point",
        ),
        on=["label", "attribute", "group", "metric"],
    )
    assert len(merged) == len(gci) == len(point) * len(F.METRICS)
    assert (merged.n_valid == 200).all()
    assert ((merged.ci_low <= merged.point) & (merged.point <= merged.ci_high)).all()
    summ = F.fairness_summary(point).merge(sci, on=["label", "attribute", "metric"])
    tpr_gap = summ[(summ.attribute == "race_group") & (summ.metric == "tpr")].iloc[0]
    assert tpr_gap["worst_group"] == "ASIAN"
    assert tpr_gap["ci_low"] <= tpr_gap["gap"] <= tpr_gap["ci_high"] and tpr_gap["ci_low"] > 0.1
    overall = gci[(gci.attribute == "overall")].set_index("metric")
    for metric in ("auroc", "auprc", "ece"):  # same draws as the statistics module's overall CIs
        ref = bootstrap_ci(y, p, metric, n_resamples=200, seed=3)
        assert overall.loc[metric, "ci_low"] == pytest.approx(ref.ci_low, abs=1e-12)
        assert overall.loc[metric, "ci_high"] == pytest.approx(ref.ci_high, abs=1e-12)
    with pytest.raises(F.FairnessInputError, match="n_resamples"):
        F.bootstrap_fairness(y, p, g, 0.5, n_resamples=0)


def test_bootstrap_sorts_each_group_once_whatever_the_blocks(monkeypatch):
    """Each group's labels are sorted once (`statistics.RankScorer`) and reused by every block of resamples: with
    blocks of 7 resamples instead of one block the CIs are identical and no scorer is built again."""
    from carebench.evaluation import statistics as st

    y, p, g = _data(400, seed=12)
    kw = dict(attributes=["race_group", "gender"], intersections=[], n_resamples=60, seed=5)
    built = []
    real_init = st.RankScorer.__init__
    monkeypatch.setattr(st.RankScorer, "__init__", lambda self, *a: built.append(1) or real_init(self, *a))
    gci, sci = F.bootstrap_fairness(y, p, g, 0.5, **kw)
    n_groups = g.race_group.nunique() + g.gender.nunique() + 1  # and the overall row; none below 10 stays
    assert len(built) == n_groups
    built[:] = []
    monkeypatch.setattr(st, "RNG_BLOCK", 7 * 400)  # 7 resamples per block: 9 blocks
    gci7, sci7 = F.bootstrap_fairness(y, p, g, 0.5, **kw)
    assert len(built) == n_groups
    pd.testing.assert_frame_equal(gci7, gci)
    pd.testing.assert_frame_equal(sci7, sci)


def test_analyze_fairness_joins_groups_and_adds_cis():
    y, p, g = _data(400, seed=12)
    preds, cohort = _frames(y, p, g, 12)
    rep = analyze_fairness(preds, cohort, "mortality", threshold=0.5, n_resamples=50, seed=1)
    # a declared numeric attribute with bins gives the same left-closed bands as the kernels' age_bands
    bands = F.age_bands(cohort.attrs["age"]).astype(str)
    assert cohort["age_band"].astype(str).tolist() == bands.tolist()
    got = rep.groups[rep.groups.attribute == "age_band"].set_index("group")["n"]
    assert got.to_dict() == bands.value_counts().to_dict()
    assert {"auroc_low", "auroc_high", "tpr_low", "tpr_high"} <= set(rep.groups.columns)
    assert {"gap_low", "gap_high", "n_resamples_valid"} <= set(rep.summary.columns)
    ok = rep.groups.dropna(subset=["auroc"])
    assert ((ok.auroc_low <= ok.auroc) & (ok.auroc <= ok.auroc_high)).all()
    with pytest.raises(F.FairnessInputError, match="not in the dataset's cohort"):
        analyze_fairness(preds, cohort.iloc[5:], "mortality", threshold=0.5, n_resamples=5)
    with pytest.raises(RunsError, match="missing columns"):
        analyze_fairness(preds.drop(columns="p_mortality"), cohort, "mortality", threshold=0.5)


def test_analyze_fairness_phenotype_and_los_frames():
    from carebench.data.definitions import load_phenotypes

    y, p, g = _data(300, seed=13)
    preds, cohort = _frames(y, p, g, 13)
    rng = np.random.default_rng(13)
    names = [ph.column for ph in load_phenotypes()]
    yl = (rng.random((300, 25)) < 0.3).astype(int)
    pl = np.clip(0.3 + 0.3 * yl + rng.normal(0, 0.2, (300, 25)), 0, 1)
    pheno = preds[["stay_id", "cxr_input"]].assign(
        **{f"y_{n}": yl[:, j] for j, n in enumerate(names)},
        **{f"p_{n}": pl[:, j] for j, n in enumerate(names)},
    )
    rep = analyze_fairness(
        pheno,
        cohort,
        "phenotype",
        val_predictions=pheno,
        n_resamples=10,
        attributes=["gender"],
        intersections=[],
    )
    assert list(rep.thresholds) == names
    assert rep.thresholds[names[3]] == pytest.approx(_brute_force(yl[:, 3], pl[:, 3], "youden"))
    macro = rep.groups[(rep.groups.label == "macro") & (rep.groups.group == "F")].iloc[0]
    per = rep.groups[(rep.groups.label != "macro") & (rep.groups.group == "F")]
    assert macro["auroc"] == pytest.approx(per["auroc"].mean()) and len(per) == 25
    k = rng.integers(0, 7, 300)
    probs = rng.dirichlet(np.ones(7), 300)
    los = preds[["stay_id"]].assign(y_los=k, **{f"p_los_{c}": probs[:, c] for c in range(7)})
    rep = analyze_fairness(los, cohort, "los", n_resamples=10, attributes=["gender"], intersections=[])
    assert rep.thresholds == {}
    row = rep.groups[(rep.groups.label == "los_2") & (rep.groups.attribute == "overall")].iloc[0]
    assert row["tpr"] == pytest.approx(np.mean(probs[k == 2].argmax(1) == 2))
