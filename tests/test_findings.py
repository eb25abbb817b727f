"""The four findings (`analysis.findings`) on constructed analysis tables: every verdict branch of every rule, with
exact expected values (docs/findings.md states the rules)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from carebench.analysis import findings as F

ROLES = {
    "lstm": F.Role(("ehr",)),
    "resnet": F.Role(("cxr",)),
    "latefusion": F.Role(("ehr", "cxr")),
    "mmtm": F.Role(("ehr", "cxr")),
    "utde": F.Role(("ehr", "cxr")),
    "daft": F.Role(("ehr", "cxr")),
    "aug": F.Role(("ehr", "cxr")),
    "medfuse": F.Role(("ehr", "cxr"), True),
    "drfuse": F.Role(("ehr", "cxr"), True),
    "umse": F.Role(("ehr", "cxr"), True),
    "healnet": F.Role(("ehr", "cxr"), True),
}


def board(methods, task="mortality", metric="auprc", n_runs=3):
    return pd.DataFrame(
        [
            {"task": task, "cohort": "base", "label": task, "metric": metric, "method": m, "estimate": 0.5,
             "n_runs": n_runs}
            for m in methods
        ]
    )  # fmt: skip


def comp_row(a, b, delta, lo, hi, p_holm, comparison="reference", task="mortality", label=None, metric="auprc",
             p_value=None):  # fmt: skip
    return {"task": task, "cohort": "base", "comparison": comparison, "label": label or task, "metric": metric,
            "method_a": a, "method_b": b, "delta": delta, "ci_low": lo, "ci_high": hi,
            "p_value": p_holm if p_value is None else p_value, "p_holm": p_holm}  # fmt: skip


# ------------------------------------------------------------------------------------------------ finding 1
def test_fusion_beats_unimodal_supported_names_best_fusion_and_its_numbers():
    comp = pd.DataFrame(
        [
            comp_row("medfuse", "lstm", 0.05, 0.01, 0.09, 0.01),
            comp_row("latefusion", "lstm", 0.02, -0.01, 0.05, 0.3),
        ]
    )
    r = F.fusion_vs_unimodal(
        comp, board(["lstm", "resnet", "medfuse", "latefusion"]), ROLES, "mortality", "base"
    )
    assert r["verdict"] == F.SUPPORTED
    assert (r["method_a"], r["method_b"], r["metric"]) == ("medfuse", "lstm", "auprc")
    assert (r["effect"], r["ci_low"], r["ci_high"], r["p_value"]) == (0.05, 0.01, 0.09, 0.01)
    assert (r["n_tested"], r["n_significant"], r["labels"], r["n_runs"]) == (2, 1, "mortality", 6)


@pytest.mark.parametrize(
    "lo, p_holm",
    [(-0.001, 0.01), (0.01, 0.06)],  # CI touches 0 / Holm p not below alpha
)
def test_fusion_beats_unimodal_not_supported_without_both_ci_and_holm(lo, p_holm):
    comp = pd.DataFrame([comp_row("medfuse", "lstm", 0.05, lo, 0.09, p_holm)])
    r = F.fusion_vs_unimodal(comp, board(["lstm", "medfuse"]), ROLES, "mortality", "base")
    assert r["verdict"] == F.NOT_SUPPORTED and r["labels"] == "" and r["n_significant"] == 0
    assert r["effect"] == 0.05 and r["p_value"] == p_holm


def test_fusion_beats_unimodal_undetermined_without_a_unimodal_or_fusion_method():
    comp = pd.DataFrame([comp_row("medfuse", "lstm", 0.05, 0.01, 0.09, 0.01)])
    only_fusion = F.fusion_vs_unimodal(comp, board(["medfuse", "latefusion"]), ROLES, "mortality", "base")
    only_uni = F.fusion_vs_unimodal(pd.DataFrame(), board(["lstm", "resnet"]), ROLES, "mortality", "base")
    for r in (only_fusion, only_uni):
        assert r["verdict"] == F.TOO_FEW and np.isnan(r["effect"]) and np.isnan(r["p_value"])
    assert "unimodal: none" in only_fusion["reason"] and "fusion: none" in only_uni["reason"]


def test_fusion_labels_are_the_per_label_holm_significant_ones():
    task, m = "phenotype", "auprc_macro"
    comp = pd.DataFrame(
        [
            comp_row("medfuse", "lstm", 0.03, 0.01, 0.05, 0.02, task=task, metric=m),
            comp_row("medfuse", "lstm", 0.2, 0.1, 0.3, 0.001, task=task, label="pheno_b", metric="auprc"),
            comp_row("latefusion", "lstm", 0.1, 0.05, 0.2, 0.01, task=task, label="pheno_a", metric="auprc"),
            comp_row("medfuse", "lstm", 0.1, -0.01, 0.2, 0.01, task=task, label="pheno_c", metric="auprc"),
            comp_row("medfuse", "lstm", 0.1, 0.05, 0.2, 0.2, task=task, label="pheno_d", metric="auprc"),
            comp_row("medfuse", "lstm", 0.1, 0.05, 0.2, 0.001, task=task, label="pheno_e", metric="auroc"),
            comp_row("medfuse", "lstm", 0.1, 0.05, 0.2, 0.001, task=task, label="group:both", metric="auprc"),
        ]
    )
    r = F.fusion_vs_unimodal(comp, board(["lstm", "medfuse", "latefusion"], task, m), ROLES, task, "base")
    assert r["verdict"] == F.SUPPORTED and r["labels"] == "pheno_a;pheno_b"
    assert (r["n_tested"], r["n_significant"]) == (1, 1)  # only medfuse has an overall reference row


# ------------------------------------------------------------------------------------------------ finding 2
def _pairwise(specs):
    """(method, delta of method - latefusion, ci, raw p): rows oriented as compare_methods writes them (a < b)."""
    rows = []
    for m, d, lo, hi, p in specs:
        if m < "latefusion":
            rows.append(comp_row(m, "latefusion", d, lo, hi, np.nan, "pairwise", p_value=p))
        else:
            rows.append(comp_row("latefusion", m, -d, -hi, -lo, np.nan, "pairwise", p_value=p))
    return pd.DataFrame(rows)


def test_cross_modal_supported_by_a_strict_majority_after_holm():
    comp = _pairwise([("drfuse", 0.04, 0.01, 0.07, 0.001), ("mmtm", 0.03, 0.005, 0.06, 0.01),
                      ("utde", 0.01, -0.02, 0.04, 0.5), ("lstm", -0.1, -0.15, -0.05, 0.001)])  # fmt: skip
    # lstm is unimodal: its comparison with latefusion is no vote
    r = F.cross_modal_vs_late(
        comp, board(["lstm", "latefusion", "drfuse", "mmtm", "utde"]), ROLES, "mortality", "base"
    )
    assert r["verdict"] == F.SUPPORTED
    assert (r["n_tested"], r["n_significant"], r["labels"]) == (3, 2, "drfuse;mmtm")
    assert r["effect"] == pytest.approx(0.03)  # median of 0.04, 0.03, 0.01
    assert "mmtm +0.0300 [+0.0050, +0.0600] p_holm=0.02" in r["detail"]  # flipped to mmtm - latefusion
    assert "drfuse +0.0400 [+0.0100, +0.0700] p_holm=0.003" in r["detail"] and "p_holm=0.5" in r["detail"]


def test_cross_modal_not_supported_without_a_strict_majority():
    comp = _pairwise([("drfuse", 0.04, 0.01, 0.07, 0.001), ("utde", 0.01, -0.02, 0.04, 0.5)])
    r = F.cross_modal_vs_late(comp, board(["latefusion", "drfuse", "utde"]), ROLES, "mortality", "base")
    assert r["verdict"] == F.NOT_SUPPORTED and (r["n_tested"], r["n_significant"]) == (2, 1)


def test_cross_modal_p_values_are_holm_adjusted_over_the_methods():
    # raw p 0.03 and 0.04 are both below 0.05, Holm gives 0.06 and 0.06: none significant
    comp = _pairwise([("drfuse", 0.04, 0.01, 0.07, 0.03), ("mmtm", 0.03, 0.005, 0.06, 0.04)])
    r = F.cross_modal_vs_late(comp, board(["latefusion", "drfuse", "mmtm"]), ROLES, "mortality", "base")
    assert r["verdict"] == F.NOT_SUPPORTED and r["n_significant"] == 0
    assert r["detail"].count("p_holm=0.06") == 2


def test_cross_modal_undetermined_without_a_pairwise_comparison():
    for comp in (pd.DataFrame(), _pairwise([("mmtm", 0.04, 0.01, 0.07, 0.001)])):
        r = F.cross_modal_vs_late(comp, board(["latefusion", "drfuse"]), ROLES, "mortality", "base")
        assert r["verdict"] == F.TOO_FEW and "no pairwise comparison" in r["reason"]


def test_cross_modal_undetermined_without_latefusion_or_a_cross_modal_method():
    comp = _pairwise([("drfuse", 0.04, 0.01, 0.07, 0.001)])
    for methods in (["lstm", "drfuse", "mmtm"], ["lstm", "latefusion"]):
        r = F.cross_modal_vs_late(comp, board(methods), ROLES, "mortality", "base")
        assert r["verdict"] == F.TOO_FEW and r["n_tested"] == 0


# ------------------------------------------------------------------------------------------------ finding 3
def curves(values, task="mortality", metric="auprc"):
    """values: method -> {rate: value} (train rate 0), plus a train-rate-0.5 curve that must be ignored."""
    rows = []
    for m, by_rate in values.items():
        for rate, v in by_rate.items():
            for train_rate, val in ((0.0, v), (0.5, -9.0)):
                rows.append({"task": task, "cohort": "base", "method": m, "train_rate": train_rate, "rate": rate,
                             "metric": metric, "value": val})  # fmt: skip
    return pd.DataFrame(rows)


AWARE4 = {"medfuse": 0.01, "drfuse": 0.02, "umse": 0.0, "healnet": 0.03}
OTHER4 = {"latefusion": 0.1, "mmtm": 0.12, "utde": 0.08, "daft": 0.15}


def _curve_values(drops):
    """A curve per method: 0.8 at rate 0, then 0.8 - drop * (0.5, 1.5) at rates 0.3 and 0.9 (mean drop = drop)."""
    return {m: {0.0: 0.8, 0.3: 0.8 - 0.5 * d, 0.9: 0.8 - 1.5 * d} for m, d in drops.items()}


def test_degradation_is_rate0_minus_mean_over_later_rates_on_train_rate_0():
    deg = F.degradation(curves(_curve_values({**AWARE4, "lstm": 0.0})), "mortality", "base", "auprc")
    assert deg.to_dict() == pytest.approx({**AWARE4, "lstm": 0.0}, abs=1e-12)


def test_missing_robustness_supported_with_exact_permutation_p():
    c = curves(_curve_values({**AWARE4, **OTHER4, "resnet": 0.3}))
    r = F.missing_robustness(
        c, board([*AWARE4, *OTHER4]), ROLES, "mortality", "base", n_resamples=500, seed=1
    )
    assert r["verdict"] == F.SUPPORTED
    assert r["effect"] == pytest.approx(np.mean(list(OTHER4.values())) - np.mean(list(AWARE4.values())))
    assert r["p_value"] == pytest.approx(2 / 70)  # complete separation, 8 choose 4 splits, two-sided
    assert 0 < r["ci_low"] < r["effect"] < r["ci_high"]
    assert r["n_tested"] == 8 and "resnet" not in r["methods"]  # unimodal X-ray model left out
    assert r["method_b"] == "drfuse; healnet; medfuse; umse"


def test_missing_robustness_not_supported_when_the_permutation_cannot_reach_alpha_or_the_sign_is_wrong():
    two = {"medfuse": 0.01, "drfuse": 0.02, "latefusion": 0.1, "mmtm": 0.12}
    r = F.missing_robustness(
        curves(_curve_values(two)), board(two), ROLES, "mortality", "base", n_resamples=200
    )
    assert r["verdict"] == F.NOT_SUPPORTED and r["effect"] > 0
    assert r["p_value"] == pytest.approx(2 / 6)  # 2 vs 2: the smallest two-sided p is 1/3
    worse = {**{m: 0.1 for m in AWARE4}, **{m: 0.01 for m in OTHER4}}
    r = F.missing_robustness(
        curves(_curve_values(worse)), board(worse), ROLES, "mortality", "base", n_resamples=200
    )
    assert r["verdict"] == F.NOT_SUPPORTED and r["effect"] == pytest.approx(-0.09) and r["ci_high"] < 0


def test_missing_robustness_undetermined_with_fewer_than_two_methods_per_group_or_no_curves():
    three = {"medfuse": 0.01, "latefusion": 0.1, "mmtm": 0.12}
    r = F.missing_robustness(curves(_curve_values(three)), board(three), ROLES, "mortality", "base")
    assert (
        r["verdict"] == F.TOO_FEW and "missing-aware: ['medfuse']" in r["reason"] and np.isnan(r["p_value"])
    )
    for empty in (pd.DataFrame(), curves(_curve_values(three), task="los", metric="auroc_ovr_macro")):
        r = F.missing_robustness(empty, board(three), ROLES, "mortality", "base")
        assert r["verdict"] == F.NOT_ANALYSED and "missingness" in r["reason"]
    only0 = curves({m: {0.0: 0.8} for m in three})
    assert F.missing_robustness(only0, board(three), ROLES, "mortality", "base")["verdict"] == F.NOT_ANALYSED


# ------------------------------------------------------------------------------------------------ finding 4
def summary_rows(method, gaps, task="mortality", label="mortality"):
    """gaps: attribute -> list of (gap, low, high), one per run."""
    rows = []
    for attribute, per_run in gaps.items():
        for i, (g, lo, hi) in enumerate(per_run):
            rows.append({"task": task, "cohort": "base", "method": method, "run_id": f"{method}_{i}",
                         "label": label, "attribute": attribute, "metric": "auroc", "gap": g, "gap_low": lo,
                         "gap_high": hi})  # fmt: skip
            rows.append({**rows[-1], "metric": "tpr", "gap": 0.9, "gap_low": 0.8, "gap_high": 1.0})
    return rows


REF_GAPS = {
    "race_group": [(0.20, 0.15, 0.25), (0.22, 0.17, 0.27)],  # the reference's largest single-attribute gap
    "gender": [(0.05, 0.01, 0.09), (0.05, 0.01, 0.09)],
    "has_cxr": [(0.5, 0.4, 0.6), (0.5, 0.4, 0.6)],  # excluded: availability, not a subgroup
    "race_group:gender": [(0.6, 0.5, 0.7), (0.6, 0.5, 0.7)],  # excluded: intersection
}
COMP4 = pd.DataFrame([comp_row("medfuse", "lstm", 0.05, 0.01, 0.09, 0.01)])


def test_fairness_gap_not_supported_when_the_fusion_gap_is_significantly_smaller():
    fus = {
        "race_group": [(0.05, 0.02, 0.08)],
        "gender": [(0.2, 0.1, 0.3)],
        "has_cxr": [(0.0, 0.0, 0.01)],
        "race_group:gender": [(0.0, 0.0, 0.01)],
    }
    s = pd.DataFrame(summary_rows("lstm", REF_GAPS) + summary_rows("medfuse", fus))
    r = F.fairness_gap(s, COMP4, board(["lstm", "medfuse"]), "mortality", "base")
    assert r["verdict"] == F.NOT_SUPPORTED and "largest gap of lstm: race_group" in r["reason"]
    assert r["effect"] == pytest.approx(0.05 - 0.21)  # fusion gap - mean of the reference's two runs
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.02 - 0.26, 0.08 - 0.16))
    assert (r["n_tested"], r["n_significant"], r["labels"]) == (2, 1, "race_group")
    assert (r["method_a"], r["method_b"]) == ("medfuse", "lstm") and np.isnan(r["p_value"])


def test_fairness_gap_supported_when_the_intervals_overlap_even_if_another_attribute_improves():
    fus = {"race_group": [(0.12, 0.06, 0.18)], "gender": [(0.0, 0.0, 0.0)]}
    ref = {**REF_GAPS, "gender": [(0.15, 0.1, 0.2)]}
    s = pd.DataFrame(summary_rows("lstm", ref) + summary_rows("medfuse", fus))
    r = F.fairness_gap(s, COMP4, board(["lstm", "medfuse"]), "mortality", "base")
    assert r["verdict"] == F.SUPPORTED and r["effect"] == pytest.approx(0.12 - 0.21)
    assert (r["n_significant"], r["labels"]) == (1, "gender")  # reported, but not the largest gap


def test_fairness_gap_undetermined_without_fairness_tables_or_methods():
    r = F.fairness_gap(pd.DataFrame(), COMP4, board(["lstm", "medfuse"]), "mortality", "base")
    assert r["verdict"] == F.NOT_ANALYSED and "fairness disabled" in r["reason"]
    s = pd.DataFrame(summary_rows("lstm", REF_GAPS))
    assert F.fairness_gap(s, pd.DataFrame(), board(["lstm"]), "mortality", "base")["verdict"] == F.TOO_FEW
    r = F.fairness_gap(s, COMP4, board(["lstm", "medfuse"]), "mortality", "base")  # no medfuse fairness rows
    assert r["verdict"] == F.TOO_FEW and "no attribute" in r["reason"]


def test_fairness_gap_uses_the_macro_label_for_multilabel_tasks():
    comp = pd.DataFrame([comp_row("medfuse", "lstm", 0.05, 0.01, 0.09, 0.01, task="phenotype",
                                  metric="auprc_macro")])  # fmt: skip
    fus = {"race_group": [(0.05, 0.02, 0.08)]}
    s = pd.DataFrame(
        summary_rows("lstm", REF_GAPS, "phenotype", "macro") + summary_rows("medfuse", fus, "phenotype", "macro")
        + summary_rows("medfuse", {"race_group": [(0.9, 0.8, 1.0)]}, "phenotype", "pheno_shock")
    )  # fmt: skip
    r = F.fairness_gap(s, comp, board(["lstm", "medfuse"], "phenotype", "auprc_macro"), "phenotype", "base")
    assert r["verdict"] == F.NOT_SUPPORTED and r["effect"] == pytest.approx(0.05 - 0.21)


# ------------------------------------------------------------------------------------------------ roles
def test_missing_aware_is_set_on_exactly_the_eight_methods_and_read_by_analyze(tmp_path):
    from carebench.analysis.analyze import method_roles
    from carebench.models import list_models
    from carebench.models.base import BaseModel
    from carebench.models.registry import get_model_class

    assert BaseModel.missing_aware is False
    aware = sorted(m for m in list_models() if get_model_class(m).missing_aware)
    assert aware == ["drfuse", "flexmoe", "healnet", "m3care", "medfuse", "shaspec", "smil", "umse"]

    class Rec:
        def __init__(self, method, modalities):
            self.method, self.modalities = method, modalities

    roles = method_roles([Rec("medfuse", ["ehr", "cxr"]), Rec("mmtm", ["ehr", "cxr"]), Rec("lstm", ["ehr"]),
                          Rec("not_registered", ["ehr", "cxr"])])  # fmt: skip
    assert roles == {
        "medfuse": F.Role(("ehr", "cxr"), True),
        "mmtm": F.Role(("ehr", "cxr"), False),
        "lstm": F.Role(("ehr",), False),
        "not_registered": F.Role(("ehr", "cxr"), False),
    }
    assert roles["lstm"].unimodal and not roles["lstm"].fusion and roles["mmtm"].fusion


# ------------------------------------------------------------------------------------------------ the table
def test_findings_table_has_four_rows_per_task_and_cohort_and_only_known_verdicts():
    tables = {
        "leaderboard": pd.concat([board(["lstm", "medfuse"]), board(["lstm"], "los", "auroc_ovr_macro")]),
        "comparisons": COMP4,
    }
    t = F.findings_table(tables, ROLES, tasks=["mortality", "phenotype", "los"])  # the dataset's task order
    assert list(t.columns) == F.COLUMNS
    assert list(zip(t.task, t.finding, strict=True)) == [("mortality", i) for i in (1, 2, 3, 4)] + [
        ("los", i) for i in (1, 2, 3, 4)
    ]
    by_name = F.findings_table(tables, ROLES)  # tasks the order does not name: by name
    assert list(dict.fromkeys(by_name.task)) == ["los", "mortality"]
    assert set(t.verdict) <= set(F.VERDICTS)
    assert t.verdict.tolist() == [F.SUPPORTED, F.TOO_FEW, F.NOT_ANALYSED, F.NOT_ANALYSED,
                                  F.TOO_FEW, F.TOO_FEW, F.NOT_ANALYSED, F.NOT_ANALYSED]  # fmt: skip
    assert F.findings_table({"leaderboard": pd.DataFrame()}, ROLES).empty
