"""Measure `carebench train`: wall time and peak RSS per model, plus the batch loader's throughput.

Each run is a fresh `carebench train --no-progress` subprocess limited to --threads CPU threads (so the peak RSS
is that process's own and runs do not share caches); the run record's metrics.json gives epochs trained and the
fit/test split of the time. The loader is timed separately over one training epoch (EHR imputation + scaling,
X-ray read + resize + normalisation, and the training-time augmentation), so its share of a run is visible.
Prints a Markdown table for docs/performance.md.

    python benchmarks/train.py --data DATA [--models lstm,latefusion] [--task mortality] [--preset quick]
    python benchmarks/train.py --stays 2000        # synthesise + prepare first (needs `carebench synth`)
"""

from __future__ import annotations

import os.path
import sys

# Run as a file, this script's folder is sys.path[0]: drop it so a sibling script (e.g. benchmarks/statistics_throughput.py)
# cannot shadow a standard-library module that torch or Lightning imports.
if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CAREBENCH = str(Path(sys.executable).with_name("carebench"))
WRAPPER = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def synthesise(stays: int, work: Path) -> Path:
    raw, data = work / "raw", work / "data"
    subprocess.run([CAREBENCH, "synth", "--out", str(raw), "--stays", str(stays), "--seed", "0"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([CAREBENCH, "prepare", "--mimic-iv", str(raw / "mimic-iv"), "--mimic-cxr",
                    str(raw / "mimic-cxr-jpg"), "--out", str(data)], check=True, stdout=subprocess.DEVNULL)
    return data


def time_run(data: Path, model: str, task: str, preset: str, threads: int, out: Path,
             extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [CAREBENCH, "train", "--data", str(data), "--model", model, "--task", task, "--preset", preset,
           "--threads", str(threads), "--no-progress", "--out", str(out), *extra]
    # A wrapper process per run, so RUSAGE_CHILDREN's peak RSS is this run's alone.
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"model": model, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    lines = proc.stdout.strip().splitlines()
    run_dir, peak_kib = Path(lines[-2].split()[0]), int(lines[-1])
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"model": model, "wall_s": wall, "peak_rss_mib": peak_kib / 1024,
            "epochs": m["epochs_trained"], "fit_s": m["timing_s"]["fit"], "test_s": m["timing_s"]["test"],
            "n_train": m["splits"]["train"]["n_stays"], "metric": m["selection_metric"],
            "value": m["test"].get(m["selection_metric"]), "params": m["n_parameters"]}


def time_loader(data: Path, task: str, preset: str, threads: int) -> dict:
    import torch

    from carebench.data.loading import augment_cxr, build_fold, make_loader
    from carebench.data.store import open_dataset
    from carebench.training.config import PRESETS

    torch.set_num_threads(threads)
    p = PRESETS[preset]
    fold = build_fold(open_dataset(data), task=task, fold=1, image_size=p["image_size"])
    loader = make_loader(fold.train, p["batch_size"], shuffle=True, drop_last=True)
    for _epoch in range(2):  # the first epoch warms the page cache of the memory-mapped arrays
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            augment_cxr(batch["cxr"], batch["has_cxr"])
            n += len(batch["y"])
        dt = time.perf_counter() - t0
    return {"stays": n, "seconds": dt, "stays_per_s": n / dt if dt else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a processed dataset")
    src.add_argument("--stays", type=int, help="synthesise and prepare this many stays first")
    ap.add_argument("--models", default="", help="comma-separated (default: every registered model)")
    ap.add_argument("--task", default="mortality")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra train arguments, space-separated (e.g. 'max_epochs=3')")
    args = ap.parse_args()

    from carebench.models import list_models

    models = [m for m in args.models.split(",") if m] or list_models()
    work = Path(tempfile.mkdtemp(prefix="carebench-bench-train-"))
    try:
        data = args.data if args.data else synthesise(args.stays, work)
        loader = time_loader(data, args.task, args.preset, args.threads)
        print(f"\n`carebench train --preset {args.preset} --task {args.task}` on {data} "
              f"({platform.processor() or platform.machine()}, {args.threads} threads, torch CPU, "
              f"load average before: {os.getloadavg()[0]:.1f})\n")
        print(f"Loader (warm training epoch, incl. augmentation): {loader['stays']} stays in "
              f"{loader['seconds']:.2f} s = {loader['stays_per_s']:.0f} stays/s\n")
        print("| model | params | train stays | epochs | fit s | test s | wall s | peak RSS MiB | test metric |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        for m in models:  # one row as soon as each run ends
            r = time_run(data, m, args.task, args.preset, args.threads, work / "runs", args.extra.split())
            if "error" in r:
                print(f"| {r['model']} | error: {r['error']} |||||||| ", flush=True)
                continue
            print(f"| {r['model']} | {r['params']:,} | {r['n_train']} | {r['epochs']} | {r['fit_s']:.1f} | "
                  f"{r['test_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                  f"{r['metric']} {r['value']:.3f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
