"""`carebench analyze` and `report` at paper scale: a runs directory of the paper plan's size with planted method
differences (predictions only, no training), then the time and memory of the analysis as runs and permutations grow.

    # 1. the runs: every run of a plan (default: the paper plan, 2,880 runs with 17 methods) on DATA, each a real
    #    finished run record written through carebench.runs (config.yaml, predictions of the test and validation
    #    stays of its fold, metrics.json from carebench's metrics, DONE), without a checkpoint
    python benchmarks/analysis_scale.py generate --data DATA --out RUNS [--plan paper] [--workers 2]
    # 2. subsets with the first k seeds (symlinks to the run folders: the same records, fewer of them)
    python benchmarks/analysis_scale.py subset --runs RUNS --out RUNS_1SEED --seeds 1 [--tasks los --cohorts base]
    # 3. analyze + report, each a fresh process: wall and CPU time, peak RSS, analyze's per-stage timings
    python benchmarks/analysis_scale.py measure --runs RUNS [--n-permutations 1000] [--n-bootstrap 100] \
        [--jobs 2] [--no-fairness] [--no-report]
    # 4. the analysis's units on one (task, cohort) group, CPU seconds each, one process: the paired permutation
    #    test of given method pairs (the analysis's defaults: 10,000 permutations, sequential h = 50) and one
    #    run's fairness (1,000 bootstrap resamples, every declared attribute and intersection)
    python benchmarks/analysis_scale.py units --runs RUNS_GROUP --pairs latefusion:lstm,mmtm:lstm \
        [--fairness-methods latefusion]

Planted differences (per task, label and stay; fixed by --seed): each method has a signal strength `strength[m]`
(EHR-only methods 1.0, the X-ray-only method 0.6 on stays with an X-ray and 0 without, fusion methods 1.0 plus an
X-ray gain on stays with one: 0 for four methods, 0.1-0.5 for the others), so some fusion methods beat the best
unimodal method and some do not. A stay's score for a binary label is sigmoid(strength x (2y - 1) + noise) with
noise N(0, 1.5) drawn per (method, seed, stay, label); a run trained with X-rays removed loses that share of its
X-ray gain. LOS scores are a softmax of strength x one-hot(class) + noise. Without checkpoints the analysis
leaves out the forward passes (test-time missingness and ablations) and says so in its warnings; their cost is
model inference, which docs/performance.md estimates from the measured step times.
"""

from __future__ import annotations

import os.path
import sys

if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import hashlib
import json
import os
import platform
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

NULL_FUSION = ("latefusion", "mmtm", "smil", "flexmoe")  # fusion methods without any X-ray gain


def _rng(*keys: object) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([str(k) for k in keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def gains(models: list[str], modalities: dict[str, list[str]]) -> dict[str, float]:
    """The planted X-ray gain of every fusion method (0 for NULL_FUSION, then 0.1, 0.2, ... cycling to 0.5)."""
    fusion = [m for m in models if len(modalities[m]) == 2]
    out, k = {}, 0
    for m in fusion:
        if m in NULL_FUSION:
            out[m] = 0.0
        else:
            out[m] = round(0.1 * (k % 5 + 1), 1)
            k += 1
    return out


def scores(cfg: dict, split: str, y: np.ndarray, has: np.ndarray, kind: str, gain: float) -> np.ndarray:
    """Planted probabilities of one run for its stays (see the module docstring)."""
    mods = cfg["modalities"]
    if mods == ["cxr"]:
        strength = np.where(has, 0.6, 0.0)
    else:
        kept = 1.0 - float(cfg["cxr_dropout_train"])
        strength = 1.0 + (gain * kept * has if "cxr" in mods else np.zeros(len(y)))
    strength = np.asarray(strength, dtype=np.float64)[:, None]
    rng = _rng(
        cfg["model"], cfg["task"], cfg["cohort"], cfg["fold"], cfg["seed"], cfg["cxr_dropout_train"], split
    )
    if kind == "multiclass":
        k = 7
        logits = strength * np.eye(k)[y] + rng.normal(0, 1.5, (len(y), k))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    yy = y.reshape(len(y), -1)
    logits = strength * (2 * yy - 1) + rng.normal(0, 1.5, yy.shape)
    return 1.0 / (1.0 + np.exp(-logits))


def write_run(job: tuple[str, str, dict, float]) -> str:
    """One finished run record (config.yaml, predictions, validation predictions, metrics.json, DONE)."""
    from carebench import runs
    from carebench.data.folds import cxr_dropout, split_rows
    from carebench.data.store import open_dataset
    from carebench.evaluation.metrics import compute_metrics
    from carebench.tasks import get_task

    runs_dir, data, cfg, gain = job
    if runs.is_done(runs_dir, runs.run_id(cfg)):
        return runs.run_id(cfg)
    ds = _dataset(data, open_dataset)
    cohort = ds.cohort
    task, kind = cfg["task"], get_task(cfg["task"]).kind
    labels = ds.label_columns(task)
    rows = split_rows(cohort, labels, cfg["fold"], cfg["cohort"])
    names = ds.output_names(task)
    work = runs.start_run(runs_dir, cfg)
    frames = {}
    for split in ("val", "test"):
        r = rows[split]
        ids = cohort["stay_id"].to_numpy(np.int64)[r]
        has = cohort["has_cxr"].to_numpy(bool)[r]
        rate = float(cfg[f"cxr_dropout_{split}"])
        has = has & ~cxr_dropout(ids, has, rate, int(cfg["cxr_dropout_seed"])) if rate else has
        y = cohort[labels].to_numpy()[r]
        y = y[:, 0].astype(np.int64) if kind == "multiclass" else y.astype(np.int64)
        p = scores(cfg, split, y, has, kind, gain)
        frames[split] = runs.predictions_frame(task, names, {"stay_id": ids, "has_cxr": has, "y": y, "p": p})
    frames["test"].to_parquet(work / runs.PREDICTIONS, index=False)
    frames["val"].to_parquet(work / runs.VAL_PREDICTIONS, index=False)
    test = frames["test"]
    yt, pt, _ = runs.prediction_arrays(test, task)
    metrics = {
        "run_id": runs.run_id(cfg),
        "model": cfg["model"],
        "task": task,
        "cohort": cfg["cohort"],
        "fold": cfg["fold"],
        "seed": cfg["seed"],
        "selection_metric": get_task(task).selection_metric,
        "test": compute_metrics(task, yt, pt, names),
        "synthetic_predictions": "benchmarks/analysis_scale.py (planted, no training)",
    }
    runs.write_json(work / runs.METRICS, metrics)
    return runs.finish_run(work).name


_DATASETS: dict[str, object] = {}


def _dataset(path: str, opener):
    if path not in _DATASETS:
        _DATASETS[path] = opener(path, mmap=True)
    return _DATASETS[path]


def generate(args: argparse.Namespace) -> None:
    from carebench import runs
    from carebench.experiments.plan import expand_plan, load_plan, plan_record

    t0 = time.perf_counter()
    plan = load_plan(args.plan)
    configs = expand_plan(plan, args.data)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / runs.PLAN_FILE).write_text(yaml.safe_dump(plan_record(plan, configs), sort_keys=False))
    models = sorted({c.model for c in configs})
    planted = gains(models, {c.model: c.modalities for c in configs})
    (out / "planted_gains.json").write_text(json.dumps(planted, indent=2) + "\n")
    jobs = [(str(out), str(args.data), c.to_dict(), planted.get(c.model, 0.0)) for c in configs]
    print(f"{len(jobs)} runs of plan {plan.name!r} on {args.data}; writing to {out}", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for i, _ in enumerate(pool.map(write_run, jobs, chunksize=8), 1):
            if i % 200 == 0 or i == len(jobs):
                print(f"  {i}/{len(jobs)} runs ({time.perf_counter() - t0:.0f} s)", flush=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"done in {time.perf_counter() - t0:.0f} s; {size / 2**30:.2f} GiB on disk")


def subset(args: argparse.Namespace) -> None:
    """A runs directory with the runs of the first --seeds seeds (symlinked), optionally only those of --tasks and
    --cohorts, and the same plan.yaml."""
    from carebench import runs

    src, dst = Path(args.runs).absolute(), Path(args.out).absolute()
    dst.mkdir(parents=True, exist_ok=True)
    plan = yaml.safe_load((src / runs.PLAN_FILE).read_text())
    seeds = sorted(plan["seeds"])[: args.seeds]
    plan["seeds"] = seeds
    (dst / runs.PLAN_FILE).write_text(yaml.safe_dump(plan, sort_keys=False))
    n = 0
    for run in sorted(src.glob(f"*/{runs.DONE}")):
        folder = run.parent
        cfg = runs.read_config(folder)
        if (
            cfg["seed"] in seeds
            and (not args.tasks or cfg["task"] in args.tasks.split(","))
            and (not args.cohorts or cfg["cohort"] in args.cohorts.split(","))
        ):
            link = dst / folder.name
            if not link.exists():
                link.symlink_to(folder)
            n += 1
    print(f"{n} runs with seeds {seeds} in {dst}")


def _timed(cmd: list[str]) -> tuple[float, float, float, float]:
    """Wall seconds, CPU seconds of the whole process tree (user + system, sampled every 0.2 s: the analysis's
    worker processes are not waited for by it, so rusage would miss them), CPU seconds of the top process alone,
    and the peak of the tree's summed RSS (MiB) of `cmd`."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    top = psutil.Process(proc.pid)
    cpu: dict[int, float] = {}
    peak = 0
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = 0
        for p in tree:
            try:
                t = p.cpu_times()
                cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, rss)
        time.sleep(0.2)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, sum(cpu.values()), cpu.get(proc.pid, 0.0), peak / 2**20


def measure(args: argparse.Namespace) -> None:
    from carebench import runs

    exe = str(Path(sys.executable).with_name("carebench"))
    n_runs = len(list(Path(args.runs).glob(f"*/{runs.DONE}")))
    cmd = [exe, "analyze", args.runs, "--n-permutations", str(args.n_permutations), "--no-progress"]
    if args.n_bootstrap:
        cmd += ["--n-bootstrap", str(args.n_bootstrap)]
    if args.jobs:
        cmd += ["--jobs", str(args.jobs)]
    if args.no_fairness:
        cmd += ["--skip-fairness"]
    load = os.getloadavg()
    wall, cpu, cpu_top, rss = _timed(cmd)
    summary = json.loads((Path(args.runs) / "analysis" / "summary.json").read_text())
    nan = float("nan")
    r_wall, r_cpu, _, r_rss = _timed([exe, "report", args.runs]) if not args.no_report else (nan,) * 4
    print(
        json.dumps(
            {
                "runs": n_runs,
                "n_permutations": args.n_permutations,
                "n_bootstrap": summary["options"]["n_bootstrap"],
                "jobs": args.jobs,
                "analyze_s": round(wall, 1),
                "analyze_cpu_s": round(cpu, 1),
                "analyze_cpu_main_process_s": round(cpu_top, 1),
                "analyze_peak_rss_all_processes_mib": round(rss),
                "stages_s": summary["timings_s"],
                "report_s": round(r_wall, 1),
                "report_cpu_s": round(r_cpu, 1),
                "report_peak_rss_mib": round(r_rss) if r_rss == r_rss else None,
                "analyze_command": " ".join(cmd),
                "load_before": [round(x, 1) for x in load],
                "load_after": [round(x, 1) for x in os.getloadavg()],
                "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}",
            }
        ),
        flush=True,
    )


def _main_groups(runs_dir: str):
    """The main (no X-ray dropout) runs of a runs directory by (task, cohort), their dataset, and the fairness
    attributes and intersections `carebench analyze` would use for them."""
    from carebench.analysis.analyze import fairness_attributes
    from carebench.analysis.options import resolve_options
    from carebench.analysis.pooling import groups, load_runs
    from carebench.data.store import open_dataset
    from carebench.experiments.plan import read_plan_record

    records = load_runs(runs_dir)
    main = {k[:2]: v for k, v in groups(records).items() if k[2] == (0.0, 0.0, 0.0)}
    ds = open_dataset(records[0].data, mmap=True)
    attributes = fairness_attributes(ds, resolve_options(read_plan_record(runs_dir)).fairness_attributes)
    return main, ds, attributes, [i for i in ds.intersections if set(i) <= set(attributes)]


def units(args: argparse.Namespace) -> None:
    """CPU seconds of the paired permutation test of each of --pairs and of one run's fairness per method of
    --fairness-methods, on the runs' only (task, cohort) group of main runs; one JSON line per unit."""
    from carebench.analysis import comparisons as cmp
    from carebench.analysis.fairness import analyze_fairness
    from carebench.analysis.pooling import recorded_predictions
    from carebench.evaluation import statistics as st
    from carebench.runs import read_predictions

    main, ds, attributes, inter = _main_groups(args.runs)
    if len(main) != 1:
        raise SystemExit(f"{args.runs}: expected the runs of one (task, cohort) group, got {sorted(main)}")
    (task, cohort), members = next(iter(main.items()))
    test = recorded_predictions(members)
    pooled = cmp.pool_predictions(test, task)
    names = runs_names(test, task)
    keys = cmp._expand_keys(task, None, names)
    for pair in filter(None, args.pairs.split(",")):
        a, b = pair.split(":")
        y, pa, pb, *_ = cmp._align(pooled[a], pooled[b], names, a, b)
        t = time.process_time()
        res = st.paired_permutation_tests(
            y,
            pa,
            pb,
            keys,
            names=names,
            n_permutations=args.n_permutations,
            seed=0,
            sequential_h=args.sequential_h,
        )
        cpu = time.process_time() - t
        used = sorted(r.n_permutations for r in res.values())
        print(json.dumps({"unit": "permutation", "task": task, "cohort": cohort, "pair": pair, "stays": len(y),
                          "keys": len(keys), "cpu_s": round(cpu, 1), "permutations_min_median_max":
                          [used[0], used[len(used) // 2], used[-1]], "keys_at_all_permutations":
                          sum(u == args.n_permutations for u in used)}), flush=True)  # fmt: skip
    stay_groups = ds.groups()
    for method in filter(None, args.fairness_methods.split(",")):
        r = next(r for r in members if r.method == method)
        test_r, val_r = read_predictions(r), read_predictions(r, "val")
        t = time.process_time()
        rep = analyze_fairness(test_r, stay_groups, task, val_predictions=val_r, n_resamples=args.n_bootstrap,
                               attributes=attributes, intersections=inter)  # fmt: skip
        cpu = time.process_time() - t
        print(json.dumps({"unit": "fairness", "task": task, "cohort": cohort, "run": r.run_id, "stays": len(test_r),
                          "group_rows": len(rep.groups), "cpu_s": round(cpu, 1)}), flush=True)  # fmt: skip


def runs_names(frame, task: str) -> list[str]:
    from carebench import runs

    return runs.prediction_columns(frame.columns, task)[2]


def main() -> None:
    from carebench.evaluation.options import DEFAULTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--data", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--plan", default="paper")
    g.add_argument("--workers", type=int, default=2)
    s = sub.add_parser("subset")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seeds", type=int, required=True, help="keep the runs of the first k seeds of the plan")
    s.add_argument("--tasks", default="", help="comma-separated: keep only these tasks' runs")
    s.add_argument("--cohorts", default="", help="comma-separated: keep only these cohorts' runs")
    m = sub.add_parser("measure")
    m.add_argument("--runs", required=True)
    m.add_argument("--n-permutations", type=int, default=10_000)
    m.add_argument("--n-bootstrap", type=int, default=0, help="analyze --n-bootstrap (0: the plan's)")
    m.add_argument("--jobs", type=int, default=0, help="analyze --jobs (0: its default)")
    m.add_argument("--no-fairness", action="store_true")
    m.add_argument("--no-report", action="store_true")
    u = sub.add_parser("units", help="CPU s of given pairs' permutation tests and of one run's fairness")
    u.add_argument("--runs", required=True, help="the runs of one (task, cohort) group (see subset)")
    u.add_argument("--pairs", default="", help="comma-separated method pairs a:b")
    u.add_argument("--fairness-methods", default="", help="comma-separated methods: one run's fairness each")
    u.add_argument("--n-permutations", type=int, default=DEFAULTS.n_permutations)
    u.add_argument("--sequential-h", type=int, default=DEFAULTS.sequential_h)
    u.add_argument("--n-bootstrap", type=int, default=DEFAULTS.n_bootstrap)
    args = ap.parse_args()
    commands = {"generate": generate, "subset": subset, "measure": measure, "units": units}
    commands[args.command](args)


if __name__ == "__main__":
    main()
