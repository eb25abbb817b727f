"""`carebench analyze RUNS`: every finished run of a benchmark -> the result tables of the report.

Why one command: the statistics, fairness and modality modules each answer one question about one set of
predictions; a benchmark needs all of them over every method, task and cohort, with the same resampling seed
and the same rules for pooling runs, written once so the report (and anyone with pandas) reads finished tables.

What it does (docs/report.md has every table and column):

- Runs are discovered by scanning `RUNS/*/DONE` (`experiments.results.find_runs`), grouped by task x cohort x
  X-ray dropout setting. Methods are model names; unimodal methods are those whose class reads one modality.
- Main runs (no X-ray removed in any split): leaderboard (`statistics.method_metrics`: every metric, bootstrap
  CI, folds concatenated, seeds averaged) and comparisons (`statistics.compare_methods`: each fusion method vs
  the best unimodal method, all pairs, per phenotype; permutation p-values with Holm and BH).
- Fairness per main run (`fairness.analyze_fairness`), thresholds chosen on the run's validation predictions
  (`predictions_val.parquet`, or recomputed from the checkpoint for older records).
- Natural missingness: main-run test predictions split by the stay's X-ray availability (base cohort).
- Test-time missingness and modality contribution from the checkpoints: per run, the test split with every
  X-ray (`full`), without any (`drop_cxr`) and without the EHR (`drop_ehr`). Predictions at a test missing rate
  r take `drop_cxr` for the stays whose X-ray is removed at r (`modality.RunPredictor.dropped`, nested and
  seeded) and `full` for the others. This equals predicting at rate r directly because the model contract
  makes each stay's prediction independent of the other stays in the batch and of a missing image's pixels
  (tests check it to 1e-6), and it costs two passes per run instead of one per rate.
- Train/validation missing rates: runs trained with X-rays removed, pooled per method and rate.
- Every table gets bootstrap CIs from the same seed; tables are written to `RUNS/analysis/` (parquet + csv)
  with `summary.json`, atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from carebench import __version__
from carebench.data.definitions import LOS_CLASS_NAMES, load_phenotypes
from carebench.data.store import ProcessedDataset, atomic_output_dir, open_dataset
from carebench.errors import UserError
from carebench.evaluation import statistics as st
from carebench.evaluation.fairness import ATTRIBUTES, INTERSECTIONS, MACRO, analyze_fairness
from carebench.evaluation.metrics import SELECTION_METRIC

if TYPE_CHECKING:  # imported where used: the experiments package imports torch, which `report` does not need
    from carebench.experiments import results as rs

ANALYSIS_DIR = "analysis"
SUMMARY = "summary.json"
# The overall metrics of the curves, ablations and subsets (the leaderboard and comparisons have every metric).
HEADLINE = {
    "mortality": ("auroc", "auprc"),
    "phenotype": ("auroc_macro", "auprc_macro"),
    "los": ("auroc_ovr_macro", "accuracy"),
}
DEFAULTS = {"n_bootstrap": 1000, "n_permutations": 10000, "confidence": 0.95, "seed": 0}
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
DEFAULT_TEST_RATES = tuple(round(0.1 * i, 1) for i in range(10))
TABLES = (
    "runs",
    "cohort_overview",
    "cohort_steps",
    "cohort_folds",
    "cohort_labels",
    "leaderboard",
    "comparisons",
    "fairness_groups",
    "fairness_summary",
    "fairness_thresholds",
    "missingness_natural",
    "missingness_test",
    "missingness_train",
    "dropout_runs",
    "ablation",
)


class AnalysisError(UserError, ValueError):
    """Options or runs the analysis cannot use (the message names the option, file or run)."""


@dataclass
class AnalysisOptions:
    """Resolved options (command line > RUNS/plan.yaml > DEFAULTS); recorded in summary.json."""

    n_bootstrap: int = 1000
    n_permutations: int = 10000
    confidence: float = 0.95
    seed: int = 0
    fairness: bool = True
    fairness_attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    missingness: bool = True
    ablation: bool = True
    test_rates: list[float] = field(default_factory=lambda: list(DEFAULT_TEST_RATES))
    device: str = "cpu"
    label_groups: dict[str, list[str]] = field(default_factory=dict)
    label_groups_source: str = ""


def read_label_groups(
    source: str | Path | Mapping[str, Any], what: str = "--label-groups"
) -> dict[str, list[str]]:
    """Phenotype label groups from a mapping or a JSON/YAML file: `{group: [labels]}`, or the planted.json of
    `carebench synth` (`{"phenotypes": {label: kind}}` -> one group per kind, in order of first appearance)."""
    import yaml

    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise AnalysisError(f"{what} {path}: not a readable JSON or YAML file ({e})") from None
    if isinstance(data, Mapping) and isinstance(data.get("phenotypes"), Mapping):
        kinds = data["phenotypes"]
        data = {}
        for label, kind in kinds.items():
            data.setdefault(str(kind), []).append(str(label))
    # the labels themselves are checked against the runs' phenotype columns by the statistics
    if problem := st.label_groups_problem(data):
        raise AnalysisError(
            f"{what} {source}: {problem} (e.g. {{cardiac: [pheno_congestive_heart_failure, ...]}}, "
            "or a planted.json)"
        )
    return {str(g): list(dict.fromkeys(v)) for g, v in data.items()}


def resolve_options(plan: dict[str, Any] | None, **given: Any) -> AnalysisOptions:
    """Options from the command line (`given`, None = not given), else the plan's, else DEFAULTS; validated."""
    unknown = sorted(
        set(given)
        - {"fairness", "missingness", "ablation", "test_rates", "device", "label_groups", *DEFAULTS}
    )
    if unknown:
        raise AnalysisError(f"unknown analysis option(s) {unknown}")
    plan = plan or {}
    stats = plan.get("statistics") or {}
    out = AnalysisOptions()
    for key, default in DEFAULTS.items():
        value = given.get(key)
        setattr(out, key, value if value is not None else stats.get(key, default))
    for key in ("n_bootstrap", "n_permutations"):
        v = getattr(out, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise AnalysisError(f"--{key.replace('_', '-')}: expected an integer >= 1, got {v!r}")
    if isinstance(out.seed, bool) or not isinstance(out.seed, int) or out.seed < 0:
        raise AnalysisError(f"--seed: expected an integer >= 0, got {out.seed!r}")
    if not 0.0 < float(out.confidence) < 1.0:
        raise AnalysisError(f"--confidence: expected a number in (0, 1), got {out.confidence!r}")
    out.confidence = float(out.confidence)
    fair = plan.get("fairness") or {}
    out.fairness = given["fairness"] if given.get("fairness") is not None else bool(fair.get("enabled", True))
    out.fairness_attributes = list(fair.get("attributes") or ATTRIBUTES)
    out.missingness = given.get("missingness") is not False
    out.ablation = given.get("ablation") is not False
    rates = given.get("test_rates") or (plan.get("missingness") or {}).get("test_rates") or DEFAULT_TEST_RATES
    rates = sorted({0.0, *(float(r) for r in rates)})
    if any(not 0.0 <= r <= 1.0 for r in rates):
        raise AnalysisError(f"test missing rates: expected numbers in [0, 1], got {rates}")
    out.test_rates = rates
    out.device = given.get("device") or "cpu"
    groups = given.get("label_groups")
    what = "--label-groups"
    if groups is None and stats.get("label_groups") is not None:
        groups, what = stats["label_groups"], "plan statistics.label_groups"
    if groups is not None:
        out.label_groups = read_label_groups(groups, what)
        out.label_groups_source = str(groups) if isinstance(groups, str | Path) else "plan"
    return out


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
def _names(task: str, frame: pd.DataFrame) -> list[str]:
    return st.task_columns(frame.columns, task)[2]


def _headline(task: str, opts: AnalysisOptions) -> list[str]:
    """HEADLINE metrics of a task, plus their label-group macro averages (phenotype, with --label-groups)."""
    metrics = list(HEADLINE[task])
    if task == "phenotype":
        metrics += [st.group_key(m, g) for g in opts.label_groups for m in HEADLINE[task]]
    return metrics


def _groups(task: str, opts: AnalysisOptions) -> dict[str, list[str]] | None:
    return opts.label_groups if task == "phenotype" and opts.label_groups else None


def _pooled_cis(
    long: pd.DataFrame, task: str, metrics: Sequence[str], opts: AnalysisOptions
) -> dict[str, tuple[st.PooledPredictions, dict[str, st.BootstrapResult]]]:
    """Per method: seed-pooled predictions and bootstrap CIs of `metrics`."""
    pooled = st.pool_predictions(long, task)
    names = _names(task, long)
    return {
        m: (
            pp,
            st.bootstrap_cis(
                pp.y,
                pp.p,
                metrics,
                names=names,
                n_resamples=opts.n_bootstrap,
                ci=opts.confidence,
                seed=opts.seed,
                groups=_groups(task, opts),
            ),
        )
        for m, pp in pooled.items()
    }


def _n_cxr(long: pd.DataFrame, method: str) -> float:
    """Stays given an X-ray per (fold-concatenated) seed of a method."""
    part = long.loc[long["method"] == method]
    return float(part["cxr_input"].sum()) / max(1, part["seed"].nunique()) if "cxr_input" in part else np.nan


def _ci_row(res: st.BootstrapResult) -> dict[str, float]:
    return {"value": res.estimate, "ci_low": res.ci_low, "ci_high": res.ci_high}


def _head_frame(frame: pd.DataFrame, head: str, task: str) -> pd.DataFrame:
    """Predictions of one per-modality head as if it were the model's output (p_<name>__<head> -> p_<name>)."""
    names = _names(task, frame)
    cols = {f"p_{n}__{head}": f"p_{n}" for n in names}
    keep = [c for c in frame.columns if not (c.startswith("p_") and "__" in c) and c not in cols.values()]
    return pd.concat([frame[keep], frame[list(cols)].rename(columns=cols)], axis=1)


def _concat(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _heads(frame: pd.DataFrame) -> list[str]:
    return sorted({c.split("__", 1)[1] for c in frame.columns if c.startswith("p_") and "__" in c})


# ------------------------------------------------------------------------------------------------ stages
def _statistics(
    task: str, cohort: str, members: list[rs.RunRecord], test: pd.DataFrame, opts: AnalysisOptions
) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    unimodal = sorted({r.method for r in members if r.unimodal})
    board = st.method_metrics(
        test,
        task,
        n_resamples=opts.n_bootstrap,
        ci=opts.confidence,
        seed=opts.seed,
        label_groups=_groups(task, opts),
    )
    mods = {r.method: "+".join(r.modalities) for r in members}
    runs = {m: sum(1 for r in members if r.method == m) for m in mods}
    board.insert(1, "cohort", cohort)
    board.insert(3, "modalities", board["method"].map(mods))
    board["n_runs"] = board["method"].map(runs)
    reference = None
    if len(mods) > 1:
        comp = st.compare_methods(
            test,
            task,
            unimodal=unimodal,
            n_resamples=opts.n_bootstrap,
            n_permutations=opts.n_permutations,
            ci=opts.confidence,
            seed=opts.seed,
            label_groups=_groups(task, opts),
        )
        reference = comp.attrs.get("reference")
        comp.attrs = {}
        comp.insert(1, "cohort", cohort)
    else:
        comp = pd.DataFrame()
    return board, comp, reference


def _natural(
    task: str, cohort: str, test: pd.DataFrame, has_cxr: pd.Series, opts: AnalysisOptions
) -> pd.DataFrame:
    """Headline metrics on all test stays, those with and those without a linked X-ray (dataset's has_cxr)."""
    avail = test["stay_id"].map(has_cxr).astype(bool)
    rows = []
    metrics = _headline(task, opts)
    base = {}
    for subset, part in (("all", test), ("with_cxr", test[avail]), ("without_cxr", test[~avail])):
        if part.empty:
            continue
        for method, (pp, cis) in _pooled_cis(part, task, metrics, opts).items():
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


def _fairness(
    members: list[rs.RunRecord],
    cohort_df: pd.DataFrame,
    opts: AnalysisOptions,
    root: Path,
    warn: Callable[[str], None],
    tick: Callable[[], None],
) -> dict[str, pd.DataFrame]:
    """Fairness tables of each main run (thresholds from its validation predictions), with run key columns."""
    from carebench.experiments import results as rs

    attrs = opts.fairness_attributes
    inter = [i for i in INTERSECTIONS if set(i) <= set(attrs)]
    g_parts, s_parts, t_parts = [], [], []
    for r in members:
        test = rs.read_predictions(r)
        val = rs.read_predictions(r, "val")
        if val is None and r.task != "los":
            from carebench.evaluation.modality import RunPredictor

            val = RunPredictor(r.path, root, device=opts.device).predict(split="val")
        try:
            rep = analyze_fairness(
                test,
                cohort_df,
                r.task,
                val_predictions=val,
                n_resamples=opts.n_bootstrap,
                seed=opts.seed,
                confidence=opts.confidence,
                attributes=attrs,
                intersections=inter,
            )
        except UserError as e:
            warn(f"fairness of run {r.run_id} skipped: {e}")
            tick()
            continue
        key = {
            "task": r.task,
            "cohort": r.cohort,
            "method": r.method,
            "run_id": r.run_id,
            "fold": r.config.fold,
            "seed": r.config.seed,
        }
        g_parts.append(pd.concat([pd.DataFrame(key, index=rep.groups.index), rep.groups], axis=1))
        s_parts.append(pd.concat([pd.DataFrame(key, index=rep.summary.index), rep.summary], axis=1))
        t_parts.append(pd.DataFrame([{**key, "label": k, "threshold": v} for k, v in rep.thresholds.items()]))
        tick()
    return {
        "fairness_groups": _concat(g_parts),
        "fairness_summary": _concat(s_parts),
        "fairness_thresholds": _concat(t_parts),
    }


@dataclass
class RunFrames:
    """A run's test predictions under the controlled inputs (predictions.parquet columns, sorted by stay)."""

    full: pd.DataFrame
    drop_cxr: pd.DataFrame
    drop_ehr: pd.DataFrame | None
    at_rate: dict[float, pd.DataFrame]


def controlled_predictions(r: rs.RunRecord, root: Path, opts: AnalysisOptions, ablation: bool) -> RunFrames:
    """Forward passes of one run's checkpoint: full, drop_cxr (X-ray models), drop_ehr (for ablation only),
    composed into the test-time missingness rates (module docstring)."""
    from carebench.experiments import results as rs

    need_model = r.uses_cxr or (ablation and r.uses_ehr)
    if not need_model:
        full = rs.read_predictions(r)
        return RunFrames(full, full, None, dict.fromkeys(opts.test_rates, full))
    from carebench.evaluation.modality import RunPredictor

    pred = RunPredictor(r.path, root, device=opts.device)
    # The recorded test predictions are the `full` condition exactly for a 32-bit run tested with every X-ray
    # (tests/test_modality.py), which saves the costliest pass; otherwise predict again with the same code.
    if r.config.precision == "32-true" and r.dropout[2] == 0.0:
        full = rs.read_predictions(r)
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


def _ablation_rows(
    task: str, cohort: str, members: list[rs.RunRecord], frames: dict[str, RunFrames], opts: AnalysisOptions
) -> list[dict]:
    """Per method: metric under full / drop_cxr / drop_ehr / head:<name>, CI, and paired-bootstrap delta vs full."""
    from carebench.experiments import results as rs

    metrics = _headline(task, opts)
    full_long = rs.long_predictions((r, frames[r.run_id].full) for r in members)
    conditions: dict[str, pd.DataFrame] = {
        "drop_cxr": rs.long_predictions((r, frames[r.run_id].drop_cxr) for r in members),
        "drop_ehr": rs.long_predictions((r, frames[r.run_id].drop_ehr) for r in members),
    }
    for head in _heads(full_long):
        with_head = [r for r in members if head in _heads(frames[r.run_id].full)]
        conditions[f"head:{head}"] = rs.long_predictions(
            (r, _head_frame(frames[r.run_id].full, head, task)) for r in with_head
        )
    names = _names(task, full_long)
    full_pool = st.pool_predictions(full_long, task)
    rows = []
    for method, pp in full_pool.items():
        cis = st.bootstrap_cis(
            pp.y,
            pp.p,
            metrics,
            names=names,
            n_resamples=opts.n_bootstrap,
            ci=opts.confidence,
            seed=opts.seed,
            groups=_groups(task, opts),
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
        for cond, long in conditions.items():
            part = long.loc[long["method"] == method]
            if part.empty:
                continue
            other = st.pool_predictions(part, task)[method]
            if not np.array_equal(other.stay_id, pp.stay_id):
                raise AnalysisError(f"method {method!r}: condition {cond} predicts other stays than full")
            own = st.bootstrap_cis(
                other.y,
                other.p,
                metrics,
                names=names,
                n_resamples=opts.n_bootstrap,
                ci=opts.confidence,
                seed=opts.seed,
                groups=_groups(task, opts),
            )
            delta = st.paired_bootstrap_cis(
                pp.y,
                other.p,
                pp.p,
                metrics,
                names=names,
                n_resamples=opts.n_bootstrap,
                ci=opts.confidence,
                seed=opts.seed,
                groups=_groups(task, opts),
            )
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
    members: list[rs.RunRecord],
    frames: dict[str, RunFrames],
    opts: AnalysisOptions,
) -> list[dict]:
    """Per method and test-time missing rate: headline metrics of the seed-pooled predictions, CI, delta."""
    from carebench.experiments import results as rs

    metrics = _headline(task, opts)
    rows = []
    first: dict[tuple[str, str], float] = {}
    for rate in opts.test_rates:
        long = rs.long_predictions((r, frames[r.run_id].at_rate[rate]) for r in members)
        for method, (pp, cis) in _pooled_cis(long, task, metrics, opts).items():
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


def _train_rate_rows(grouped: dict, opts: AnalysisOptions) -> list[dict]:
    """Per (task, cohort, method) with runs trained at X-ray dropout r > 0: test metrics at every train rate."""
    from carebench.experiments import results as rs

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
        long = rs.long_predictions((r, rs.read_predictions(r)) for r in chosen)
        for method, (pp, cis) in _pooled_cis(long, task, _headline(task, opts), opts).items():
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
    plan / default), test_rates, device. `data` overrides the dataset path recorded in the runs (same
    fingerprint required). `console`: a Rich console for progress (None = silent).
    """
    from carebench.experiments import results as rs
    from carebench.training.config import dataset_fingerprint

    t0 = time.perf_counter()
    runs_dir = Path(runs_dir)
    records = rs.find_runs(runs_dir)
    plan = rs.read_plan(runs_dir)
    opts = resolve_options(plan, **options)
    data_path, fingerprint = rs.common_dataset(records)
    root = Path(data) if data is not None else Path(data_path)
    if not (root / "manifest.json").is_file():
        raise AnalysisError(f"{root}: dataset of the runs not found (pass --data DIR if it moved)")
    if dataset_fingerprint(root) != fingerprint:
        raise AnalysisError(
            f"{root}: not the dataset the runs were trained on (manifest fingerprint differs)"
        )
    ds = open_dataset(root, mmap=True)
    has_cxr = ds.cohort.set_index("stay_id")["has_cxr"].astype(bool)
    grouped = rs.groups(records)
    main = {k[:2]: v for k, v in grouped.items() if k[2] == (0.0, 0.0, 0.0)}
    warnings: list[str] = []
    timings: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {"runs": rs.runs_table(records), **cohort_tables(ds)}
    group_info = []
    with _Progress(console) as progress:
        t = time.perf_counter()
        tick = progress.stage("statistics (leaderboard, comparisons)", len(main))
        boards, comps, natural = [], [], []
        for (task, cohort), members in sorted(main.items()):
            test = rs.long_predictions((r, rs.read_predictions(r)) for r in members)
            board, comp, reference = _statistics(task, cohort, members, test, opts)
            boards.append(board)
            comps.append(comp)
            if opts.missingness and cohort == "base":
                natural.append(_natural(task, cohort, test, has_cxr, opts))
            group_info.append(
                {
                    "task": task,
                    "cohort": cohort,
                    "methods": sorted({r.method for r in members}),
                    "unimodal": sorted({r.method for r in members if r.unimodal}),
                    "reference": reference,
                    "selection_metric": SELECTION_METRIC[task],
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
            tables.update(_fairness(main_runs, ds.cohort, opts, root, warnings.append, tick))
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
            frames, no_checkpoint = {}, []
            for r in todo:
                if (r.uses_cxr or opts.ablation) and not (r.path / "checkpoint").is_file():
                    no_checkpoint.append(r.run_id)
                else:
                    frames[r.run_id] = controlled_predictions(
                        r, root, opts, ablation=opts.ablation and r.main
                    )
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
                    curve_rows += _curve_rows(task, cohort, rates[0], members, frames, opts)
        tables["ablation"] = pd.DataFrame(ablation_rows, columns=ABLATION_COLUMNS if ablation_rows else None)
        tables["missingness_test"] = pd.DataFrame(curve_rows)
        tables["missingness_train"] = pd.DataFrame(
            _train_rate_rows(grouped, opts) if opts.missingness else []
        )
        dropout = [r for r in records if not r.main]
        if dropout and opts.missingness:
            from carebench.evaluation.modality import dropout_runs_table

            keys = {(r.task, r.cohort, r.method) for r in dropout}
            table = dropout_runs_table(r.path for r in records if (r.task, r.cohort, r.method) in keys)
            tables["dropout_runs"] = table
        else:
            tables["dropout_runs"] = pd.DataFrame()
        timings["modality"] = time.perf_counter() - t
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
        "tables": {name: len(tables[name]) for name in TABLES},
        "warnings": warnings,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    path = write_analysis(runs_dir / ANALYSIS_DIR, tables, summary)
    return AnalysisResult(path=path, tables=tables, summary=summary)


def write_analysis(out: Path, tables: dict[str, pd.DataFrame], summary: dict[str, Any]) -> Path:
    """Every table as `<name>.parquet` and `<name>.csv`, and summary.json, into `out` (replaced atomically)."""
    with atomic_output_dir(out, overwrite=True) as tmp:
        for name, df in tables.items():
            df = df.copy()
            df.attrs = {}
            df.to_parquet(tmp / f"{name}.parquet", index=False)
            df.to_csv(tmp / f"{name}.csv", index=False)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def load_analysis(runs_dir: str | Path) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The tables and summary written by `analyze` (an error naming the command when they are missing)."""
    path = Path(runs_dir) / ANALYSIS_DIR
    if not (path / SUMMARY).is_file():
        raise AnalysisError(f"{path}: no analysis found; run `carebench analyze {runs_dir}` first")
    summary = json.loads((path / SUMMARY).read_text())
    tables = {}
    for name in TABLES:
        f = path / f"{name}.parquet"
        if not f.is_file():
            raise AnalysisError(f"{f}: missing (re-run `carebench analyze {runs_dir}`)")
        tables[name] = pd.read_parquet(f)
    return tables, summary
