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
  the best unimodal method, all pairs, per phenotype; permutation p-values with Holm and BH).
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
- Every table gets bootstrap CIs from the same seed; tables are written to `RUNS/analysis/` (parquet + csv)
  with `summary.json`, atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carebench import __version__, runs
from carebench.analysis import comparisons as cmp
from carebench.analysis.fairness import fairness_tables
from carebench.analysis.findings import Role, findings_table
from carebench.analysis.modality import RunPredictor, dropout_runs_table
from carebench.analysis.options import AnalysisError, AnalysisOptions, resolve_options
from carebench.analysis.outputs import ANALYSIS_DIR, TABLES, write_analysis
from carebench.analysis.parallel import Workers, parallel_map
from carebench.analysis.pooling import groups as run_groups
from carebench.analysis.pooling import load_runs, long_predictions, recorded_predictions
from carebench.data.definitions import LOS_CLASS_NAMES, load_phenotypes
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
    """The report's cohort summary, computed from cohort.parquet and manifest.json of the analysed dataset."""
    c = ds.cohort
    has = c["has_cxr"].astype(bool)
    n = len(c)
    overview = pd.DataFrame(
        [
            ("ICU stays", f"{n}"),
            ("patients", f"{c['subject_id'].nunique()}"),
            ("stays with a chest X-ray", f"{int(has.sum())} ({has.mean():.1%})" if n else "0"),
            (
                "in-ICU deaths",
                f"{int(c['label_mortality'].sum())} ({c['label_mortality'].mean():.1%})" if n else "0",
            ),
            ("folds (patient-disjoint)", ", ".join(str(f) for f in sorted(c["fold"].unique()))),
            ("EHR features x hours", f"{len(ds.features)} x {ds.manifest.get('hours', 48)}"),
            ("dataset", str(ds.root)),
        ],
        columns=["item", "value"],
    )
    steps = pd.DataFrame(ds.manifest.get("cohort_steps", []), columns=["step", "rule", "stays"])
    folds = (
        c.assign(with_cxr=has)
        .groupby("fold")
        .agg(
            stays=("stay_id", "size"),
            patients=("subject_id", "nunique"),
            deaths=("label_mortality", "sum"),
            with_cxr=("with_cxr", "sum"),
        )
        .reset_index()
    )
    rows = []

    def add(task: str, label: str, name: str, y: pd.Series) -> None:
        ok = y.notna()
        rows.append(
            {
                "task": task,
                "label": label,
                "name": name,
                "stays": int(ok.sum()),
                "positives": int(y[ok].sum()),
                "prevalence": float(y[ok].mean()) if ok.any() else np.nan,
                "prevalence_with_cxr": float(y[ok & has].mean()) if (ok & has).any() else np.nan,
                "prevalence_without_cxr": float(y[ok & ~has].mean()) if (ok & ~has).any() else np.nan,
            }
        )

    add("mortality", "mortality", "in-ICU death", c["label_mortality"].astype(float))
    los = c["label_los"].astype(float)
    for k, name in enumerate(LOS_CLASS_NAMES):
        add("los", f"los_{k}", name, (los == k).astype(float).where(los.notna()))
    for ph in load_phenotypes():
        add("phenotype", ph.column, ph.name, c[ph.column].astype(float))
    return {
        "cohort_overview": overview,
        "cohort_steps": steps,
        "cohort_folds": folds,
        "cohort_labels": pd.DataFrame(rows),
    }


# ------------------------------------------------------------------------------------------------ helpers
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
    metrics = list(spec.headline)
    if spec.kind == "multilabel":
        metrics += [st.group_key(m, g) for g in opts.label_groups for m in spec.headline]
    return metrics


def _groups(task: str, opts: AnalysisOptions) -> dict[str, list[str]] | None:
    return opts.label_groups if get_task(task).kind == "multilabel" and opts.label_groups else None


def _resampling(task: str, names: list[str], opts: AnalysisOptions) -> dict[str, Any]:
    """The keyword arguments every bootstrap of the analysis shares (output names, resamples, level, seed,
    label groups)."""
    return {"names": names, "n_resamples": opts.n_bootstrap, "ci": opts.confidence, "seed": opts.seed,
            "groups": _groups(task, opts)}  # fmt: skip


def _bootstrap_job(job: tuple) -> dict[str, st.BootstrapResult]:
    """One bootstrap (a worker's unit): `st.bootstrap_cis(y, p, metrics, **options)` without distributions."""
    y, p, metrics, options = job
    return cmp._lean(st.bootstrap_cis(y, p, metrics, **options))


def _pooled_cis(
    long: pd.DataFrame, task: str, metrics: Sequence[str], opts: AnalysisOptions, workers: Workers | int = 1
) -> dict[str, tuple[cmp.PooledPredictions, dict[str, st.BootstrapResult]]]:
    """Per method: seed-pooled predictions and bootstrap CIs of `metrics` (methods mapped over `workers`)."""
    pooled = cmp.pool_predictions(long, task)
    options = _resampling(task, _names(task, long), opts)
    jobs = ((pp.y, pp.p, list(metrics), options) for pp in pooled.values())
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
            n_resamples=opts.n_bootstrap,
            n_permutations=opts.n_permutations,
            ci=opts.confidence,
            seed=opts.seed,
            label_groups=_groups(task, opts),
            jobs=workers,
        )
        reference = comp.attrs.get("reference")
        comp.attrs = {}
        comp.insert(1, "cohort", cohort)
    else:
        comp = pd.DataFrame()
    return board, comp, reference


def _natural(
    task: str,
    cohort: str,
    test: pd.DataFrame,
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
        for method, (pp, cis) in _pooled_cis(part, task, metrics, opts, workers).items():
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
    task: str, cohort: str, members: list[RunRecord], frames: dict[str, RunFrames], opts: AnalysisOptions
) -> list[dict]:
    """Per method: metric under full / drop_cxr / drop_ehr / head:<name>, CI, and paired-bootstrap delta vs full."""
    metrics = _headline(task, opts)
    full_long = long_predictions((r, frames[r.run_id].full) for r in members)
    conditions: dict[str, pd.DataFrame] = {
        "drop_cxr": long_predictions((r, frames[r.run_id].drop_cxr) for r in members),
        "drop_ehr": long_predictions((r, frames[r.run_id].drop_ehr) for r in members),
    }
    for head in runs.prediction_heads(full_long):
        with_head = [r for r in members if head in runs.prediction_heads(frames[r.run_id].full)]
        conditions[f"head:{head}"] = long_predictions(
            (r, runs.head_frame(frames[r.run_id].full, head, task)) for r in with_head
        )
    names = _names(task, full_long)
    full_pool = cmp.pool_predictions(full_long, task)
    rows = []
    for method, pp in full_pool.items():
        cis = st.bootstrap_cis(pp.y, pp.p, metrics, **_resampling(task, names, opts))
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
        for cond, long in conditions.items():
            part = long.loc[long["method"] == method]
            if part.empty:
                continue
            other = cmp.pool_predictions(part, task)[method]
            if not np.array_equal(other.stay_id, pp.stay_id):
                raise AnalysisError(f"method {method!r}: condition {cond} predicts other stays than full")
            own = st.bootstrap_cis(other.y, other.p, metrics, **_resampling(task, names, opts))
            delta = st.paired_bootstrap_cis(pp.y, other.p, pp.p, metrics, **_resampling(task, names, opts))
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
    opts: AnalysisOptions,
    workers: Workers | int = 1,
) -> list[dict]:
    """Per method and test-time missing rate: headline metrics of the seed-pooled predictions, CI, delta."""
    metrics = _headline(task, opts)
    rows = []
    first: dict[tuple[str, str], float] = {}
    for rate in opts.test_rates:
        long = long_predictions((r, frames[r.run_id].at_rate[rate]) for r in members)
        for method, (pp, cis) in _pooled_cis(long, task, metrics, opts, workers).items():
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


def _train_rate_rows(grouped: dict, opts: AnalysisOptions, workers: Workers | int = 1) -> list[dict]:
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
        for method, (pp, cis) in _pooled_cis(long, task, _headline(task, opts), opts, workers).items():
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
    records = load_runs(runs_dir)
    plan = read_plan_record(runs_dir)
    opts = resolve_options(plan, **options)
    data_path, fingerprint = runs.common_dataset(records)
    root = Path(data) if data is not None else Path(data_path)
    if not root.is_dir():
        raise AnalysisError(f"{root}: dataset of the runs not found (pass --data DIR if it moved)")
    runs.check_dataset(fingerprint, root, dataset_fingerprint(root))
    ds = open_dataset(root, mmap=True)
    has_cxr = ds.cohort.set_index("stay_id")["has_cxr"].astype(bool)
    grouped = run_groups(records)
    main = {k[:2]: v for k, v in grouped.items() if k[2] == (0.0, 0.0, 0.0)}
    warnings: list[str] = []
    timings: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {"runs": runs.runs_table(records), **cohort_tables(ds)}
    group_info = []
    with _Progress(console) as progress, Workers(opts.jobs, shared={"cohort": ds.cohort}) as workers:
        t = time.perf_counter()
        tick = progress.stage("statistics (leaderboard, comparisons)", len(main))
        boards, comps, natural = [], [], []
        for (task, cohort), members in sorted(main.items()):
            test = recorded_predictions(members)
            board, comp, reference = _statistics(task, cohort, members, test, opts, workers)
            boards.append(board)
            comps.append(comp)
            if opts.missingness and cohort == "base":
                natural.append(_natural(task, cohort, test, has_cxr, opts, workers))
            group_info.append(
                {
                    "task": task,
                    "cohort": cohort,
                    "methods": sorted({r.method for r in members}),
                    "unimodal": sorted({r.method for r in members if r.unimodal}),
                    "reference": reference,
                    "selection_metric": get_task(task).selection_metric,
                    "n_runs": len(members),
                    "n_stays": int(test["stay_id"].nunique()),
                }
            )
            tick()
        tables["leaderboard"] = _concat(boards)
        tables["comparisons"] = _concat(comps)
        tables["missingness_natural"] = _concat(natural)
        timings["statistics"] = time.perf_counter() - t

        t = time.perf_counter()
        main_runs = [r for mem in main.values() for r in mem]
        if opts.fairness:
            tick = progress.stage("fairness", len(main_runs))
            tables.update(
                fairness_tables(
                    main_runs,
                    ds.cohort,
                    attributes=opts.fairness_attributes,
                    n_resamples=opts.n_bootstrap,
                    seed=opts.seed,
                    confidence=opts.confidence,
                    validation=functools.partial(_validation_predictions, root=root, device=opts.device),
                    warn=warnings.append,
                    tick=tick,
                    workers=workers,
                )
            )
            timings["fairness"] = time.perf_counter() - t

        t = time.perf_counter()
        ablation_rows, curve_rows = [], []
        if opts.missingness or opts.ablation:
            curve_groups = {k: v for k, v in grouped.items() if k[2][2] == 0.0 and k[2][0] == k[2][1]}
            todo = [
                r
                for (_, _, rates), mem in curve_groups.items()
                for r in mem
                if opts.missingness or rates == (0.0, 0.0, 0.0)
            ]
            tick = progress.stage("missing X-rays and ablations (checkpoints)", len(todo))
            no_checkpoint = [r.run_id for r in todo if (r.uses_cxr or opts.ablation) and not r.has_checkpoint]
            ready = [r for r in todo if r.run_id not in set(no_checkpoint)]
            for _ in no_checkpoint:
                tick()
            jobs = [(r, root, opts, opts.ablation and r.main) for r in ready]
            frames = {}
            for r, f in zip(ready, workers.map(_controlled_job, jobs), strict=True):
                frames[r.run_id] = f
                tick()
            if no_checkpoint:
                warnings.append(
                    f"{len(no_checkpoint)} run(s) without a checkpoint left out of the test-time "
                    f"missingness and ablation tables: {', '.join(no_checkpoint)}"
                )
            for (task, cohort, rates), all_members in sorted(curve_groups.items()):
                members = [r for r in all_members if r.run_id in frames]
                if not members:
                    continue
                if opts.ablation and rates == (0.0, 0.0, 0.0):
                    ablation_rows += _ablation_rows(task, cohort, members, frames, opts)
                if opts.missingness:
                    curve_rows += _curve_rows(task, cohort, rates[0], members, frames, opts, workers)
        tables["ablation"] = pd.DataFrame(ablation_rows, columns=ABLATION_COLUMNS if ablation_rows else None)
        tables["missingness_test"] = pd.DataFrame(curve_rows)
        tables["missingness_train"] = pd.DataFrame(
            _train_rate_rows(grouped, opts, workers) if opts.missingness else []
        )
        dropout = [r for r in records if not r.main]
        if dropout and opts.missingness:
            keys = {(r.task, r.cohort, r.method) for r in dropout}
            table = dropout_runs_table(r for r in records if (r.task, r.cohort, r.method) in keys)
            tables["dropout_runs"] = table
        else:
            tables["dropout_runs"] = pd.DataFrame()
        timings["modality"] = time.perf_counter() - t
    roles = method_roles(records)
    tables["findings"] = findings_table(
        tables,
        roles,
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
        "options": asdict(opts),
        "n_runs": len(records),
        "n_main_runs": len(main_runs),
        "run_ids": [r.run_id for r in records],
        "groups": group_info,
        "macro_label": MACRO,
        "missing_aware": sorted(m for m, role in roles.items() if role.missing_aware),
        "tables": {name: len(tables[name]) for name in TABLES},
        "warnings": warnings,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    path = write_analysis(runs_dir / ANALYSIS_DIR, tables, summary)
    return AnalysisResult(path=path, tables=tables, summary=summary)
