"""The report's figures, drawn with matplotlib (Agg backend) and embedded as base64 PNG data URIs.

Why PNG data URIs: the report must be one self-contained file that opens anywhere without network access or
JavaScript. PNGs are written without the software tag so the same analysis gives byte-identical figures.
Every function takes analysis tables and returns a data URI, or None when there is nothing to draw.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable, Mapping, Sequence
from typing import ParamSpec

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from carebench.report.tables import ALPHA, fairness_rows, metric_name, task_label

P = ParamSpec("P")
DPI = 110
# Okabe-Ito (colour-blind safe, without its yellow) then distinct tab10 colours.
PALETTE = (
    "#0072B2",
    "#D55E00",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#000000",
    "#8C564B",
    "#7F7F7F",
    "#BCBD22",
    "#9467BD",
    "#17BECF",
)
STYLE = {
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "legend.frameon": False,
}


def _styled(fn: Callable[P, str | None]) -> Callable[P, str | None]:
    """Draw with the report's style without changing matplotlib's global settings."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> str | None:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _subplots(figsize: tuple[float, float], *args: int, **kwargs) -> tuple[Figure, object]:
    """A figure outside pyplot (no global figure registry, no interactive backend: rendered by Agg)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def colors(methods: Sequence[str]) -> dict[str, str]:
    """A fixed colour per method (alphabetical order), shared by every figure of the report."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(sorted(methods))}


def short_label(label: str, width: int = 30) -> str:
    text = label.replace("_", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


@_styled
def fusion_gain_heatmap(
    comparisons: pd.DataFrame,
    task: str,
    cohort: str,
    metric: str = "auroc",
    names: Mapping[str, str] | None = None,
) -> str | None:
    """Methods x labels of a multilabel task: delta of `metric` vs the best unimodal method; significant cells
    (Holm) marked. `names`: display names of the labels (the dataset's label names)."""
    if comparisons.empty:
        return None
    c = comparisons[
        (comparisons["task"] == task)
        & (comparisons["cohort"] == cohort)
        & (comparisons["comparison"] == "reference")
        & (comparisons["metric"] == metric)
        & (comparisons["label"] != task)
        & ~comparisons["label"].astype(str).str.startswith("group:")
    ]
    if c.empty:
        return None
    labels = list(dict.fromkeys(c["label"]))
    methods = sorted(c["method_a"].unique())
    delta = c.pivot(index="method_a", columns="label", values="delta").reindex(index=methods, columns=labels)
    p = c.pivot(index="method_a", columns="label", values="p_holm").reindex(index=methods, columns=labels)
    values = delta.to_numpy(dtype=float)
    lim = max(0.02, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.02)
    fig, ax = _subplots((max(7.0, 0.34 * len(labels) + 2.5), 0.45 * len(methods) + 2.6))
    im = ax.imshow(values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    names = names or {}
    ax.set_xticks(range(len(labels)), [short_label(names.get(x, x)) for x in labels], rotation=60, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    for i in range(len(methods)):
        for j in range(len(labels)):
            if np.isnan(values[i, j]):
                ax.text(j, i, "–", ha="center", va="center", fontsize=7, color="#777")
            elif p.iat[i, j] < ALPHA:
                ax.text(
                    j,
                    i,
                    "★",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if abs(values[i, j]) > 0.6 * lim else "black",
                )
    ax.spines[:].set_visible(False)
    ref = c["method_b"].iloc[0]
    ax.set_title(
        f"Per-label fusion gain ({task}): Δ{metric_name(metric)} vs best unimodal ({ref}); ★ Holm p < {ALPHA}"
    )
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label=f"Δ {metric_name(metric)}")
    return _uri(fig)


@_styled
def missingness_curves(
    curves: pd.DataFrame, task: str, cohort: str, metric: str, palette: dict[str, str] | None = None
) -> str | None:
    """Metric vs test-time X-ray missing rate per method (95% CI band), one panel per train/val missing rate."""
    t = curves[(curves["task"] == task) & (curves["cohort"] == cohort) & (curves["metric"] == metric)]
    if t.empty:
        return None
    train = sorted(t["train_rate"].unique())
    col = palette or colors(t["method"].unique())
    fig, axes = _subplots((5.2 * len(train) + 1.5, 3.4), 1, len(train), squeeze=False, sharey=True)
    for ax, tr in zip(axes[0], train, strict=True):
        part = t[t["train_rate"] == tr]
        for method, g in part.groupby("method", sort=True):
            g = g.sort_values("rate")
            style = "-" if g["uses_cxr"].iloc[0] else "--"
            ax.plot(
                g["rate"], g["value"], style, marker="o", ms=3, color=col.get(method, "#444"), label=method
            )
            ax.fill_between(
                g["rate"], g["ci_low"], g["ci_high"], color=col.get(method, "#444"), alpha=0.12, lw=0
            )
        ax.set_xlabel("share of test X-rays removed")
        ax.set_title(
            f"trained with train/val X-ray missing rate {tr:g}"
            if len(train) > 1 or tr > 0
            else "trained on the natural X-ray availability",
            fontsize=9,
            fontweight="normal",
        )
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric_name(metric))
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    axes[0][-1].legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(
        f"{task}, {cohort} cohort: test-time missing X-rays (dashed: methods that do not read the X-ray)",
        fontsize=10,
        fontweight="bold",
        y=1.0,
    )
    fig.tight_layout()
    return _uri(fig)


@_styled
def fairness_gaps(
    summary: pd.DataFrame,
    task: str,
    cohort: str,
    metric: str = "auroc",
    palette: dict[str, str] | None = None,
) -> str | None:
    """Per attribute: the metric's gap between groups (max − min) per method, with its interval; worst group."""
    rows = fairness_rows(summary, task, cohort, metric)
    if rows.empty:
        return None
    attrs = list(dict.fromkeys(rows["attribute"]))
    methods = sorted(rows["method"].unique())
    col = palette or colors(methods)
    ncol = min(3, len(attrs))
    nrow = -(-len(attrs) // ncol)
    fig, axes = _subplots(
        (4.6 * ncol, 0.42 * len(methods) * nrow + 1.4 * nrow), nrow, ncol, squeeze=False, sharex=True
    )
    hi = float(np.nanmax(rows[["gap", "high"]].to_numpy(dtype=float))) if len(rows) else 1.0
    for k, ax in enumerate(axes.ravel()):
        if k >= len(attrs):
            ax.axis("off")
            continue
        part = rows[rows["attribute"] == attrs[k]].set_index("method").reindex(methods)
        y = np.arange(len(methods))
        gap = part["gap"].to_numpy(dtype=float)
        err = np.vstack([gap - part["low"].to_numpy(dtype=float), part["high"].to_numpy(dtype=float) - gap])
        ax.barh(y, gap, color=[col.get(m, "#444") for m in methods], alpha=0.85)
        ax.errorbar(
            gap, y, xerr=np.nan_to_num(np.clip(err, 0, None)), fmt="none", ecolor="#333", capsize=2, lw=0.8
        )
        worst = [
            f"{m}\nworst: {short_label(w, 22)}" if isinstance(w, str) else m
            for m, w in zip(methods, part["worst_group"], strict=True)
        ]
        ax.set_yticks(y, worst, fontsize=7.5)
        ax.invert_yaxis()
        ax.set_title(attrs[k])
        ax.set_xlim(0, hi * 1.1 if np.isfinite(hi) and hi > 0 else 1)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(f"{metric_name(metric)} gap between groups (max − min)")
    what = task if task_label(summary, task) == task else f"{task} (macro average over labels)"
    fig.suptitle(
        f"{what}, {cohort} cohort: {metric_name(metric)} gaps between groups", fontsize=10, fontweight="bold"
    )
    fig.tight_layout()
    return _uri(fig)


@_styled
def ablation_chart(abl: pd.DataFrame, task: str, cohort: str, metric: str) -> str | None:
    """Per method: change in the metric when the X-ray or the EHR is removed at test time (95% CI)."""
    t = abl[
        (abl["task"] == task)
        & (abl["cohort"] == cohort)
        & (abl["metric"] == metric)
        & abl["condition"].isin(["drop_cxr", "drop_ehr"])
    ]
    if t.empty:
        return None
    methods = sorted(t["method"].unique())
    fig, ax = _subplots((max(5.5, 0.9 * len(methods) + 2), 3.2))
    x = np.arange(len(methods))
    for k, (cond, name, color) in enumerate(
        (("drop_cxr", "X-ray removed", "#1b6ca8"), ("drop_ehr", "EHR removed", "#d1495b"))
    ):
        part = t[t["condition"] == cond].set_index("method").reindex(methods)
        d = part["delta"].to_numpy(dtype=float)
        err = np.vstack(
            [d - part["delta_ci_low"].to_numpy(dtype=float), part["delta_ci_high"].to_numpy(dtype=float) - d]
        )
        ax.bar(x + (k - 0.5) * 0.38, d, width=0.38, color=color, label=name)
        ax.errorbar(
            x + (k - 0.5) * 0.38,
            d,
            yerr=np.nan_to_num(np.clip(err, 0, None)),
            fmt="none",
            ecolor="#333",
            capsize=2,
            lw=0.8,
        )
    ax.axhline(0, color="#333", lw=0.8)
    ax.set_xticks(x, methods, rotation=20, ha="right")
    ax.set_ylabel(f"Δ {metric_name(metric)} vs both modalities")
    ax.set_title(f"{task}, {cohort} cohort: test-time modality ablation")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _uri(fig)


def method_panels(curves: pd.DataFrame, missing_aware: Sequence[str] = ()) -> list[str]:
    """The X-ray methods of `curves` in panel order: missing-aware methods first, then the others, each by name."""
    methods = sorted(str(m) for m in curves.loc[curves["uses_cxr"].astype(bool), "method"].unique())
    aware = set(missing_aware)
    return [m for m in methods if m in aware] + [m for m in methods if m not in aware]


@_styled
def method_missingness_curves(
    curves: pd.DataFrame,
    task: str,
    cohort: str,
    metric: str,
    missing_aware: Sequence[str] = (),
    columns: int = 5,
) -> str | None:
    """One panel per method that reads the X-ray: metric vs test-time missing rate, one line per train/val missing
    rate (95% CI band). Missing-aware methods come first, titled and framed as such; the dotted line is the best
    EHR-only method at test rate 0 (its curve is flat: it never reads the X-ray)."""
    t = curves[(curves["task"] == task) & (curves["cohort"] == cohort) & (curves["metric"] == metric)]
    methods = method_panels(t, missing_aware) if not t.empty else []
    if not methods:
        return None
    aware = set(missing_aware)
    train = sorted(t["train_rate"].unique())
    rate_col = {tr: PALETTE[i % len(PALETTE)] for i, tr in enumerate(train)}
    ehr = t[~t["uses_cxr"].astype(bool) & (t["rate"] == 0.0) & (t["train_rate"] == 0.0)]
    best_ehr = ehr.loc[ehr["value"].idxmax()] if len(ehr) and ehr["value"].notna().any() else None
    ncol = min(columns, len(methods))
    nrow = -(-len(methods) // ncol)
    fig, axes = _subplots(
        (2.6 * ncol + 0.6, 2.3 * nrow + 0.9), nrow, ncol, squeeze=False, sharex=True, sharey=True
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(methods):
            ax.set_visible(False)
            continue
        method = methods[k]
        part = t[t["method"] == method]
        for tr in train:
            g = part[part["train_rate"] == tr].sort_values("rate")
            if g.empty:
                continue
            label = f"trained at {tr:g} missing"
            ax.plot(g["rate"], g["value"], "-", marker="o", ms=2.5, color=rate_col[tr], label=label)
            ax.fill_between(g["rate"], g["ci_low"], g["ci_high"], color=rate_col[tr], alpha=0.15, lw=0)
        if best_ehr is not None:
            ax.axhline(
                float(best_ehr["value"]),
                ls=":",
                color="#555",
                lw=1,
                label=f"best EHR-only ({best_ehr['method']})",
            )
        if method in aware:
            ax.set_title(f"{method} · missing-aware", fontsize=9, color="#B00020")
            for side in ("left", "bottom", "top", "right"):
                ax.spines[side].set_visible(True)
                ax.spines[side].set_color("#B00020")
                ax.spines[side].set_linewidth(1.4)
        else:
            ax.set_title(method, fontsize=9, fontweight="normal")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("share of test X-rays removed")
    for ax in axes[:, 0]:
        ax.set_ylabel(metric_name(metric))
    handles: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(
        handles.values(), handles.keys(), loc="lower center", ncol=len(handles), bbox_to_anchor=(0.5, 0.0)
    )
    fig.suptitle(
        f"{task}, {cohort} cohort: degradation per method (red frame: missing-aware methods)",
        fontsize=10,
        fontweight="bold",
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _uri(fig)


@_styled
def train_rate_curves(
    tr: pd.DataFrame, task: str, cohort: str, metric: str, palette: dict[str, str] | None = None
) -> str | None:
    """Test metric vs the train/validation X-ray missing rate the runs were trained with (95% CI)."""
    t = tr[(tr["task"] == task) & (tr["cohort"] == cohort) & (tr["metric"] == metric)]
    if t.empty or t["train_rate"].nunique() < 2:
        return None
    col = palette or colors(t["method"].unique())
    fig, ax = _subplots((5.5, 3.2))
    for method, g in t.groupby("method", sort=True):
        g = g.sort_values("train_rate")
        ax.errorbar(
            g["train_rate"],
            g["value"],
            yerr=np.nan_to_num(
                np.clip(np.vstack([g["value"] - g["ci_low"], g["ci_high"] - g["value"]]), 0, None)
            ),
            marker="o",
            ms=4,
            capsize=3,
            color=col.get(method, "#444"),
            label=method,
        )
    ax.set_xlabel("share of train/validation X-rays removed")
    ax.set_ylabel(metric_name(metric))
    ax.set_title(f"{task}, {cohort} cohort: training with missing X-rays")
    ax.legend()
    ax.grid(alpha=0.3)
    return _uri(fig)
