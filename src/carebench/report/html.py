"""`carebench report RUNS`: the analysis tables -> one self-contained HTML page plus every table as CSV.

Why one file: a benchmark report is mailed, attached to papers' supplements and opened on air-gapped machines.
`RUNS/report/index.html` has inline CSS, figures as base64 PNGs, no JavaScript and no external URL; the page is
rendered by a Jinja2 template with autoescaping (method names and group values are data, never markup).
`RUNS/report/tables/*.csv` are the analysis tables, linked from the page. The report only reads
`RUNS/analysis/` (written by `carebench analyze`), so it is quick to rebuild and never retrains or resamples.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from carebench import __version__, runs
from carebench.analysis.outputs import ANALYSIS_DIR, TABLES, load_analysis
from carebench.data.store import atomic_output_dir
from carebench.errors import UserError
from carebench.report import figures as fg
from carebench.report import tables as tb
from carebench.tasks import TaskSpec, declare_tasks, get_task, spec_from_record

REPORT_DIR = "report"
INDEX = "index.html"
TABLE_NOTES = {
    "runs": "every finished run analysed (model, task, cohort, fold, seed, X-ray dropout rates, modalities)",
    "cohort_overview": "dataset summary",
    "cohort_steps": "cohort selection steps and stays left after each (from the dataset manifest)",
    "cohort_folds": "stays, patients, positives of each binary task and stays with an X-ray per fold",
    "cohort_labels": "label prevalence overall, with and without an X-ray",
    "leaderboard": "every metric of every method with 95% bootstrap CI, seed mean and sd",
    "comparisons": "paired comparisons (vs best unimodal and all pairs), per label: delta, CI, p, Holm, BH",
    "fairness_groups": "per run, label, attribute and group: metrics with CIs",
    "fairness_summary": "per run, label, attribute and metric: gap, ratio, worst/best group, parity, gap CI",
    "fairness_thresholds": "decision thresholds chosen on each run's validation predictions",
    "missingness_natural": "headline metrics on stays with and without a linked X-ray",
    "missingness_test": "headline metrics vs test-time X-ray missing rate, per train/val missing rate",
    "missingness_train": "headline metrics of runs trained with train/val X-rays removed",
    "dropout_runs": "test metrics of each run trained with X-ray dropout, with its rates",
    "ablation": "headline metrics with the X-ray or the EHR removed at test time, and per-modality heads",
    "findings": "the paper's four findings per task: verdict, effect, CI, p, methods compared, reason",
    "tuning": "per study: search space, trials, best parameters, validation vs test of the best trial",
}


class ReportError(UserError, ValueError):
    """A planted-truth file that cannot be read, or analysis tables that do not fit together."""


@dataclass
class Group:
    """Everything the page shows for one task x cohort."""

    task: str
    cohort: str
    reference: str | None
    selection: str
    leaderboard: tb.Table
    pairwise: tb.Table
    heatmap: str | None = None
    curves: str | None = None
    method_curves: str | None = None
    degradation: tb.Table | None = None
    natural: tb.Table | None = None
    train_table: tb.Table | None = None
    train_figure: str | None = None
    fairness_figure: str | None = None
    fairness_table: tb.Table | None = None
    ablation_figure: str | None = None
    label_groups: tb.Table | None = None
    ablation_table: tb.Table | None = None

    @property
    def anchor(self) -> str:
        return f"{self.task}-{self.cohort}"

    @property
    def title(self) -> str:
        return f"{self.task.capitalize()}, {self.cohort} cohort"


@dataclass
class Planted:
    table: tb.Table
    agree: int
    compared: int
    subgroup: tb.Table | None
    source: str
    subgroup_text: str = ""
    groups: tb.Table | None = None
    findings: tb.Table | None = None
    findings_agree: int = 0
    findings_compared: int = 0


@dataclass
class Page:
    title: str
    summary: dict[str, Any]
    cohort: dict[str, tb.Table]
    groups: list[Group]
    csv: list[tuple[str, str, int]]
    planted: Planted | None = None
    notes: list[str] = field(default_factory=list)
    findings: tb.Table | None = None
    tuning: tb.Table | None = None


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("carebench.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def read_planted(path: str | Path) -> dict[str, Any]:
    """planted.json of `carebench synth` (needs its `phenotypes` mapping: column -> ehr|cxr|both|none)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"--planted {p}: not a readable JSON file ({e})") from None
    kinds = raw.get("phenotypes") if isinstance(raw, dict) else None
    if not isinstance(kinds, dict) or not kinds:
        raise ReportError(
            f"--planted {p}: expected the planted.json of `carebench synth` with a 'phenotypes' "
            "mapping (phenotype column -> ehr/cxr/both/none)"
        )
    bad = sorted({str(v) for v in kinds.values()} - {"ehr", "cxr", "both", "none"})
    if bad:
        raise ReportError(f"--planted {p}: phenotype kinds must be ehr, cxr, both or none; got {bad}")
    return raw


@dataclass(frozen=True)
class TaskInfo:
    """A task as the analysis recorded it (summary.json `tasks`): its spec and its outputs' display names."""

    spec: TaskSpec
    names: dict[str, str]  # output name -> display name


def summary_tasks(summary: dict[str, Any], board: pd.DataFrame) -> dict[str, TaskInfo]:
    """The analysed dataset's tasks in declaration order, from summary.json (the report never opens the dataset);
    an analysis without them (an older carebench) falls back to the built-in tasks of its leaderboard."""
    out = {}
    for t in summary.get("tasks") or []:
        try:
            spec = spec_from_record(t)
        except UserError as e:
            raise ReportError(f"analysis summary.json: task {t.get('name')!r}: {e}") from None
        out[spec.name] = TaskInfo(
            spec, dict(zip(t.get("outputs", []), t.get("output_names", []), strict=False))
        )
    declare_tasks(info.spec for info in out.values())  # a dataset's own tasks, for this process
    for task in [] if board.empty else board["task"].unique():
        if task not in out:
            try:
                out[task] = TaskInfo(get_task(task), {})
            except UserError:
                raise ReportError(
                    f"analysis: task {task!r} is not described in summary.json (re-run `carebench analyze`)"
                ) from None
    return out


def build_page(
    tables: dict[str, pd.DataFrame],
    summary: dict[str, Any],
    planted: dict[str, Any] | None = None,
    planted_source: str = "",
) -> Page:
    """The page's content (tables and figures) from the analysis; no file is written."""
    info = {(g["task"], g["cohort"]): g for g in summary.get("groups", [])}
    board, comp = tables["leaderboard"], tables["comparisons"]
    tasks = summary_tasks(summary, board)
    palette = fg.colors(tables["runs"]["model"].unique()) if len(tables["runs"]) else {}
    groups = []
    for task, cohort in tb.groups_of(board, list(tasks)):
        meta = info.get((task, cohort), {})
        spec = tasks[task].spec
        metric = spec.headline[0]
        ref, sel = meta.get("reference"), meta.get("selection_metric", metric)
        g = Group(
            task,
            cohort,
            ref,
            sel,
            tb.leaderboard(board, comp, task, cohort, ref, sel, spec.reported, spec.threshold),
            tb.pairwise(comp, task, cohort) if not comp.empty else tb.Table([]),
        )
        if spec.kind == "multilabel":
            g.heatmap = fg.fusion_gain_heatmap(comp, task, cohort, names=tasks[task].names)
            g.label_groups = tb.label_groups(
                board, comp, tables["runs"], (summary.get("options") or {}).get("label_groups"), cohort, task
            )
        mt = tables["missingness_test"]
        if not mt.empty:
            g.curves = fg.missingness_curves(mt, task, cohort, metric, palette)
            aware = summary.get("missing_aware") or []
            g.method_curves = fg.method_missingness_curves(mt, task, cohort, metric, aware)
            deg = tb.degradation(mt, task, cohort, metric, aware)
            g.degradation = deg if deg.rows else None
        nat = tables["missingness_natural"]
        if not nat.empty and ((nat["task"] == task) & (nat["cohort"] == cohort)).any():
            g.natural = tb.natural(nat, task, cohort)
        tr = tables["missingness_train"]
        if not tr.empty and ((tr["task"] == task) & (tr["cohort"] == cohort)).any():
            g.train_table = tb.train_rates(tr, task, cohort)
            g.train_figure = fg.train_rate_curves(tr, task, cohort, metric, palette)
        fs = tables["fairness_summary"]
        if not fs.empty and ((fs["task"] == task) & (fs["cohort"] == cohort)).any():
            g.fairness_figure = fg.fairness_gaps(fs, task, cohort, palette=palette)
            g.fairness_table = tb.fairness(fs, task, cohort)
        ab = tables["ablation"]
        if not ab.empty and ((ab["task"] == task) & (ab["cohort"] == cohort)).any():
            g.ablation_figure = fg.ablation_chart(ab, task, cohort, metric)
            g.ablation_table = tb.ablation(ab, task, cohort)
        groups.append(g)
    labels = tables["cohort_labels"]
    cohort_tables = {
        "overview": tb.simple(tables["cohort_overview"], {"item": "dataset", "value": ""}, key="overview"),
        "folds": tb.simple(
            tables["cohort_folds"],
            {
                c: (f"{c} positives" if c in tasks else c.replace("_cxr", " X-ray").replace("_", " "))
                for c in tables["cohort_folds"].columns
            },
            {c: "int" for c in tables["cohort_folds"].columns if c != "fold"},
            key="folds",
        ),
        "labels": tb.simple(
            labels,
            {
                "task": "task",
                "label": "label",
                "name": "name",
                "positives": "positives",
                "prevalence": "prevalence",
                "prevalence_with_cxr": "with X-ray",
                "prevalence_without_cxr": "without X-ray",
            },
            {
                "positives": "int",
                "prevalence": "pct",
                "prevalence_with_cxr": "pct",
                "prevalence_without_cxr": "pct",
            },
            key="labels",
        ),
    }
    if len(tables["cohort_steps"]):
        cohort_tables["steps"] = tb.simple(
            tables["cohort_steps"],
            {"step": "step", "rule": "rule", "stays": "stays"},
            {"stays": "int"},
            key="steps",
        )
    planted_page = None
    if planted is not None:
        ptask = tb.per_label_task(board, list(planted.get("phenotypes", {})))
        observed = tb.planted_kinds(board, comp, tables["runs"], task=ptask)
        table, agree, compared = tb.planted(planted, observed)
        sub = planted.get("subgroup") or {}
        text = (
            f"{sub.get('attribute')} = {sub.get('value')}: {sub.get('degraded', '')} Expected: "
            f"{sub.get('expected', '')}"
            if sub
            else ""
        )
        base = [g.label_groups for g in groups if g.task == ptask and g.cohort == "base"]
        f_table, f_agree, f_compared = tb.planted_findings(
            planted, tables.get("findings", pd.DataFrame()), ptask
        )
        planted_page = Planted(
            table,
            agree,
            compared,
            tb.planted_subgroup(planted, tables["fairness_summary"]),
            planted_source,
            text,
            groups=base[0] if base else None,
            findings=f_table,
            findings_agree=f_agree,
            findings_compared=f_compared,
        )
    name = summary.get("plan") or Path(summary.get("runs_dir", "runs")).name
    return Page(
        title=f"carebench report: {name}",
        summary=summary,
        cohort=cohort_tables,
        groups=groups,
        csv=[(n, TABLE_NOTES.get(n, ""), len(tables[n])) for n in TABLES],
        planted=planted_page,
        notes=list(summary.get("warnings", [])),
        findings=tb.findings(tables.get("findings", pd.DataFrame())),
        tuning=_tuning(tables.get("tuning", pd.DataFrame())),
    )


def _tuning(df: pd.DataFrame) -> tb.Table | None:
    """The studies' table, or None for a benchmark without tuning."""
    if df.empty:
        return None
    df = df.assign(
        trials=[f"{c} / {p} / {f}" for c, p, f in zip(df.n_complete, df.n_pruned, df.n_failed, strict=True)]
    )
    return tb.simple(
        df,
        {
            "method": "method",
            "task": "task",
            "fold": "fold",
            "cohort": "cohort",
            "space": "search space",
            "trials": "trials complete / pruned / failed",
            "best_trial": "best trial",
            "best_params": "best parameters",
            "metric": "metric",
            "val": "validation",
            "test": "test",
            "gap": "gap (val - test)",
        },
        {"best_trial": "int", "val": "num", "test": "num", "gap": "num"},
        key="tuning",
    )


def stale_notes(runs_dir: Path, summary: dict[str, Any]) -> list[str]:
    """A note when runs finished or disappeared after the analysis (the page would not show them)."""
    now = set(runs.finished_run_ids(runs_dir)) - set(summary.get("excluded_runs") or {})
    then = set(summary.get("run_ids", []))
    new, gone = sorted(now - then), sorted(then - now)
    out = []
    if new:
        out.append(
            f"{len(new)} run(s) finished after the analysis and are not in this report "
            f"(re-run `carebench analyze`): {', '.join(new)}"
        )
    if gone:
        out.append(f"{len(gone)} analysed run(s) no longer exist under {runs_dir}: {', '.join(gone)}")
    return out


def render(page: Page) -> str:
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            page=page,
            version=__version__,
            created=time.strftime("%Y-%m-%d %H:%M"),
            alpha=tb.ALPHA,
            metric_name=tb.metric_name,
            fmt=tb.fmt,
            options=page.summary.get("options", {}),
        )
    )


def build_report(
    runs_dir: str | Path, *, planted: str | Path | None = None, out: str | Path | None = None
) -> Path:
    """Write `RUNS/report/index.html` and `RUNS/report/tables/*.csv` (atomically); return the HTML path."""
    runs_dir = Path(runs_dir)
    tables, summary = load_analysis(runs_dir)
    truth = read_planted(planted) if planted is not None else None
    page = build_page(tables, summary, truth, str(planted) if planted else "")
    page.notes += stale_notes(runs_dir, summary)
    html = render(page)
    target = Path(out) if out is not None else runs_dir / REPORT_DIR
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "tables").mkdir()
        for name in TABLES:
            shutil.copyfile(runs_dir / ANALYSIS_DIR / f"{name}.csv", tmp / "tables" / f"{name}.csv")
        (tmp / INDEX).write_text(html, encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be shared
    return target / INDEX
