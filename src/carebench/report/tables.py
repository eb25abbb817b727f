"""The report's tables: analysis tables (RUNS/analysis/*.parquet) -> display tables of formatted cells.

Why a layer of its own: the analysis tables are long and tidy (one row per method, label, metric); a reader wants
one row per method with a few metrics side by side, each as "estimate [CI low, CI high]", and a mark where the
method differs significantly from the reference. Every cell keeps its raw number (`Cell.value`), so tests and
the HTML (`data-value` attributes) can check the page against the analysis tables exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from carebench.analysis.findings import degradation as mean_drop  # finding 3's definition, one home

ALPHA = 0.05
BETTER, WORSE = "★", "▼"
# The leaderboard's columns are each task's `reported` metrics (carebench.tasks); the table holds every metric.
LOWER_IS_BETTER = {"brier", "ece"}
METRIC_NAMES = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "f1": "F1",
    "recall": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision",
    "brier": "Brier",
    "ece": "ECE",
    "auroc_macro": "AUROC macro",
    "auprc_macro": "AUPRC macro",
    "auroc_micro": "AUROC micro",
    "auprc_micro": "AUPRC micro",
    "auroc_ovr_macro": "AUROC (OvR macro)",
    "accuracy": "Accuracy",
    "kappa_linear": "κ linear",
    "f1_macro": "F1 macro",
    "tpr": "TPR",
    "fpr": "FPR",
}
CONDITION_NAMES = {"full": "both modalities", "drop_cxr": "X-ray removed", "drop_ehr": "EHR removed"}


@dataclass
class Cell:
    text: str
    value: float | None = None
    title: str = ""
    css: str = ""


@dataclass
class Table:
    """A display table: header labels and rows of cells; `key` names what the rows hold (for data-key)."""

    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    caption: str = ""
    key: str = ""


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA:
        return "–"
    if isinstance(x, int | np.integer):
        return str(int(x))
    return f"{float(x):.{digits}f}"


def fmt_ci(estimate: float, low: float, high: float, digits: int = 3) -> str:
    if estimate is None or pd.isna(estimate):
        return "–"
    if pd.isna(low) or pd.isna(high):
        return fmt(estimate, digits)
    return f"{fmt(estimate, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def fmt_p(p: float) -> str:
    if p is None or pd.isna(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _num(x: Any) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def _text(x: Any) -> str:
    """A text cell ('' for None / NaN, as a CSV round trip gives for empty strings)."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)


def groups_of(table: pd.DataFrame, tasks: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(task, cohort) pairs of a table, tasks in the order of `tasks` (the dataset's declaration order; others
    after them, by name), then cohort base, matched."""
    if table.empty:
        return []
    order = {t: i for i, t in enumerate(tasks)}
    pairs = table[["task", "cohort"]].drop_duplicates().itertuples(index=False, name=None)
    return sorted(pairs, key=lambda tc: (order.get(tc[0], len(order)), tc[0], tc[1] != "base", tc[1]))


def task_label(table: pd.DataFrame, task: str) -> str:
    """The label of a task's overall rows in a per-label table (fairness): the task's own name for a binary task
    (its one output), else the macro average over its labels or classes."""
    return task if ((table["task"] == task) & (table["label"] == task)).any() else MACRO_LABEL


MACRO_LABEL = "macro"


# ------------------------------------------------------------------------------------------------ leaderboard
def significance(
    comparisons: pd.DataFrame, task: str, cohort: str, label: str | None = None
) -> dict[tuple[str, str], dict[str, Any]]:
    """(method, metric) -> the reference comparison row (delta, CI, p, Holm, BH) for one task and cohort."""
    if comparisons.empty:
        return {}
    c = comparisons[
        (comparisons["task"] == task)
        & (comparisons["cohort"] == cohort)
        & (comparisons["comparison"] == "reference")
        & (comparisons["label"] == (label or task))
    ]
    return {(r["method_a"], r["metric"]): r for r in c.to_dict("records")}


def mark(row: dict[str, Any] | None) -> str:
    """★ significantly better than the reference (Holm p < 0.05), ▼ significantly worse, '' otherwise."""
    if row is None or pd.isna(row["p_holm"]) or row["p_holm"] >= ALPHA:
        return ""
    lower = row["metric"] in LOWER_IS_BETTER
    better = (row["delta"] < 0) if lower else (row["delta"] > 0)
    return BETTER if better else WORSE


def leaderboard(
    board: pd.DataFrame,
    comparisons: pd.DataFrame,
    task: str,
    cohort: str,
    reference: str | None,
    selection: str,
    reported: Sequence[str] = (),
    threshold_rule: str = "",
) -> Table:
    """One row per method (best selection metric first): modalities, runs, each of the task's `reported` metrics
    (default: every overall metric of the table) with its CI and mark."""
    b = board[(board["task"] == task) & (board["cohort"] == cohort) & (board["label"] == task)]
    metrics = [m for m in (reported or dict.fromkeys(b["metric"])) if m in set(b["metric"])]
    sig = significance(comparisons, task, cohort)
    order = (
        b[b["metric"] == selection]
        .sort_values(["estimate", "method"], ascending=[False, True])["method"]
        .tolist()
    )
    order += sorted(set(b["method"]) - set(order))
    table = Table(
        ["method", "modalities", "runs (seeds)", *[metric_name(m) for m in metrics]], key="leaderboard"
    )
    for method in order:
        rows = b[b["method"] == method].set_index("metric")
        first = rows.iloc[0]
        cells = [
            Cell(
                method + (" (reference)" if method == reference else ""),
                css="ref" if method == reference else "",
            ),
            Cell(str(first["modalities"])),
            Cell(f"{int(first['n_runs'])} ({int(first['n_seeds'])})"),
        ]
        for m in metrics:
            if m not in rows.index:
                cells.append(Cell("–"))
                continue
            r = rows.loc[m]
            s = sig.get((method, m))
            sym = mark(s)
            title = ""
            if s is not None:
                title = (
                    f"vs {s['method_b']}: Δ {fmt(s['delta'])} [{fmt(s['ci_low'])}, {fmt(s['ci_high'])}], "
                    f"p {fmt_p(s['p_value'])}, Holm {fmt_p(s['p_holm'])}, BH {fmt_p(s['p_bh'])}"
                )
            seeds = f"; seed mean {fmt(r['seed_mean'])} ± {fmt(r['seed_sd'])}" if r["n_seeds"] > 1 else ""
            cells.append(
                Cell(
                    fmt_ci(r["estimate"], r["ci_low"], r["ci_high"]) + (f" {sym}" if sym else ""),
                    value=_num(r["estimate"]),
                    title=(title + seeds).strip("; "),
                    css="sig" if sym == BETTER else "worse" if sym == WORSE else "",
                )
            )
        table.rows.append(cells)
    n = int(b["n_stays"].max()) if len(b) else 0
    rule = {"f1": "the validation score maximising F1", "youden": "the validation score maximising TPR − FPR"}
    thresholds = (
        f" Thresholded metrics at each output's decision threshold chosen on the validation split "
        f"({rule[threshold_rule]}), never at 0.5."
        if threshold_rule in rule
        else ""
    )
    table.caption = (
        f"{task}, {cohort} cohort: {n} test stays. Estimate [95% bootstrap CI]; seeds averaged per "
        f"stay, folds concatenated. {BETTER}/{WORSE}: significantly better/worse than the reference "
        f"{reference or '(none)'} (paired permutation test, Holm-adjusted p < {ALPHA}).{thresholds}"
    )
    return table


def pairwise(comparisons: pd.DataFrame, task: str, cohort: str) -> Table:
    """The pairwise comparisons (analyze --pairs) on the task's overall metrics: delta [CI], p, Holm, BH."""
    c = comparisons[
        (comparisons["task"] == task)
        & (comparisons["cohort"] == cohort)
        & (comparisons["comparison"] == "pairwise")
        & (comparisons["label"] == task)
    ]
    table = Table(["method A", "method B", "metric", "A − B [95% CI]", "p", "p Holm", "p BH"], key="pairwise")
    for r in c.sort_values(["metric", "method_a", "method_b"]).to_dict("records"):
        sig = not pd.isna(r["p_holm"]) and r["p_holm"] < ALPHA
        table.rows.append(
            [
                Cell(r["method_a"]),
                Cell(r["method_b"]),
                Cell(metric_name(r["metric"])),
                Cell(
                    fmt_ci(r["delta"], r["ci_low"], r["ci_high"]),
                    value=_num(r["delta"]),
                    css="sig" if sig else "",
                ),
                Cell(fmt_p(r["p_value"]), _num(r["p_value"])),
                Cell(fmt_p(r["p_holm"]), _num(r["p_holm"])),
                Cell(fmt_p(r["p_bh"]), _num(r["p_bh"])),
            ]
        )
    return table


# ------------------------------------------------------------------------------------------------ cohort
def simple(
    df: pd.DataFrame, columns: dict[str, str], formats: dict[str, str] | None = None, key: str = ""
) -> Table:
    """A table of selected columns (name -> header) with optional per-column formats ('pct', 'num', 'int')."""
    formats = formats or {}
    table = Table(list(columns.values()), key=key)
    for r in df.to_dict("records"):
        cells = []
        for col in columns:
            v = r.get(col)
            kind = formats.get(col)
            if kind == "pct":
                cells.append(Cell("–" if pd.isna(v) else f"{100 * v:.1f}%", _num(v)))
            elif kind == "num":
                cells.append(Cell(fmt(v), _num(v)))
            elif kind == "int":
                cells.append(Cell("–" if pd.isna(v) else str(int(v)), _num(v)))
            else:
                cells.append(Cell(_text(v)))
        table.rows.append(cells)
    return table


# ------------------------------------------------------------------------------------------------ missingness
def degradation(
    curves: pd.DataFrame, task: str, cohort: str, metric: str, missing_aware: Sequence[str] = ()
) -> Table:
    """Per method that reads the X-ray and train/val missing rate: the metric with all test X-rays, with all
    removed (the largest test rate) and the degradation of finding 3 (rate 0 minus the mean over rates > 0)."""
    t = curves[(curves["task"] == task) & (curves["cohort"] == cohort) & (curves["metric"] == metric)]
    t = t[t["uses_cxr"].astype(bool)]
    top = float(t["rate"].max()) if len(t) else 0.0
    table = Table(
        ["method", "missing-aware", "trained at", f"{metric_name(metric)}, all X-rays",
         f"removed {100 * top:.0f}%", "degradation"],
        key="degradation",
    )  # fmt: skip
    aware = set(missing_aware)
    order = {m: i for i, m in enumerate(sorted(t["method"].unique(), key=lambda m: (m not in aware, m)))}
    for tr in sorted(t["train_rate"].unique()):
        drop = mean_drop(t, task, cohort, metric, train_rate=float(tr))
        for method in sorted(drop.index, key=order.__getitem__):
            g = t[(t["method"] == method) & (t["train_rate"] == tr)]
            at0, last = g.loc[g["rate"] == 0.0, "value"], g.loc[g["rate"] == top, "value"]
            table.rows.append(
                [
                    Cell(method),
                    Cell("yes" if method in aware else "no"),
                    Cell(f"{100 * tr:.0f}% missing"),
                    Cell(fmt(at0.iloc[0]) if len(at0) else "–", _num(at0.iloc[0]) if len(at0) else None),
                    Cell(fmt(last.iloc[0]) if len(last) else "–", _num(last.iloc[0]) if len(last) else None),
                    Cell(fmt(drop[method]), _num(drop[method])),
                ]
            )
    return table


def natural(nat: pd.DataFrame, task: str, cohort: str) -> Table:
    """Per method and headline metric: all stays, stays with and without an X-ray, and their difference."""
    t = nat[(nat["task"] == task) & (nat["cohort"] == cohort)]
    table = Table(
        ["method", "metric", "all stays", "with X-ray", "without X-ray", "with − without"], key="natural"
    )
    for (method, metric), g in t.groupby(["method", "metric"], sort=True):
        s = g.set_index("subset")
        cells = [Cell(method), Cell(metric_name(metric))]
        for subset in ("all", "with_cxr", "without_cxr"):
            if subset in s.index:
                r = s.loc[subset]
                cells.append(
                    Cell(
                        f"{fmt_ci(r['value'], r['ci_low'], r['ci_high'])} (n={int(r['n_stays'])})",
                        _num(r["value"]),
                    )
                )
            else:
                cells.append(Cell("–"))
        diff = (
            s.loc["with_cxr", "value"] - s.loc["without_cxr", "value"]
            if {"with_cxr", "without_cxr"} <= set(s.index)
            else np.nan
        )
        cells.append(Cell(fmt(diff), _num(diff)))
        table.rows.append(cells)
    return table


def train_rates(tr: pd.DataFrame, task: str, cohort: str) -> Table:
    """Per method and metric: the test metric of runs trained with each train/validation X-ray missing rate."""
    t = tr[(tr["task"] == task) & (tr["cohort"] == cohort)]
    rates = sorted(t["train_rate"].unique())
    table = Table(["method", "metric", *[f"train/val rate {r:g}" for r in rates]], key="train_rates")
    for (method, metric), g in t.groupby(["method", "metric"], sort=True):
        s = g.set_index("train_rate")
        table.rows.append(
            [Cell(method), Cell(metric_name(metric))]
            + [
                Cell(
                    fmt_ci(s.loc[r, "value"], s.loc[r, "ci_low"], s.loc[r, "ci_high"]),
                    _num(s.loc[r, "value"]),
                )
                if r in s.index
                else Cell("–")
                for r in rates
            ]
        )
    return table


# ------------------------------------------------------------------------------------------------ fairness
def fairness_rows(summary: pd.DataFrame, task: str, cohort: str, metric: str = "auroc") -> pd.DataFrame:
    """Single-attribute rows of the fairness summary for the task's label (binary) or macro average,
    aggregated per (attribute, method): mean gap over runs, CI (one run) or range over runs, worst group."""
    if summary.empty:
        return pd.DataFrame()
    label = task_label(summary, task)
    s = summary[
        (summary["task"] == task)
        & (summary["cohort"] == cohort)
        & (summary["label"] == label)
        & (summary["metric"] == metric)
        & ~summary["attribute"].str.contains(":")
    ]
    rows = []
    for (attribute, method), g in s.groupby(["attribute", "method"], sort=True):
        one = len(g) == 1
        worst = g["worst_group"].dropna()
        rows.append(
            {
                "attribute": attribute,
                "method": method,
                "n_runs": len(g),
                "gap": g["gap"].mean(),
                "low": g["gap_low"].iloc[0] if one else g["gap"].min(),
                "high": g["gap_high"].iloc[0] if one else g["gap"].max(),
                "interval": "95% CI" if one else "range over runs",
                "worst_group": worst.mode().iloc[0] if len(worst) else None,
                "worst_value": g["worst_value"].mean(),
                "n_groups": g["n_groups"].max(),
            }
        )
    return pd.DataFrame(rows)


def fairness(summary: pd.DataFrame, task: str, cohort: str) -> Table:
    """Per attribute and method: AUROC gap (max − min over groups) with CI, worst group, equalized-odds gap."""
    rows = fairness_rows(summary, task, cohort)
    label = task_label(summary, task) if not summary.empty else MACRO_LABEL
    eo = (
        summary[
            (summary["task"] == task)
            & (summary["cohort"] == cohort)
            & (summary["label"] == label)
            & (summary["metric"] == "equalized_odds")
        ]
        if not summary.empty
        else summary
    )
    eo_gap = eo.groupby(["attribute", "method"])["gap"].mean().to_dict() if len(eo) else {}
    table = Table(
        [
            "attribute",
            "method",
            "groups",
            "AUROC gap [interval]",
            "worst group (AUROC)",
            "equalized-odds gap",
        ],
        key="fairness",
    )
    for r in rows.to_dict("records"):
        interval = fmt_ci(r["gap"], r["low"], r["high"]) + ("" if r["n_runs"] == 1 else " (range)")
        worst = f"{r['worst_group']} ({fmt(r['worst_value'])})" if r["worst_group"] else "–"
        table.rows.append(
            [
                Cell(r["attribute"]),
                Cell(r["method"]),
                Cell(fmt(r["n_groups"])),
                Cell(interval, _num(r["gap"])),
                Cell(worst),
                Cell(
                    fmt(eo_gap.get((r["attribute"], r["method"]))),
                    _num(eo_gap.get((r["attribute"], r["method"]))),
                ),
            ]
        )
    return table


# ------------------------------------------------------------------------------------------------ modality
def ablation(abl: pd.DataFrame, task: str, cohort: str) -> Table:
    """Per method and headline metric: full score, delta when the X-ray / the EHR is removed, head scores."""
    t = abl[(abl["task"] == task) & (abl["cohort"] == cohort)]
    heads = sorted({c for c in t["condition"] if c.startswith("head:")})
    table = Table(
        [
            "method",
            "metric",
            "both modalities",
            "Δ X-ray removed [CI]",
            "Δ EHR removed [CI]",
            *[f"{h[5:]} head" for h in heads],
        ],
        key="ablation",
    )
    for (method, metric), g in t.groupby(["method", "metric"], sort=True):
        s = g.set_index("condition")
        cells = [Cell(method), Cell(metric_name(metric))]
        full = s.loc["full"] if "full" in s.index else None
        cells.append(
            Cell(
                fmt_ci(full["value"], full["ci_low"], full["ci_high"]) if full is not None else "–",
                _num(full["value"]) if full is not None else None,
            )
        )
        for cond in ("drop_cxr", "drop_ehr"):
            if cond in s.index:
                r = s.loc[cond]
                cells.append(
                    Cell(fmt_ci(r["delta"], r["delta_ci_low"], r["delta_ci_high"]), _num(r["delta"]))
                )
            else:
                cells.append(Cell("–"))
        for h in heads:
            cells.append(Cell(fmt(s.loc[h, "value"]), _num(s.loc[h, "value"])) if h in s.index else Cell("–"))
        table.rows.append(cells)
    return table


# ------------------------------------------------------------------------------------------------ planted truth
def per_label_task(board: pd.DataFrame, labels: Sequence[str] = ()) -> str | None:
    """The task whose per-label leaderboard rows hold the most of `labels` (all of its labels count when `labels`
    is empty): the multilabel task a planted truth or a label grouping is about."""
    rows = board[(board["label"] != board["task"]) & ~board["label"].astype(str).str.startswith("group:")]
    if labels:
        rows = rows[rows["label"].isin(list(labels))]
    if rows.empty:
        return None
    counts = rows.groupby("task", sort=True)["label"].nunique()
    return str(counts.idxmax())


def planted_kinds(
    board: pd.DataFrame,
    comparisons: pd.DataFrame,
    runs: pd.DataFrame,
    cohort: str = "base",
    task: str | None = None,
) -> pd.DataFrame:
    """Per label of the planted task (`task`, default the one with the most per-label rows), what the benchmark
    concludes about where its signal is:

    ehr_signal: some EHR-only method's AUROC has a CI above 0.5; cxr_signal: the same for an X-ray-only method;
    fusion_gain: some fusion method beats the best unimodal method (Holm p < 0.05, delta > 0). Observed kind:
    'both' if fusion gains or both modalities carry signal, else 'ehr' / 'cxr' for the one that does, else 'none';
    'n/a' when a modality has no unimodal method in the runs.
    """
    task = task or per_label_task(board)
    b = board[
        (board["task"] == task)
        & (board["cohort"] == cohort)
        & (board["metric"] == "auroc")
        & (board["label"] != task)
    ]
    mods = runs.drop_duplicates("model").set_index("model")["modalities"].to_dict()
    ehr_only = [m for m, v in mods.items() if v == "ehr"]
    cxr_only = [m for m, v in mods.items() if v == "cxr"]
    c = (
        comparisons[
            (comparisons["task"] == task)
            & (comparisons["cohort"] == cohort)
            & (comparisons["comparison"] == "reference")
            & (comparisons["metric"] == "auroc")
            & (comparisons["label"] != task)
        ]
        if not comparisons.empty
        else pd.DataFrame()
    )
    rows = []
    for label, g in b.groupby("label", sort=False):

        def best(methods: list[str], g: pd.DataFrame = g) -> dict[str, Any]:
            part = g[g["method"].isin(methods)].sort_values("estimate", ascending=False)
            return part.iloc[0].to_dict() if len(part) else {}

        e, x = best(ehr_only), best(cxr_only)
        gains = c[c["label"] == label] if len(c) else pd.DataFrame()
        top = gains.sort_values("delta", ascending=False).iloc[0].to_dict() if len(gains) else {}
        sig_gain = bool(len(gains) and ((gains["p_holm"] < ALPHA) & (gains["delta"] > 0)).any())
        e_sig = bool(e) and e["ci_low"] > 0.5
        x_sig = bool(x) and x["ci_low"] > 0.5
        if not e or not x:
            observed = "n/a"
        elif sig_gain or (e_sig and x_sig):
            observed = "both"
        else:
            observed = "ehr" if e_sig else "cxr" if x_sig else "none"
        rows.append(
            {
                "label": label,
                "ehr_method": e.get("method"),
                "ehr_auroc": e.get("estimate"),
                "ehr_low": e.get("ci_low"),
                "ehr_high": e.get("ci_high"),
                "cxr_method": x.get("method"),
                "cxr_auroc": x.get("estimate"),
                "cxr_low": x.get("ci_low"),
                "cxr_high": x.get("ci_high"),
                "fusion_method": top.get("method_a"),
                "fusion_delta": top.get("delta"),
                "fusion_p_holm": top.get("p_holm"),
                "fusion_gain": sig_gain,
                "observed": observed,
            }
        )
    return pd.DataFrame(rows)


def planted(planted_truth: dict[str, Any], observed: pd.DataFrame) -> tuple[Table, int, int]:
    """Planted kind vs observed kind per label (planted.json's `phenotypes`: label -> kind); returns the table,
    agreements and labels compared."""
    kinds = planted_truth.get("phenotypes", {})
    obs = observed.set_index("label") if len(observed) else pd.DataFrame()
    table = Table(
        [
            "phenotype",
            "planted",
            "best EHR-only AUROC [CI]",
            "best X-ray-only AUROC [CI]",
            "best fusion Δ vs reference (Holm p)",
            "observed",
            "agrees",
        ],
        key="planted",
    )
    agree = compared = 0
    for label, kind in kinds.items():
        if label not in obs.index:
            table.rows.append(
                [Cell(label), Cell(kind), Cell("–"), Cell("–"), Cell("–"), Cell("not analysed"), Cell("")]
            )
            continue
        r = obs.loc[label]
        ok = r["observed"] == kind
        if r["observed"] != "n/a":
            compared += 1
            agree += int(ok)
        fusion = (
            "–"
            if pd.isna(r["fusion_delta"])
            else f"{r['fusion_method']}: {fmt(r['fusion_delta'])} ({fmt_p(r['fusion_p_holm'])})"
        )
        table.rows.append(
            [
                Cell(label),
                Cell(kind),
                Cell(
                    f"{r['ehr_method']}: {fmt_ci(r['ehr_auroc'], r['ehr_low'], r['ehr_high'])}"
                    if r["ehr_method"]
                    else "–",
                    _num(r["ehr_auroc"]),
                ),
                Cell(
                    f"{r['cxr_method']}: {fmt_ci(r['cxr_auroc'], r['cxr_low'], r['cxr_high'])}"
                    if r["cxr_method"]
                    else "–",
                    _num(r["cxr_auroc"]),
                ),
                Cell(fusion, _num(r["fusion_delta"])),
                Cell(r["observed"]),
                Cell(
                    "" if r["observed"] == "n/a" else "✓" if ok else "✗",
                    css="" if r["observed"] == "n/a" else "sig" if ok else "worse",
                ),
            ]
        )
    return table, agree, compared


def label_groups(
    board: pd.DataFrame,
    comparisons: pd.DataFrame,
    runs: pd.DataFrame,
    groups: dict[str, list[str]] | None = None,
    cohort: str = "base",
    task: str | None = None,
) -> Table | None:
    """Per label group (analyze --label-groups) of a multilabel task (`task`, default the one with the most
    per-label rows): best EHR-only, X-ray-only and fusion macro AUROC with CIs, and the fusion methods
    significantly better than the group's best unimodal method (Holm p < ALPHA, delta > 0)."""
    task = task or per_label_task(board) if len(board) else task
    b = (
        board[
            (board["task"] == task)
            & (board["cohort"] == cohort)
            & (board["metric"] == "auroc_macro")
            & board["label"].astype(str).str.startswith("group:")
        ]
        if len(board)
        else board
    )
    if b.empty:
        return None
    mods = runs.drop_duplicates("model").set_index("model")["modalities"].to_dict()
    c = (
        comparisons[
            (comparisons["task"] == task)
            & (comparisons["cohort"] == cohort)
            & (comparisons["family"] == f"{task}:reference:auroc_macro:group")
        ]
        if len(comparisons)
        else pd.DataFrame(columns=["label"])
    )
    groups = groups or {}
    table = Table(
        [
            "group",
            "labels",
            "best EHR-only [CI]",
            "best X-ray-only [CI]",
            "best fusion [CI]",
            "reference",
            "fusion significantly better (Holm p)",
        ],
        key="label_groups",
        caption="Macro AUROC over each group's labels (test stays); fusion methods tested against the "
        f"group's best unimodal method, Holm-adjusted over methods × groups, p < {ALPHA}.",
    )
    for label, g in b.groupby("label", sort=False):
        name = str(label).removeprefix("group:")

        def best(kind: str, g: pd.DataFrame = g) -> Cell:
            part = g[g["method"].map(mods) == kind].sort_values("estimate", ascending=False)
            if part.empty:
                return Cell("–")
            r = part.iloc[0]
            return Cell(
                f"{r['method']}: {fmt_ci(r['estimate'], r['ci_low'], r['ci_high'])}", _num(r["estimate"])
            )

        rows = c[c["label"] == label]
        sig = rows[(rows["p_holm"] < ALPHA) & (rows["delta"] > 0)].sort_values("p_holm")
        n_labels = len(groups.get(name, []))
        table.rows.append(
            [
                Cell(name),
                Cell(str(n_labels) if n_labels else "–", n_labels or None),
                best("ehr"),
                best("cxr"),
                best("ehr+cxr"),
                Cell(", ".join(sorted(set(rows["method_b"]))) or "–"),
                Cell(
                    ", ".join(
                        f"{r['method_a']} (+{fmt(r['delta'])}, {fmt_p(r['p_holm'])})"
                        for _, r in sig.iterrows()
                    )
                    or "none",
                    len(sig),
                    css="sig" if len(sig) else "",
                ),
            ]
        )
    return table


def planted_subgroup(planted_truth: dict[str, Any], summary: pd.DataFrame) -> Table | None:
    """Worst AUROC group of the planted subgroup's attribute per method and task (fairness summary)."""
    sub = planted_truth.get("subgroup") or {}
    attribute, value = sub.get("attribute"), sub.get("value")
    if not attribute or summary.empty:
        return None
    s = summary[
        (summary["attribute"] == attribute)
        & (summary["metric"] == "auroc")
        & ((summary["label"] == summary["task"]) | (summary["label"] == MACRO_LABEL))
    ]
    table = Table(
        ["task", "cohort", "method", f"worst {attribute} group (AUROC)", "is the planted group"],
        key="planted_subgroup",
    )
    for (task, cohort, method), g in s.groupby(["task", "cohort", "method"], sort=True):
        worst = g["worst_group"].dropna()
        w = worst.mode().iloc[0] if len(worst) else None
        table.rows.append(
            [
                Cell(task),
                Cell(cohort),
                Cell(method),
                Cell(f"{w} ({fmt(g['worst_value'].mean())})" if w else "–"),
                Cell("–" if w is None else "yes" if w == value else "no"),
            ]
        )
    return table


# ------------------------------------------------------------------------------------------------ findings
VERDICT_CSS = {"supported": "sig", "not supported": "worse"}


# what n_significant of n_tested counts, per finding (finding 3 is one test over methods: no count)
SIGNIFICANT_UNITS = {
    1: "fusion methods better",
    2: "cross-modal methods better",
    4: "attributes with a smaller fusion gap",
}


def findings(table: pd.DataFrame) -> Table:
    """The findings table (analysis.findings): one row per finding x task x cohort, verdict first; per-method
    numbers in the hover text of the effect cell (aggregates only)."""
    out = Table(
        [
            "#",
            "task",
            "cohort",
            "finding",
            "verdict",
            "effect [CI]",
            "p",
            "compared",
            "runs",
            "significant",
            "why",
        ],
        key="findings",
        caption=f"Rules (docs/findings.md): significant = p < {ALPHA} (Holm-adjusted where several tests) and the "
        "confidence interval of the difference above 0. Effect definitions and per-method numbers: hover the effect "
        "or see findings.csv.",
    )
    if table is None or table.empty:
        return out
    for r in table.to_dict("records"):
        a, b = _text(r["method_a"]), _text(r["method_b"])
        compared = a if not b else f"{a or '–'} vs {b}"
        labels = _text(r["labels"]).replace(";", ", ")
        unit = SIGNIFICANT_UNITS.get(int(r["finding"]))
        sig = f"{int(r['n_significant'])} of {int(r['n_tested'])} {unit}" if unit and r["n_tested"] else ""
        if labels:
            sig += (
                ("; " if sig else "")
                + {1: "labels: ", 2: "", 4: "attributes: "}.get(int(r["finding"]), "")
                + labels
            )
        out.rows.append(
            [
                Cell(str(int(r["finding"]))),
                Cell(r["task"]),
                Cell(r["cohort"]),
                Cell(r["statement"]),
                Cell(r["verdict"], css=VERDICT_CSS.get(r["verdict"], "")),
                Cell(
                    fmt_ci(r["effect"], r["ci_low"], r["ci_high"]),
                    _num(r["effect"]),
                    title=f"{r['effect_definition']} ({r['metric']}). {_text(r['detail'])}".strip(),
                ),
                Cell(fmt_p(r["p_value"]), _num(r["p_value"]), title=_text(r["p_adjustment"])),
                Cell(compared or "–"),
                Cell(str(int(r["n_runs"])), float(r["n_runs"])),
                Cell(sig or "–"),
                Cell(_text(r["reason"])),
            ]
        )
    return out


NOT_DECIDED = {
    1: "not decided: signal on both sides, but how much fusion gains on this task is not fixed by the generator",
    2: "not decided: late fusion can learn the additive AND rules; only the one XOR label needs a joint model",
    3: "not decided: test-time X-ray removal is random; robustness is a property of the methods, not of the data",
    4: "not decided: the subgroup's EHR is degraded, its X-rays are not; whether fusion narrows the gap depends "
    "on how a method weighs the two",
}


def planted_findings(
    planted_truth: dict[str, Any], table: pd.DataFrame, task: str | None
) -> tuple[Table, int, int]:
    """Per finding row: what the planted truth predicts where it decides it (finding 1 on the planted task `task`:
    supported, and no `none` label among the labels where fusion is significantly better), the verdict,
    agreement."""
    kinds = planted_truth.get("phenotypes", {})
    out = Table(["#", "task", "cohort", "planted truth predicts", "verdict (significant labels)", "agrees"],
                key="planted_findings")  # fmt: skip
    agree = compared = 0
    if table is None or table.empty:
        return out, 0, 0
    for r in table.to_dict("records"):
        finding, labels = int(r["finding"]), [x for x in _text(r["labels"]).split(";") if x]
        decided = finding == 1 and r["task"] == task and "both" in kinds.values()
        observed = r["verdict"] + (f" ({', '.join(labels)})" if finding == 1 and labels else "")
        if not decided:
            out.rows.append([Cell(str(finding)), Cell(r["task"]), Cell(r["cohort"]), Cell(NOT_DECIDED[finding]),
                             Cell(observed), Cell("")])  # fmt: skip
            continue
        none_hit = sorted(x for x in labels if kinds.get(x) == "none")
        expect = (
            "supported: the 'both' phenotypes need the two modalities together; no 'none' phenotype among the "
            "significant labels"
        )
        if r["verdict"].startswith("undetermined"):
            mark, css = "", ""
        else:
            ok = r["verdict"] == "supported" and not none_hit
            compared += 1
            agree += int(ok)
            mark, css = ("✓", "sig") if ok else ("✗", "worse")
            if none_hit:
                observed += f"; 'none' phenotypes: {', '.join(none_hit)}"
        out.rows.append([Cell(str(finding)), Cell(r["task"]), Cell(r["cohort"]), Cell(expect), Cell(observed),
                         Cell(mark, css=css)])  # fmt: skip
    return out, agree, compared
