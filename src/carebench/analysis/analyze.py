"""`carebench analyze RUNS`: every finished run of a benchmark -> the result tables of the report.

Why one command: the statistics, fairness and modality modules each answer one question about one set of
predictions; a benchmark needs all of them over every method, task and cohort, with the same resampling seed
and the same rules for pooling runs, written once so the report (and anyone with pandas) reads finished tables.

What it does (docs/report.md has every table and column):

- Runs are the finished run records (`runs.find_runs`), grouped by task x cohort x X-ray dropout setting
  (`analysis.pooling`); all must have been trained on the analysed dataset (same fingerprint). Methods are model
  names; unimodal methods are those whose model reads one modality.
- Main runs (no X-ray removed in any split): leaderboard (`comparisons.method_metrics`: every metric, bootstrap
  CI, folds concatenated, seeds averaged) and comparisons (`comparisons.compare_methods`: each fusion method vs
  the best unimodal method, and the pairs of `--pairs`: by default each method vs late fusion; per phenotype;
  permutation p-values with Holm and BH).
- Fairness per main run (`analysis.fairness`), thresholds chosen on the run's validation predictions
  (`predictions_val.parquet`, or recomputed from the checkpoint for older records).
- Natural missingness: main-run test predictions split by the stay's X-ray availability (base cohort).
- Test-time missingness and modality contribution from the checkpoints: per run, the test split with every
  X-ray (`full`), without any (`drop_cxr`) and without the EHR (`drop_ehr`). Predictions at a test missing rate
  r take `drop_cxr` for the stays whose X-ray is removed at r (`modality.RunPredictor.dropped`, nested and
  seeded) and `full` for the others. This equals predicting at rate r directly because the model contract
  makes each stay's prediction independent of the other stays in the batch and of a missing image's pixels
  (tests check it to 1e-6), and it costs two passes per run instead of one per rate.
- Train/validation missing rates: runs trained with X-rays removed, pooled per method and rate.
- Findings (`analysis.findings`): the paper's four claims tested on the tables above, with a verdict each
  (docs/findings.md).
- Tuning (`analysis.tuning`), for a benchmark whose plan has `tuning`: per study, the space, the trials, the best
  parameters and the best trial's validation value against its test value, tested here, after the study.
- Every table gets bootstrap CIs from the same seed; tables are written to `RUNS/analysis/` (parquet + csv)
  with `summary.json`, atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carebench import __version__, runs
from carebench.analysis import comparisons as cmp
from carebench.analysis.fairness import fairness_tables
from carebench.analysis.findings import LATE_FUSION, Role, findings_table
from carebench.analysis.modality import RunPredictor, dropout_runs_table
from carebench.analysis.options import AnalysisError, AnalysisOptions, groups_by_task, resolve_options
from carebench.analysis.outputs import ANALYSIS_DIR, TABLES, write_analysis
from carebench.analysis.parallel import Workers, parallel_map
from carebench.analysis.pooling import groups as run_groups
from carebench.analysis.pooling import load_runs, long_predictions, recorded_predictions
from carebench.analysis.resume import WORK_DIR, WorkCache
from carebench.analysis.tuning import tuning_table
from carebench.data.describe import fold_table, label_counts
from carebench.data.store import ProcessedDataset, dataset_fingerprint, open_dataset
from carebench.errors import UserError
from carebench.evaluation import statistics as st
from carebench.evaluation.fairness import MACRO
from carebench.experiments.plan import read_plan_record
from carebench.runs import RunRecord
from carebench.tasks import get_task

ABLATION_COLUMNS = [
    "task",
    "cohort",
    "method",
    "condition",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "delta",
    "delta_ci_low",
    "delta_ci_high",
    "n_stays",
    "n_seeds",
    "n_cxr_input",
]


@dataclass
class AnalysisResult:
    path: Path
    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]


# ------------------------------------------------------------------------------------------------ cohort
def cohort_tables(ds: ProcessedDataset) -> dict[str, pd.DataFrame]:
    """The report's cohort summary, computed from cohort.parquet and what manifest.json declares (the tasks and
    their label columns), for any dataset."""
    c = ds.cohort
    has = c["has_cxr"].astype(bool)
    n = len(c)
    folds = fold_table(ds)
    folds["with_cxr"] = c.assign(with_cxr=has).groupby("fold")["with_cxr"].sum().to_numpy()
    folds = folds.rename(columns={"subjects": "patients"})
    binary = [t for t in ds.tasks if ds.task(t).spec.kind == "binary"]
    overview = pd.DataFrame(
        [
            ("stays", f"{n}"),
            ("patients", f"{c['subject_id'].nunique()}"),
            ("stays with a chest X-ray", f"{int(has.sum())} ({has.mean():.1%})" if n else "0"),
            *((f"{t}: {ds.task(t).display_names[0]}", _count_share(c[ds.task(t).labels[0]])) for t in binary),
            ("tasks", ", ".join(ds.tasks)),
            ("folds (patient-disjoint)", ", ".join(str(f) for f in sorted(c["fold"].unique()))),
            (
                "EHR features x time steps",
                f"{len(ds.features)} x {ds.declarations.steps} ({ds.declarations.step_hours:g} h each)",
            ),
            ("dataset", str(ds.root)),
        ],
        columns=["item", "value"],
    )
    steps = pd.DataFrame(ds.manifest.get("cohort_steps", []), columns=["step", "rule", "stays"])
    rows = []
    for r in label_counts(ds).to_dict("records"):
        decl = ds.task(r["task"])
        if decl.spec.kind == "multiclass":
            k = decl.output_names.index(r["label"])
            y = (c[decl.labels[0]] == k).astype(float).where(c[decl.labels[0]].notna())
        else:
            y = c[decl.labels[decl.output_names.index(r["label"])]].astype(float)
        ok = y.notna()
        rows.append(
            {
                "task": r["task"],
                "label": r["label"],
                "name": r["name"],
                "stays": int(ok.sum()),
                "positives": int(y[ok].sum()),
                "prevalence": float(y[ok].mean()) if ok.any() else np.nan,
                "prevalence_with_cxr": float(y[ok & has].mean()) if (ok & has).any() else np.nan,
                "prevalence_without_cxr": float(y[ok & ~has].mean()) if (ok & ~has).any() else np.nan,
            }
        )
    return {
        "cohort_overview": overview,
        "cohort_steps": steps,
        "cohort_folds": folds,
        "cohort_labels": pd.DataFrame(rows),
    }


def _count_share(y: pd.Series) -> str:
    ok = y.notna()
    return f"{int(y[ok].sum())} ({y[ok].mean():.1%})" if ok.any() else "0"


# ------------------------------------------------------------------------------------------------ helpers
def task_order(tasks: Sequence[str]) -> Callable[[str, str], tuple]:
    """Sort key of (task, cohort): the dataset's declaration order of tasks, then base before matched."""
    rank = {t: i for i, t in enumerate(tasks)}
    return lambda task, cohort: (rank.get(task, len(rank)), task, cohort != "base", cohort)


def fairness_attributes(ds: ProcessedDataset, requested: Sequence[str]) -> list[str]:
    """The attributes to analyse: the requested ones (checked against the dataset), or every one it declares."""
    if not requested:
        return ds.attributes
    unknown = [a for a in requested if a not in ds.attributes]
    if unknown:
        raise AnalysisError(
            f"fairness attributes {unknown}: not declared by the dataset {ds.root}; it declares "
            f"{', '.join(ds.attributes)}"
        )
    return list(requested)


def method_roles(records: Sequence[RunRecord]) -> dict[str, Role]:
    """Per method: the modalities of its runs and its registered class's `missing_aware` (False when the model is
    not registered in this installation)."""
    from carebench.models.registry import get_model_class

    out = {}
    for r in records:
        try:
            aware = bool(get_model_class(r.method).missing_aware)
        except UserError:
            aware = False
        out[r.method] = Role(tuple(r.modalities), aware)
    return out


def _names(task: str, frame: pd.DataFrame) -> list[str]:
    return runs.prediction_columns(frame.columns, task)[2]


def _headline(task: str, opts: AnalysisOptions) -> list[str]:
    """The task's headline metrics, plus their label-group macro averages (multilabel, with --label-groups)."""
    spec = get_task(task)
    return [*spec.headline, *(st.group_key(m, g) for g in _groups(task, opts) or {} for m in spec.headline)]


def _groups(task: str, opts: AnalysisOptions) -> dict[str, list[str]] | None:
    """The label groups of `task` (a multilabel task having all their labels), or None."""
    return opts.task_label_groups.get(task) or None


def _resampling(task: str, names: list[str], opts: AnalysisOptions) -> dict[str, Any]:
    """The keyword arguments every bootstrap of the analysis shares (output names, resamples, level, seed,
    label groups)."""
    return {"names": names, "n_resamples": opts.n_bootstrap, "ci": opts.confidence, "seed": opts.seed,
            "groups": _groups(task, opts)}  # fmt: skip


def _pool(long: pd.DataFrame, task: str, metrics: Sequence[str], val: pd.DataFrame | None):
    """`comparisons.pool_predictions`, with validation thresholds when a metric needs them."""
    return cmp.pool_predictions(long, task, val if cmp.needs_thresholds(task, metrics) else None)


def _bootstrap_job(job: tuple) -> dict[str, st.BootstrapResult]:
    """One bootstrap (a worker's unit): `st.bootstrap_cis(y, p, metrics, thresholds=..., **options)` without
    distributions."""
    y, p, thresholds, metrics, options = job
    return cmp._lean(st.bootstrap_cis(y, p, metrics, thresholds=thresholds, **options))


def _pooled_cis(
    long: pd.DataFrame,
    task: str,
    metrics: Sequence[str],
    opts: AnalysisOptions,
    val: pd.DataFrame | None,
    workers: Workers | int = 1,
) -> dict[str, tuple[cmp.PooledPredictions, dict[str, st.BootstrapResult]]]:
    """Per method: seed-pooled predictions and bootstrap CIs of `metrics` (thresholded ones at the validation
    thresholds of `val`; methods mapped over `workers`)."""
    pooled = _pool(long, task, metrics, val)
    options = _resampling(task, _names(task, long), opts)
    jobs = ((pp.y, pp.p, pp.thresholds, list(metrics), options) for pp in pooled.values())
    return {
        m: (pp, cis)
        for (m, pp), cis in zip(pooled.items(), parallel_map(_bootstrap_job, jobs, workers), strict=True)
    }


def _n_cxr(long: pd.DataFrame, method: str) -> float:
    """Stays given an X-ray per (fold-concatenated) seed of a method."""
    part = long.loc[long["method"] == method]
    return float(part["cxr_input"].sum()) / max(1, part["seed"].nunique()) if "cxr_input" in part else np.nan


def _ci_row(res: st.BootstrapResult) -> dict[str, float]:
    return {"value": res.estimate, "ci_low": res.ci_low, "ci_high": res.ci_high}


def _concat(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ------------------------------------------------------------------------------------------------ stages
def _statistics(
    task: str,
    cohort: str,
    members: list[RunRecord],
    test: pd.DataFrame,
    val: pd.DataFrame,
    opts: AnalysisOptions,
    workers: Workers | int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    unimodal = sorted({r.method for r in members if r.unimodal})
    board = cmp.method_metrics(
        test,
        task,
        n_resamples=opts.n_bootstrap,
        ci=opts.confidence,
        seed=opts.seed,
        label_groups=_groups(task, opts),
        val=val,
        jobs=workers,
    )
    mods = {r.method: "+".join(r.modalities) for r in members}
    n_runs = {m: sum(1 for r in members if r.method == m) for m in mods}
    board.insert(1, "cohort", cohort)
    board.insert(3, "modalities", board["method"].map(mods))
    board["n_runs"] = board["method"].map(n_runs)
    reference = None
    if len(mods) > 1:
        comp = cmp.compare_methods(
            test,
            task,
            unimodal=unimodal,
            pairwise=opts.pairs != "reference",
            pairwise_with=[LATE_FUSION] if opts.pairs == "findings" else None,
            n_resamples=opts.n_bootstrap,
            n_permutations=opts.n_permutations,
            sequential_h=opts.sequential_h,
            ci=opts.confidence,
            seed=opts.seed,
            label_groups=_groups(task, opts),
            val=val,
            jobs=workers,
        )
        reference = comp.attrs.get("reference")
        comp.attrs = {}
        comp.insert(1, "cohort", cohort)
    else:
        comp = pd.DataFrame()
    return board, comp, reference


def _statistics_options(task: str, cohort: str, with_natural: bool, opts: AnalysisOptions) -> dict[str, Any]:
    """What the statistics of a (task, cohort) group depend on besides its runs and the dataset (its resume key)."""
    return {"task": task, "cohort": cohort, "natural": with_natural, "groups": _groups(task, opts),
            **{k: getattr(opts, k) for k in ("n_bootstrap", "n_permutations", "confidence", "seed", "pairs",
                                            "sequential_h")}}  # fmt: skip


def _modality_options(
    task: str, cohort: str, rates: tuple, ablate: bool, opts: AnalysisOptions
) -> dict[str, Any]:
    """What the missing-X-ray curves and ablations of a group depend on besides its runs (its resume key)."""
    return {"task": task, "cohort": cohort, "rates": rates, "ablation": ablate, "missingness": opts.missingness,
            "groups": _groups(task, opts),
            **{k: getattr(opts, k) for k in ("n_bootstrap", "confidence", "seed", "test_rates")}}  # fmt: skip


def _json_number(obj: Any) -> Any:
    """numpy scalars in table rows as Python numbers (a resume piece's rows are JSON)."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON: {type(obj).__name__}")


def _natural(
    task: str,
    cohort: str,
    test: pd.DataFrame,
    val: pd.DataFrame,
    has_cxr: pd.Series,
    opts: AnalysisOptions,
    workers: Workers | int = 1,
) -> pd.DataFrame:
    """Headline metrics on all test stays, those with and those without a linked X-ray (dataset's has_cxr)."""
    avail = test["stay_id"].map(has_cxr).astype(bool)
    rows = []
    metrics = _headline(task, opts)
    base = {}
    for subset, part in (("all", test), ("with_cxr", test[avail]), ("without_cxr", test[~avail])):
        if part.empty:
            continue
        for method, (pp, cis) in _pooled_cis(part, task, metrics, opts, val, workers).items():
            for metric, res in cis.items():
                if subset == "all":
                    base[(method, metric)] = res.estimate
                rows.append(
                    {
                        "task": task,
                        "cohort": cohort,
                        "method": method,
                        "subset": subset,
                        "metric": metric,
                        **_ci_row(res),
                        "delta": res.estimate - base.get((method, metric), np.nan),
                        "n_stays": len(pp.y),
                        "n_seeds": pp.n_seeds,
                    }
                )
    return pd.DataFrame(rows)


@dataclass
class RunFrames:
    """A run's test predictions under the controlled inputs (predictions.parquet columns, sorted by stay)."""

    full: pd.DataFrame
    drop_cxr: pd.DataFrame
    drop_ehr: pd.DataFrame | None
    at_rate: dict[float, pd.DataFrame]


def controlled_predictions(r: RunRecord, root: Path, opts: AnalysisOptions, ablation: bool) -> RunFrames:
    """Forward passes of one run's checkpoint: full, drop_cxr (X-ray models), drop_ehr (for ablation only),
    composed into the test-time missingness rates (module docstring)."""
    need_model = r.uses_cxr or (ablation and r.uses_ehr)
    if not need_model:
        full = runs.read_predictions(r)
        return RunFrames(full, full, None, dict.fromkeys(opts.test_rates, full))
    pred = RunPredictor(r.path, root, device=opts.device)
    # The recorded test predictions are the `full` condition exactly for a 32-bit run tested with every X-ray
    # (tests/test_modality.py), which saves the costliest pass; otherwise predict again with the same code.
    if r.precision == "32-true" and r.dropout[2] == 0.0:
        full = runs.read_predictions(r)
    else:
        full = pred.predict(condition="full", cxr_missing_rate=0.0)
    drop_cxr = pred.predict(condition="drop_cxr") if r.uses_cxr else full
    drop_ehr = None
    if ablation:
        drop_ehr = pred.predict(condition="drop_ehr", cxr_missing_rate=0.0) if r.uses_ehr else full
    at_rate = {}
    if not np.array_equal(full["stay_id"].to_numpy(), drop_cxr["stay_id"].to_numpy()):
        raise AnalysisError(f"run {r.run_id}: predictions with and without X-rays cover different stays")
    order = pd.Index(pred.fold.test.stay_ids)
    for rate in opts.test_rates:
        if not r.uses_cxr or rate == 0.0:
            at_rate[rate] = full
            continue
        gone = pd.Series(pred.dropped(rate), index=order).reindex(full["stay_id"].to_numpy()).to_numpy(bool)
        at_rate[rate] = pd.DataFrame(
            {c: np.where(gone, drop_cxr[c].to_numpy(), full[c].to_numpy()) for c in full.columns}
        ).astype(full.dtypes.to_dict())
    return RunFrames(full, drop_cxr, drop_ehr, at_rate)


def _controlled_job(job: tuple) -> RunFrames:
    """`controlled_predictions` of one run (a worker's unit)."""
    r, root, opts, ablation = job
    return controlled_predictions(r, root, opts, ablation=ablation)


def _validation_predictions(r: RunRecord, *, root: Path, device: str) -> pd.DataFrame:
    """A run's validation predictions recomputed from its checkpoint (records that predate saving them)."""
    return RunPredictor(r.path, root, device=device).predict(split="val")


def _ablation_rows(
    task: str,
    cohort: str,
    members: list[RunRecord],
    frames: dict[str, RunFrames],
    val_of: Callable[[RunRecord], pd.DataFrame],
    opts: AnalysisOptions,
) -> list[dict]:
    """Per method: metric under full / drop_cxr / drop_ehr / head:<name>, CI, and paired-bootstrap delta vs full.
    Thresholded metrics are decided at the model's validation thresholds (a head's at its own)."""
    metrics = _headline(task, opts)
    full_long = long_predictions((r, frames[r.run_id].full) for r in members)
    val_long = long_predictions((r, val_of(r)) for r in members)
    conditions: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {
        "drop_cxr": (long_predictions((r, frames[r.run_id].drop_cxr) for r in members), val_long),
        "drop_ehr": (long_predictions((r, frames[r.run_id].drop_ehr) for r in members), val_long),
    }
    for head in runs.prediction_heads(full_long):
        with_head = [r for r in members if head in runs.prediction_heads(frames[r.run_id].full)]
        conditions[f"head:{head}"] = (
            long_predictions((r, runs.head_frame(frames[r.run_id].full, head, task)) for r in with_head),
            long_predictions((r, runs.head_frame(val_of(r), head, task)) for r in with_head),
        )
    names = _names(task, full_long)
    full_pool = _pool(full_long, task, metrics, val_long)
    rows = []
    for method, pp in full_pool.items():
        cis = st.bootstrap_cis(
            pp.y, pp.p, metrics, thresholds=pp.thresholds, **_resampling(task, names, opts)
        )
        base = {"task": task, "cohort": cohort, "method": method, "n_stays": len(pp.y), "n_seeds": pp.n_seeds}
        for metric, res in cis.items():
            rows.append(
                {
                    **base,
                    "condition": "full",
                    "metric": metric,
                    **_ci_row(res),
                    "delta": 0.0,
                    "delta_ci_low": np.nan,
                    "delta_ci_high": np.nan,
                    "n_cxr_input": _n_cxr(full_long, method),
                }
            )
        for cond, (long, val) in conditions.items():
            part = long.loc[long["method"] == method]
            if part.empty:
                continue
            other = _pool(part, task, metrics, val)[method]
            if not np.array_equal(other.stay_id, pp.stay_id):
                raise AnalysisError(f"method {method!r}: condition {cond} predicts other stays than full")
            own = st.bootstrap_cis(
                other.y, other.p, metrics, thresholds=other.thresholds, **_resampling(task, names, opts)
            )
            delta = st.paired_bootstrap_cis(
                pp.y, other.p, pp.p, metrics, thresholds_a=other.thresholds, thresholds_b=pp.thresholds,
                **_resampling(task, names, opts),
            )  # fmt: skip
            for metric in metrics:
                rows.append(
                    {
                        **base,
                        "condition": cond,
                        "metric": metric,
                        **_ci_row(own[metric]),
                        "delta": delta[metric].estimate,
                        "delta_ci_low": delta[metric].ci_low,
                        "delta_ci_high": delta[metric].ci_high,
                        "n_cxr_input": _n_cxr(part, method),
                    }
                )
    return rows


def _curve_rows(
    task: str,
    cohort: str,
    train_rate: float,
    members: list[RunRecord],
    frames: dict[str, RunFrames],
    val_of: Callable[[RunRecord], pd.DataFrame],
    opts: AnalysisOptions,
    workers: Workers | int = 1,
) -> list[dict]:
    """Per method and test-time missing rate: headline metrics of the seed-pooled predictions, CI, delta."""
    metrics = _headline(task, opts)
    rows = []
    first: dict[tuple[str, str], float] = {}
    val = long_predictions((r, val_of(r)) for r in members) if cmp.needs_thresholds(task, metrics) else None
    for rate in opts.test_rates:
        long = long_predictions((r, frames[r.run_id].at_rate[rate]) for r in members)
        for method, (pp, cis) in _pooled_cis(long, task, metrics, opts, val, workers).items():
            uses_cxr = any(r.uses_cxr for r in members if r.method == method)
            for metric, res in cis.items():
                first.setdefault((method, metric), res.estimate)
                rows.append(
                    {
                        "task": task,
                        "cohort": cohort,
                        "method": method,
                        "uses_cxr": uses_cxr,
                        "train_rate": train_rate,
                        "rate": rate,
                        "metric": metric,
                        **_ci_row(res),
                        "delta": res.estimate - first[(method, metric)],
                        "n_stays": len(pp.y),
                        "n_cxr_input": _n_cxr(long, method),
                        "n_seeds": pp.n_seeds,
                    }
                )
    return rows


def _train_rate_rows(
    grouped: dict,
    val_of: Callable[[RunRecord], pd.DataFrame],
    opts: AnalysisOptions,
    workers: Workers | int = 1,
) -> list[dict]:
    """Per (task, cohort, method) with runs trained at X-ray dropout r > 0: test metrics at every train rate."""
    rows = []
    dropout_methods = {
        (t, c, r.method)
        for (t, c, rates), mem in grouped.items()
        if rates[0] > 0 and rates[2] == 0
        for r in mem
    }
    for (task, cohort, rates), members in sorted(
        grouped.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])
    ):
        if rates[2] != 0 or rates[0] != rates[1]:
            continue
        chosen = [r for r in members if (task, cohort, r.method) in dropout_methods]
        if not chosen:
            continue
        long = long_predictions((r, runs.read_predictions(r)) for r in chosen)
        metrics = _headline(task, opts)
        val = (
            long_predictions((r, val_of(r)) for r in chosen) if cmp.needs_thresholds(task, metrics) else None
        )
        for method, (pp, cis) in _pooled_cis(long, task, metrics, opts, val, workers).items():
            for metric, res in cis.items():
                rows.append(
                    {
                        "task": task,
                        "cohort": cohort,
                        "method": method,
                        "train_rate": rates[0],
                        "metric": metric,
                        **_ci_row(res),
                        "n_stays": len(pp.y),
                        "n_seeds": pp.n_seeds,
                        "n_runs": sum(1 for r in chosen if r.method == method),
                    }
                )
    return rows


# ------------------------------------------------------------------------------------------------ driver
class _Progress:
    """Rich progress on stderr (or nothing): one bar per stage."""

    def __init__(self, console: Any | None) -> None:
        self.bar = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def stage(self, name: str, total: int) -> Callable[[], None]:
        if self.bar is None:
            return lambda: None
        task = self.bar.add_task(name, total=max(total, 1))
        if total == 0:
            self.bar.update(task, completed=1)
        return lambda: self.bar.advance(task)


def analyze(
    runs_dir: str | Path, *, data: str | Path | None = None, console: Any | None = None, **options: Any
) -> AnalysisResult:
    """Analyse every finished run under `runs_dir`; write `RUNS/analysis/` and return its tables.

    `options`: n_bootstrap, n_permutations, confidence, seed, fairness, missingness, ablation (bool or None =
    plan / default), test_rates, device, jobs (worker processes, default 1; 0 = every core). `data` overrides the dataset path recorded in the runs (same
    fingerprint required). `console`: a Rich console for progress (None = silent).
    """
    t0 = time.perf_counter()
    runs_dir = Path(runs_dir)
    excluded: dict[str, str] = {}
    records = load_runs(runs_dir, excluded, data)
    plan = read_plan_record(runs_dir)
    opts = resolve_options(plan, **options)
    data_path, fingerprint = runs.common_dataset(records)
    root = Path(data) if data is not None else Path(data_path)
    if not root.is_dir():
        raise AnalysisError(f"{root}: dataset of the runs not found (pass --data DIR if it moved)")
    runs.check_dataset(fingerprint, root, dataset_fingerprint(root))
    # in every piece's key: the dataset, and the device of forward passes (curves, ablations, and the validation
    # predictions of records that predate saving them)
    cache = WorkCache(runs_dir / WORK_DIR, {"dataset": fingerprint, "device": opts.device})
    ds = open_dataset(root, mmap=True)
    ran = {r.task for r in records}
    undeclared = sorted(ran - set(ds.tasks))
    if undeclared:
        raise AnalysisError(
            f"{root}: runs of task(s) {undeclared} that the dataset does not declare ({ds.tasks})"
        )
    multilabel = {t: ds.output_names(t) for t in ds.tasks if t in ran and get_task(t).kind == "multilabel"}
    opts = replace(opts, task_label_groups=groups_by_task(opts.label_groups, multilabel))
    has_cxr = ds.cohort.set_index("stay_id")["has_cxr"].astype(bool)
    grouped = run_groups(records)
    main = {k[:2]: v for k, v in grouped.items() if k[2] == (0.0, 0.0, 0.0)}
    order = task_order(ds.tasks)
    val_cache: dict[str, pd.DataFrame] = {}

    def val_of(r: RunRecord) -> pd.DataFrame:
        """A run's validation predictions (recorded, or re-predicted from the checkpoint for an older record)."""
        if r.run_id not in val_cache:
            frame = runs.read_predictions(r, "val")
            if frame is None:
                frame = _validation_predictions(r, root=root, device=opts.device)
            val_cache[r.run_id] = frame
        return val_cache[r.run_id]

    warnings: list[str] = [
        f"run {rid} left out of the analysis: {problem}" for rid, problem in sorted(excluded.items())
    ]
    timings: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {"runs": runs.runs_table(records), **cohort_tables(ds)}
    group_info = []
    groups = ds.groups()
    with _Progress(console) as progress, Workers(opts.jobs, shared={"groups": groups}) as workers:
        t = time.perf_counter()
        tick = progress.stage("statistics (leaderboard, comparisons)", len(main))
        boards, comps, natural = [], [], []
        for (task, cohort), members in sorted(main.items(), key=lambda kv: order(*kv[0])):
            with_natural = opts.missingness and cohort == "base"
            key = cache.key("statistics", _statistics_options(task, cohort, with_natural, opts), members)
            piece = cache.get(key)
            if piece is None:
                test = recorded_predictions(members)
                val = long_predictions((r, val_of(r)) for r in members)
                board, comp, reference = _statistics(task, cohort, members, test, val, opts, workers)
                made = {"board": board, "comp": comp}
                if with_natural:
                    made["natural"] = _natural(task, cohort, test, val, has_cxr, opts, workers)
                piece = made, {"reference": reference, "n_stays": int(test["stay_id"].nunique())}
                cache.put(key, *piece)
            made, meta = piece
            boards.append(made["board"])
            comps.append(made["comp"])
            if with_natural:
                natural.append(made["natural"])
            reference = meta["reference"]
            group_info.append(
                {
                    "task": task,
                    "cohort": cohort,
                    "methods": sorted({r.method for r in members}),
                    "unimodal": sorted({r.method for r in members if r.unimodal}),
                    "reference": reference,
                    "selection_metric": get_task(task).selection_metric,
                    "threshold_rule": get_task(task).threshold,
                    "n_runs": len(members),
                    "n_stays": meta["n_stays"],
                }
            )
            tick()
        tables["leaderboard"] = _concat(boards)
        tables["comparisons"] = _concat(comps)
        tables["missingness_natural"] = _concat(natural)
        timings["statistics"] = time.perf_counter() - t

        t = time.perf_counter()
        main_runs = [r for _, mem in sorted(main.items(), key=lambda kv: order(*kv[0])) for r in mem]
        attributes = fairness_attributes(ds, opts.fairness_attributes)
        if opts.fairness:
            tick = progress.stage("fairness", len(main_runs))
            tables.update(
                fairness_tables(
                    main_runs,
                    groups,
                    attributes=attributes,
                    intersections=[i for i in ds.intersections if set(i) <= set(attributes)],
                    n_resamples=opts.n_bootstrap,
                    seed=opts.seed,
                    confidence=opts.confidence,
                    validation=functools.partial(_validation_predictions, root=root, device=opts.device),
                    warn=warnings.append,
                    tick=tick,
                    workers=workers,
                    cache=cache,
                )
            )
            timings["fairness"] = time.perf_counter() - t

        t = time.perf_counter()
        ablation_rows, curve_rows = [], []
        if opts.missingness or opts.ablation:
            curve_groups = sorted(
                ((k, [r for r in v if opts.missingness or k[2] == (0.0, 0.0, 0.0)]) for k, v in grouped.items()
                 if k[2][2] == 0.0 and k[2][0] == k[2][1]),
                key=lambda kv: (*order(*kv[0][:2]), kv[0][2]),
            )  # fmt: skip
            todo = [r for _, mem in curve_groups for r in mem]
            tick = progress.stage("missing X-rays and ablations (checkpoints)", len(todo))
            no_checkpoint = [r.run_id for r in todo if (r.uses_cxr or opts.ablation) and not r.has_checkpoint]
            skip = set(no_checkpoint)
            for _ in no_checkpoint:
                tick()
            if no_checkpoint:
                warnings.append(
                    f"{len(no_checkpoint)} run(s) without a checkpoint left out of the test-time "
                    f"missingness and ablation tables: {', '.join(no_checkpoint)}"
                )
            # group by group: one group's forward passes are in memory at a time, and its rows are a resume piece
            for (task, cohort, rates), all_members in curve_groups:
                members = [r for r in all_members if r.run_id not in skip]
                if not members:
                    continue
                ablate = opts.ablation and rates == (0.0, 0.0, 0.0)
                key = cache.key("modality", _modality_options(task, cohort, rates, ablate, opts), members)
                piece = cache.get(key)
                if piece is None:
                    jobs = [(r, root, opts, opts.ablation and r.main) for r in members]
                    frames = {}
                    for r, f in zip(members, workers.map(_controlled_job, jobs), strict=True):
                        frames[r.run_id] = f
                        tick()
                    rows = {
                        "ablation": _ablation_rows(task, cohort, members, frames, val_of, opts)
                        if ablate
                        else [],
                        "curves": _curve_rows(task, cohort, rates[0], members, frames, val_of, opts, workers)
                        if opts.missingness
                        else [],
                    }
                    del frames
                    piece = {}, json.loads(json.dumps(rows, default=_json_number))
                    cache.put(key, *piece)
                else:
                    for _ in members:
                        tick()
                ablation_rows += piece[1]["ablation"]
                curve_rows += piece[1]["curves"]
        tables["ablation"] = pd.DataFrame(ablation_rows, columns=ABLATION_COLUMNS if ablation_rows else None)
        tables["missingness_test"] = pd.DataFrame(curve_rows)
        tables["missingness_train"] = pd.DataFrame(
            _train_rate_rows(grouped, val_of, opts, workers) if opts.missingness else []
        )
        dropout = [r for r in records if not r.main]
        if dropout and opts.missingness:
            keys = {(r.task, r.cohort, r.method) for r in dropout}
            table = dropout_runs_table(r for r in records if (r.task, r.cohort, r.method) in keys)
            tables["dropout_runs"] = table
        else:
            tables["dropout_runs"] = pd.DataFrame()
        timings["modality"] = time.perf_counter() - t
        studies = (plan or {}).get("studies") or []
        if studies:
            t = time.perf_counter()
            tick = progress.stage("tuning (best trials tested after their studies)", len(studies))
            tables["tuning"] = tuning_table(plan, root, device=opts.device, warn=warnings.append, tick=tick)
            timings["tuning"] = time.perf_counter() - t
    roles = method_roles(records)
    tables["findings"] = findings_table(
        tables,
        roles,
        tasks=ds.tasks,
        confidence=opts.confidence,
        n_resamples=opts.n_bootstrap,
        n_permutations=opts.n_permutations,
        seed=opts.seed,
    )
    for name in TABLES:
        tables.setdefault(name, pd.DataFrame())
    timings["total"] = time.perf_counter() - t0
    summary = {
        "carebench_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs_dir": str(runs_dir.absolute()),
        "plan": (plan or {}).get("name"),
        "dataset": {"path": str(root.absolute()), "fingerprint": fingerprint},
        # the dataset's tasks in declaration order, as the report needs them (it never opens the dataset)
        "tasks": [
            {
                **ds.task(t).spec.to_dict(),
                "outputs": ds.output_names(t),
                "output_names": ds.task(t).display_names,
            }
            for t in ds.tasks
        ],
        "fairness_attributes": attributes,
        "options": asdict(opts),
        "n_runs": len(records),
        "n_main_runs": len(main_runs),
        "run_ids": [r.run_id for r in records],
        "excluded_runs": dict(sorted(excluded.items())),
        "groups": group_info,
        "macro_label": MACRO,
        "missing_aware": sorted(m for m, role in roles.items() if role.missing_aware),
        "tables": {name: len(tables[name]) for name in TABLES},
        "warnings": warnings + ([cache.failed] if cache.failed else []),
        "resumed_pieces": cache.reused,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    path = write_analysis(runs_dir / ANALYSIS_DIR, tables, summary)
    cache.clear()
    return AnalysisResult(path=path, tables=tables, summary=summary)
