"""The paper's four findings as explicit tests on the user's runs: verdict, effect size, CI and p-value.

Why a module of its own: the other analysis tables answer "how good is each method"; a reader of a fusion
benchmark wants the four claims of the paper checked on *their* data, each with one rule that can be read and
re-computed. Every number here comes from a table `carebench analyze` already computed (comparisons,
missingness_test, fairness_summary, leaderboard), so `findings_table` is a function of tables and is unit-tested
on constructed ones. docs/findings.md states every rule; in short, per task x cohort, on the task's selection
metric M (`TaskSpec.selection_metric`: AUPRC for a binary task, macro AUPRC for a multilabel one, macro one-vs-rest
AUROC for a multiclass one, unless the task declares otherwise):

1. `fusion_vs_unimodal`: the best fusion method vs the reference (best unimodal method): supported iff its
   Holm-adjusted permutation p < alpha and the CI of the difference lies above 0. `labels`: the labels on which
   some fusion method is significantly better than the reference (per-label family, Holm).
2. `cross_modal_vs_late`: every cross-modal method (fusion other than latefusion) vs latefusion, Holm over
   those methods: supported iff a strict majority are significantly better (p < alpha and CI above 0).
3. `missing_robustness`: degradation = M at test missing rate 0 minus the mean of M over the rates > 0 (main
   runs); difference of means, other fusion methods minus missing-aware ones, exact permutation p over methods
   and a percentile bootstrap CI over methods: supported iff p < alpha and the CI lies above 0.
4. `fairness_gap`: the AUROC gap (max - min over the groups of an attribute) of the best fusion method vs the
   reference, on the attribute where the reference's gap is largest: supported ("fusion does not reduce it")
   unless the fusion gap is significantly smaller (its CI entirely below the reference's CI).

A verdict is `supported`, `not supported`, `undetermined (too few runs)` (the methods a rule needs are not in
the runs) or `undetermined (not analysed)` (the table it needs was not computed, e.g. fairness disabled);
`reason` says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from carebench.evaluation.multiplicity import holm
from carebench.evaluation.options import DEFAULTS
from carebench.tasks import get_task

ALPHA = 0.05
LATE_FUSION = "latefusion"
FAIRNESS_METRIC = "auroc"
EXCLUDED_ATTRIBUTES = ("has_cxr",)  # X-ray availability is the missingness itself, not a patient subgroup

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
TOO_FEW = "undetermined (too few runs)"
NOT_ANALYSED = "undetermined (not analysed)"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, TOO_FEW, NOT_ANALYSED)

STATEMENTS = {
    1: ("fusion_vs_unimodal", "Fusion beats the best unimodal model with complete modalities"),
    2: ("cross_modal_vs_late", "Cross-modal fusion methods beat late fusion (concatenation)"),
    3: (
        "missing_robustness",
        "Under missing X-rays, fusion methods built for incomplete inputs degrade less than the others",
    ),
    4: ("fairness_gap", "Fusion does not reduce the largest subgroup gap"),
}
EFFECTS = {
    1: "M(best fusion) - M(best unimodal)",
    2: "median over cross-modal methods of M(method) - M(latefusion)",
    3: "mean degradation of other fusion methods - mean degradation of missing-aware ones; degradation = "
    "M at test missing rate 0 - mean of M over the rates > 0",
    4: "AUROC gap(best fusion) - AUROC gap(best unimodal) on the attribute where the latter is largest",
}
COLUMNS = [
    "finding",
    "key",
    "task",
    "cohort",
    "statement",
    "verdict",
    "reason",
    "metric",
    "effect",
    "effect_definition",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjustment",
    "method_a",
    "method_b",
    "methods",
    "n_tested",
    "n_significant",
    "labels",
    "n_runs",
    "detail",
]


@dataclass(frozen=True)
class Role:
    """What a method is, from its registered class: the modalities it reads and `missing_aware`."""

    modalities: tuple[str, ...]
    missing_aware: bool = False

    @property
    def fusion(self) -> bool:
        return len(self.modalities) > 1

    @property
    def unimodal(self) -> bool:
        return len(self.modalities) == 1


def _row(finding: int, task: str, cohort: str, metric: str, **values) -> dict:
    key, statement = STATEMENTS[finding]
    row = dict.fromkeys(COLUMNS, np.nan)
    row.update(
        {
            "finding": finding,
            "key": key,
            "task": task,
            "cohort": cohort,
            "statement": statement,
            "metric": metric,
            "effect_definition": EFFECTS[finding],
            "reason": "",
            "p_adjustment": "",
            "method_a": "",
            "method_b": "",
            "methods": "",
            "labels": "",
            "detail": "",
            "n_tested": 0,
            "n_significant": 0,
            "n_runs": 0,
        }
    )
    row.update(values)
    return row


def _select(df: pd.DataFrame, **eq) -> pd.DataFrame:
    if df is None or df.empty or any(k not in df.columns for k in eq):
        return pd.DataFrame(columns=[] if df is None else df.columns)
    mask = np.ones(len(df), dtype=bool)
    for k, v in eq.items():
        mask &= (df[k] == v).to_numpy()
    return df[mask]


def _n_runs(board: pd.DataFrame, task: str, cohort: str, metric: str, methods: Sequence[str]) -> int:
    b = _select(board, task=task, cohort=cohort, label=task, metric=metric)
    if b.empty or "n_runs" not in b.columns:
        return 0
    return int(b[b["method"].isin(list(methods))].drop_duplicates("method")["n_runs"].sum())


def _fmt(x: float) -> str:
    return "nan" if pd.isna(x) else f"{x:+.4f}"


def _why(p: float, lo: float, alpha: float) -> str:
    """Why a difference is or is not significant, in words (p < alpha and CI above 0 are both required)."""
    p_ok, ci_ok = bool(p < alpha), bool(lo > 0)
    if p_ok and ci_ok:
        return "p < alpha and CI above 0"
    return f"p {'<' if p_ok else '>='} alpha, CI {'above 0' if ci_ok else 'not above 0'}"


def _board_methods(board: pd.DataFrame, task: str, cohort: str) -> set[str]:
    """The methods with a leaderboard row for (task, cohort)."""
    return set(_select(board, task=task, cohort=cohort)["method"]) if not board.empty else set()


def _best_fusion(comparisons: pd.DataFrame, task: str, cohort: str, metric: str) -> pd.Series | None:
    """The reference-comparison row of the fusion method with the largest difference to the reference on
    `metric` (ties: alphabetical), or None without reference comparisons."""
    c = _select(comparisons, task=task, cohort=cohort, comparison="reference", label=task, metric=metric)
    if c.empty:
        return None
    return c.sort_values(["delta", "method_a"], ascending=[False, True], kind="stable").iloc[0]


# ------------------------------------------------------------------------------------------------ finding 1
def fusion_vs_unimodal(
    comparisons: pd.DataFrame,
    board: pd.DataFrame,
    roles: Mapping[str, Role],
    task: str,
    cohort: str,
    alpha: float = ALPHA,
) -> dict:
    metric = get_task(task).selection_metric
    methods = _board_methods(board, task, cohort)
    fusion = sorted(m for m in methods if m in roles and roles[m].fusion)
    unimodal = sorted(m for m in methods if m in roles and roles[m].unimodal)
    best = _best_fusion(comparisons, task, cohort, metric)
    if not fusion or not unimodal or best is None:
        return _row(
            1,
            task,
            cohort,
            metric,
            verdict=TOO_FEW,
            reason=f"needs a fusion and a unimodal method; fusion: {fusion or 'none'}, "
            f"unimodal: {unimodal or 'none'}",
            methods=", ".join(fusion + unimodal),
        )
    ref = str(best["method_b"])
    c = _select(comparisons, task=task, cohort=cohort, comparison="reference", label=task, metric=metric)
    sig = c[(c["p_holm"] < alpha) & (c["ci_low"] > 0)]
    ok = bool(best["p_holm"] < alpha and best["ci_low"] > 0)
    labels: list[str] = []
    if get_task(task).kind == "multilabel":
        per = _select(
            comparisons,
            task=task,
            cohort=cohort,
            comparison="reference",
            metric=metric.removesuffix("_macro"),
        )
        per = per[(per["label"] != task) & ~per["label"].astype(str).str.startswith("group:")]
        labels = sorted(set(per.loc[(per["p_holm"] < alpha) & (per["ci_low"] > 0), "label"]))
    elif ok:
        labels = [task]
    detail = "; ".join(
        f"{r.method_a} {_fmt(r.delta)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] p_holm={r.p_holm:.3g}"
        for r in c.sort_values("method_a").itertuples()
    )
    return _row(
        1,
        task,
        cohort,
        metric,
        verdict=SUPPORTED if ok else NOT_SUPPORTED,
        reason=(
            f"best fusion {best['method_a']} vs best unimodal {ref} (Holm): "
            + _why(best["p_holm"], best["ci_low"], alpha)
        ),
        effect=float(best["delta"]),
        ci_low=float(best["ci_low"]),
        ci_high=float(best["ci_high"]),
        p_value=float(best["p_holm"]),
        p_adjustment="holm over the fusion methods vs the reference",
        method_a=str(best["method_a"]),
        method_b=ref,
        methods=", ".join([*sorted(c["method_a"]), ref]),
        n_tested=len(c),
        n_significant=len(sig),
        labels=";".join(labels),
        n_runs=_n_runs(board, task, cohort, metric, [best["method_a"], ref]),
        detail=detail,
    )


# ------------------------------------------------------------------------------------------------ finding 2
def cross_modal_vs_late(
    comparisons: pd.DataFrame,
    board: pd.DataFrame,
    roles: Mapping[str, Role],
    task: str,
    cohort: str,
    alpha: float = ALPHA,
) -> dict:
    metric = get_task(task).selection_metric
    methods = _board_methods(board, task, cohort)
    cross = sorted(m for m in methods if m in roles and roles[m].fusion and m != LATE_FUSION)
    if LATE_FUSION not in methods or not cross:
        return _row(
            2,
            task,
            cohort,
            metric,
            verdict=TOO_FEW,
            reason=f"needs {LATE_FUSION} and a cross-modal fusion method; "
            f"{LATE_FUSION}: {'yes' if LATE_FUSION in methods else 'no'}, cross-modal: {cross or 'none'}",
            methods=", ".join(cross),
        )
    pw = _select(comparisons, task=task, cohort=cohort, comparison="pairwise", label=task, metric=metric)
    rows = []
    for m in cross if not pw.empty else []:
        hit = pw[(pw["method_a"] == m) & (pw["method_b"] == LATE_FUSION)]
        flip = hit.empty
        if flip:
            hit = pw[(pw["method_a"] == LATE_FUSION) & (pw["method_b"] == m)]
        if hit.empty:
            continue
        r = hit.iloc[0]
        sign = -1.0 if flip else 1.0
        lo, hi = sorted((sign * float(r["ci_low"]), sign * float(r["ci_high"])))
        rows.append({"method": m, "delta": sign * float(r["delta"]), "ci_low": lo, "ci_high": hi,
                     "p_value": float(r["p_value"])})  # fmt: skip
    if not rows:
        return _row(2, task, cohort, metric, verdict=TOO_FEW, reason="no pairwise comparison with latefusion")
    t = pd.DataFrame(rows)
    t["p_holm"] = holm(t["p_value"].to_numpy())
    better = t[(t["p_holm"] < alpha) & (t["ci_low"] > 0)]
    k, n = len(t), len(better)
    ok = n > k / 2
    return _row(
        2,
        task,
        cohort,
        metric,
        verdict=SUPPORTED if ok else NOT_SUPPORTED,
        reason=f"{n} of {k} cross-modal methods significantly better than {LATE_FUSION} "
        f"({'a' if ok else 'not a'} strict majority)",
        effect=float(np.median(t["delta"])),
        p_adjustment="holm over the cross-modal methods vs latefusion (per-method p in detail)",
        method_a="; ".join(t["method"]),
        method_b=LATE_FUSION,
        methods=", ".join([*t["method"], LATE_FUSION]),
        n_tested=k,
        n_significant=n,
        labels=";".join(better["method"]),
        n_runs=_n_runs(board, task, cohort, metric, [*t["method"], LATE_FUSION]),
        detail="; ".join(
            f"{r.method} {_fmt(r.delta)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] p_holm={r.p_holm:.3g}"
            for r in t.itertuples()
        ),
    )


# ------------------------------------------------------------------------------------------------ finding 3
def degradation(
    curves: pd.DataFrame, task: str, cohort: str, metric: str, train_rate: float = 0.0
) -> pd.Series:
    """Per method, runs trained at `train_rate` (default 0, the main runs): M at test missing rate 0 minus the mean
    of M over the rates > 0."""
    c = _select(curves, task=task, cohort=cohort, metric=metric)
    if c.empty:
        return pd.Series(dtype=float)
    c = c[c["train_rate"] == train_rate]
    out = {}
    for method, g in c.groupby("method", sort=True):
        at0, later = g.loc[g["rate"] == 0.0, "value"], g.loc[g["rate"] > 0.0, "value"]
        if len(at0) and len(later):
            out[str(method)] = float(at0.iloc[0] - later.mean())
    return pd.Series(out, dtype=float)


def missing_robustness(
    curves: pd.DataFrame,
    board: pd.DataFrame,
    roles: Mapping[str, Role],
    task: str,
    cohort: str,
    *,
    alpha: float = ALPHA,
    confidence: float = DEFAULTS.confidence,
    n_resamples: int = DEFAULTS.n_bootstrap,
    n_permutations: int = DEFAULTS.n_permutations,
    seed: int = DEFAULTS.seed,
) -> dict:
    metric = get_task(task).selection_metric
    if curves is None or curves.empty or _select(curves, task=task, cohort=cohort).empty:
        return _row(
            3,
            task,
            cohort,
            metric,
            verdict=NOT_ANALYSED,
            reason="no test-time missingness curves (analyze --skip-missingness, or no X-ray run with a checkpoint)",
        )
    deg = degradation(curves, task, cohort, metric)
    if deg.empty:
        return _row(3, task, cohort, metric, verdict=NOT_ANALYSED, reason="the curves have no test rate > 0")
    fusion = [m for m in deg.index if m in roles and roles[m].fusion]
    aware = sorted(m for m in fusion if roles[m].missing_aware)
    other = sorted(m for m in fusion if not roles[m].missing_aware)
    detail = "; ".join(f"{m}{' (aware)' if m in aware else ''} {_fmt(deg[m])}" for m in aware + other)
    base = {"methods": ", ".join(aware + other), "detail": detail, "method_a": "; ".join(other),
            "method_b": "; ".join(aware), "n_runs": _n_runs(board, task, cohort, metric, aware + other)}  # fmt: skip
    if len(aware) < 2 or len(other) < 2:
        return _row(
            3,
            task,
            cohort,
            metric,
            verdict=TOO_FEW,
            reason=f"needs at least 2 missing-aware and 2 other fusion methods with curves; "
            f"missing-aware: {aware or 'none'}, other: {other or 'none'}",
            **base,
        )
    x, y = deg[other].to_numpy(), deg[aware].to_numpy()

    def diff(a, b, axis=-1):
        return np.mean(a, axis=axis) - np.mean(b, axis=axis)

    perm = stats.permutation_test(
        (x, y), diff, permutation_type="independent", alternative="two-sided", n_resamples=n_permutations,
        vectorized=True, random_state=seed,
    )  # fmt: skip
    boot = stats.bootstrap(
        (x, y), diff, method="percentile", confidence_level=confidence, n_resamples=n_resamples,
        vectorized=True, random_state=seed,
    )  # fmt: skip
    effect, lo, hi = (
        float(diff(x, y)),
        float(boot.confidence_interval.low),
        float(boot.confidence_interval.high),
    )
    p = float(perm.pvalue)
    ok = p < alpha and lo > 0
    return _row(
        3,
        task,
        cohort,
        metric,
        verdict=SUPPORTED if ok else NOT_SUPPORTED,
        reason=f"{len(other)} other vs {len(aware)} missing-aware fusion methods: " + _why(p, lo, alpha),
        effect=effect,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        p_adjustment="none (one test); permutation over methods",
        n_tested=len(aware) + len(other),
        **base,
    )


# ------------------------------------------------------------------------------------------------ finding 4
def method_gaps(summary: pd.DataFrame, task: str, cohort: str, method: str) -> pd.DataFrame:
    """Per single attribute (not has_cxr): a method's AUROC gap on the task's label (binary) or the macro label,
    the mean over its runs, with the mean of the runs' bootstrap CI bounds."""
    label = task if get_task(task).kind == "binary" else "macro"
    s = _select(summary, task=task, cohort=cohort, method=method, label=label, metric=FAIRNESS_METRIC)
    if s.empty:
        return pd.DataFrame(columns=["gap", "low", "high", "n_runs"])
    s = s[~s["attribute"].astype(str).str.contains(":") & ~s["attribute"].isin(EXCLUDED_ATTRIBUTES)]
    s = s[s["gap"].notna()]
    return s.groupby("attribute", sort=True).agg(
        gap=("gap", "mean"), low=("gap_low", "mean"), high=("gap_high", "mean"), n_runs=("gap", "size")
    )


def fairness_gap(
    summary: pd.DataFrame,
    comparisons: pd.DataFrame,
    board: pd.DataFrame,
    task: str,
    cohort: str,
) -> dict:
    metric = get_task(task).selection_metric
    if summary is None or summary.empty:
        return _row(
            4, task, cohort, FAIRNESS_METRIC, verdict=NOT_ANALYSED,
            reason="no fairness tables (fairness disabled: analyze --skip-fairness or plan fairness.enabled: false)",
        )  # fmt: skip
    best = _best_fusion(comparisons, task, cohort, metric)
    if best is None:
        return _row(
            4, task, cohort, FAIRNESS_METRIC, verdict=TOO_FEW,
            reason="needs a fusion and a unimodal method (no comparison with the best unimodal method)",
        )  # fmt: skip
    fusion, ref = str(best["method_a"]), str(best["method_b"])
    gf, gu = method_gaps(summary, task, cohort, fusion), method_gaps(summary, task, cohort, ref)
    common = sorted(set(gf.index) & set(gu.index))
    base = {"method_a": fusion, "method_b": ref, "methods": f"{fusion}, {ref}",
            "n_runs": _n_runs(board, task, cohort, metric, [fusion, ref])}  # fmt: skip
    if not common:
        return _row(
            4, task, cohort, FAIRNESS_METRIC, verdict=TOO_FEW,
            reason=f"no attribute with an AUROC gap for both {fusion} and {ref}", **base,
        )  # fmt: skip
    gf, gu = gf.loc[common], gu.loc[common]
    reduced = gf["high"] < gu["low"]
    top = max(common, key=lambda a: (gu.loc[a, "gap"], [-ord(ch) for ch in a]))
    ok = not bool(reduced[top])
    return _row(
        4,
        task,
        cohort,
        FAIRNESS_METRIC,
        verdict=SUPPORTED if ok else NOT_SUPPORTED,
        reason=f"largest gap of {ref}: {top}; fusion {fusion} gap "
        + ("not significantly smaller" if ok else "significantly smaller (CIs disjoint)"),
        effect=float(gf.loc[top, "gap"] - gu.loc[top, "gap"]),
        ci_low=float(gf.loc[top, "low"] - gu.loc[top, "high"]),
        ci_high=float(gf.loc[top, "high"] - gu.loc[top, "low"]),
        p_adjustment="no p-value: significance = disjoint bootstrap CIs of the two gaps",
        n_tested=len(common),
        n_significant=int(reduced.sum()),
        labels=";".join(a for a in common if reduced[a]),
        detail="; ".join(
            f"{a}: {fusion} {gf.loc[a, 'gap']:.4f} [{gf.loc[a, 'low']:.4f}, {gf.loc[a, 'high']:.4f}] vs {ref} "
            f"{gu.loc[a, 'gap']:.4f} [{gu.loc[a, 'low']:.4f}, {gu.loc[a, 'high']:.4f}]"
            for a in common
        ),
        **base,
    )


# ------------------------------------------------------------------------------------------------ table
def findings_table(
    tables: Mapping[str, pd.DataFrame],
    roles: Mapping[str, Role],
    *,
    alpha: float = ALPHA,
    confidence: float = DEFAULTS.confidence,
    n_resamples: int = DEFAULTS.n_bootstrap,
    n_permutations: int = DEFAULTS.n_permutations,
    seed: int = DEFAULTS.seed,
    tasks: Sequence[str] = (),
) -> pd.DataFrame:
    """Four rows (findings 1-4) per task x cohort of the leaderboard, from the analysis tables `leaderboard`,
    `comparisons`, `missingness_test` and `fairness_summary` (an absent table = not analysed). Tasks in the
    order of `tasks` (the dataset's declaration order; others after them, by name), base cohort first."""
    board = tables.get("leaderboard", pd.DataFrame())
    comp = tables.get("comparisons", pd.DataFrame())
    curves = tables.get("missingness_test", pd.DataFrame())
    fair = tables.get("fairness_summary", pd.DataFrame())
    rows = []
    if board.empty:
        return pd.DataFrame(columns=COLUMNS)
    order = {t: i for i, t in enumerate(tasks)}
    groups = sorted(
        board[["task", "cohort"]].drop_duplicates().itertuples(index=False, name=None),
        key=lambda tc: (order.get(tc[0], len(order)), tc[0], tc[1] != "base", tc[1]),
    )
    for task, cohort in groups:
        rows.append(fusion_vs_unimodal(comp, board, roles, task, cohort, alpha))
        rows.append(cross_modal_vs_late(comp, board, roles, task, cohort, alpha))
        rows.append(
            missing_robustness(
                curves,
                board,
                roles,
                task,
                cohort,
                alpha=alpha,
                confidence=confidence,
                n_resamples=n_resamples,
                n_permutations=n_permutations,
                seed=seed,
            )
        )
        rows.append(fairness_gap(fair, comp, board, task, cohort))
    out = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("finding", "n_tested", "n_significant", "n_runs"):
        out[col] = out[col].astype("int64")
    return out
