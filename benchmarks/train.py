"""Measure `carebench train`: wall time and peak RSS per model, plus the batch loader's throughput.

Each run is a fresh `carebench train --no-progress` subprocess limited to --threads CPU threads (so the peak RSS
is that process's own and runs do not share caches); the run record's metrics.json gives epochs trained and the
fit/test split of the time. The loader is timed separately over one training epoch (EHR imputation + scaling,
X-ray read + resize + normalisation, and the training-time augmentation), so its share of a run is visible.
Prints a Markdown table for docs/performance.md.

    python benchmarks/train.py --data DATA [--models lstm,latefusion] [--task mortality] [--preset quick]
    python benchmarks/train.py --stays 2000        # synthesise + prepare first (needs `carebench synth`)

Throughput mode (`--steps N`): instead of whole runs, N timed optimiser steps (after --warmup steps) of the real
Lightning training loop (loader, augmentation when the preset has it, forward, loss, backward, the method's hooks,
AdamW) at batch size 16 (`--batch-size`), per method and preset, each in a fresh process; training samples/s
(median over --repeat processes), the loader's share of the step (the time the training process waits for the
next batch, i.e. builds it itself with 0 workers, over the whole step) and that process's peak RSS. `full` is run
with randomly initialised encoders (`*pretrained=none`): same architecture and cost as the ImageNet-initialised
paper setting, no download.

    python benchmarks/train.py --data DATA --steps 20 --presets quick,full --threads 2

Variants (`--variants`): each a `;`-separated list of `key=value` run settings (precision, channels_last,
num_workers, or any training option), measured against the first one in the same process pattern: for each
method, repeat r = 1..--repeat runs every variant once in turn (A, B, A, B, ...), so machine load drifts affect all
variants alike; the table gives medians and each variant's speed relative to the first.

    python benchmarks/train.py --data DATA --steps 20 --presets quick --repeat 5 \
        --variants 'precision=32-true channels_last=false;precision=32-true;precision=bf16-mixed'
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
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

CAREBENCH = str(Path(sys.executable).with_name("carebench"))
WRAPPER = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
)


def synthesise(stays: int, work: Path) -> Path:
    raw, data = work / "raw", work / "data"
    subprocess.run(
        [CAREBENCH, "synth", "--out", str(raw), "--stays", str(stays), "--seed", "0"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            CAREBENCH,
            "prepare",
            "--mimic-iv",
            str(raw / "mimic-iv"),
            "--mimic-cxr",
            str(raw / "mimic-cxr-jpg"),
            "--out",
            str(data),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return data


def time_run(
    data: Path, model: str, task: str, preset: str, threads: int, out: Path, extra: list[str]
) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [
        CAREBENCH,
        "train",
        "--data",
        str(data),
        "--model",
        model,
        "--task",
        task,
        "--preset",
        preset,
        "--threads",
        str(threads),
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    # A wrapper process per run, so RUSAGE_CHILDREN's peak RSS is this run's alone.
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"model": model, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    lines = proc.stdout.strip().splitlines()
    run_dir, peak_kib = Path(lines[-2].split()[0]), int(lines[-1])
    m = json.loads((run_dir / "metrics.json").read_text())
    return {
        "model": model,
        "wall_s": wall,
        "peak_rss_mib": peak_kib / 1024,
        "epochs": m["epochs_trained"],
        "fit_s": m["timing_s"]["fit"],
        "test_s": m["timing_s"]["test"],
        "n_train": m["splits"]["train"]["n_stays"],
        "metric": m["selection_metric"],
        "value": m["test"].get(m["selection_metric"]),
        "params": m["n_parameters"],
    }


def throughput_worker(spec: dict) -> None:
    """In a fresh process: `steps` timed training steps of one method; prints a JSON line."""
    import resource

    import lightning.pytorch as pl
    import torch
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    from carebench.data.loading import build_fold, make_loader
    from carebench.data.store import open_dataset
    from carebench.models import get_model_class
    from carebench.training.config import resolve_config
    from carebench.training.predict import build_model
    from carebench.training.run import build_module, training_split

    torch.set_num_threads(spec["threads"])
    cls = get_model_class(spec["model"])
    overrides = {"batch_size": spec["batch_size"], **spec.get("variant", {})}
    overrides |= {f"model.{k}": "none" for k in cls.default_hparams if k.endswith("pretrained")}
    cfg = resolve_config(
        model=spec["model"], task=spec["task"], data=spec["data"], preset=spec["preset"], overrides=overrides
    )
    data = open_dataset(spec["data"], mmap=True)
    fold = build_fold(
        data, task=cfg.task, fold=1, image_size=cfg.image_size, load_cxr="cxr" in cls.modalities
    )
    loader = make_loader(
        training_split(cfg, fold),
        cfg.batch_size,
        shuffle=True,
        drop_last=True,
        seed=0,
        num_workers=cfg.num_workers,
    )
    warm, steps = spec["warmup"], spec["steps"]
    if len(loader) < warm + steps:
        raise SystemExit(f"{len(loader)} training batches, need {warm + steps}")
    module = build_module(cfg, build_model(cfg, len(fold.features)), fold.outputs)
    times: list[float] = []
    cpu: list[float] = []  # this process's CPU time at the same two points
    waits: list[float] = []  # seconds the training process spent in the loader's __next__, per batch
    timing = [False]
    plain_next = _BaseDataLoaderIter.__next__

    def timed_next(self):
        t0 = time.perf_counter()
        try:
            return plain_next(self)
        finally:
            if timing[0]:
                waits.append(time.perf_counter() - t0)

    _BaseDataLoaderIter.__next__ = timed_next

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warm:
                times.append(time.perf_counter())
                cpu.append(time.process_time())
                timing[0] = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warm + steps - 1:
                times.append(time.perf_counter())
                cpu.append(time.process_time())
                timing[0] = False

    # one validation batch after the timed steps: the plateau schedule needs its val/loss (not timed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.precision,
        max_epochs=1,
        limit_train_batches=warm + steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=make_loader(fold.val, 64, shuffle=False))
    # Lightning fetches one batch ahead, so steps - 1 fetches fall inside the timed window: the loader's share
    # is the mean fetch over the mean step.
    print(
        json.dumps(
            {
                "model": spec["model"],
                "preset": spec["preset"],
                "precision": cfg.precision,
                "channels_last": cfg.channels_last,
                "num_workers": cfg.num_workers,
                "image_size": cfg.image_size,
                "step_s": (times[1] - times[0]) / steps,
                "cpu_step_s": (cpu[1] - cpu[0]) / steps,
                "loader_share": statistics.mean(waits) / ((times[1] - times[0]) / steps) if waits else 0.0,
                "samples_per_s": steps * cfg.batch_size / (times[1] - times[0]),
                "params": sum(p.numel() for p in module.parameters()),
                "cxr_share": float(fold.train.has_cxr.mean()),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def parse_variants(text: str) -> list[dict]:
    """'precision=32-true channels_last=false;precision=bf16-mixed' -> [{...}, {...}] (values read as YAML)."""
    from carebench.training.config import parse_overrides

    return [parse_overrides(v.split()) for v in text.split(";")] if text else [{}]


def variant_label(variant: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in variant.items()) or "defaults"


def throughput_one(data: Path, model: str, preset: str, variant: dict, args: argparse.Namespace) -> dict:
    """One fresh worker process: `args.steps` timed steps of `model` at `preset` with `variant`'s settings."""
    spec = {
        "data": str(data),
        "model": model,
        "preset": preset,
        "task": args.task,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "variant": variant,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(
        [sys.executable, os.path.realpath(__file__), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def throughput(data: Path, model: str, preset: str, args: argparse.Namespace) -> list[dict]:
    """Every variant of `model` at `preset`, interleaved over --repeat rounds; per variant the medians."""
    variants = parse_variants(args.variants)
    rows: list[list[dict]] = [[] for _ in variants]
    for _ in range(args.repeat):
        for i, variant in enumerate(variants):
            rows[i].append(throughput_one(data, model, preset, variant, args))
    out = []
    for variant, rs in zip(variants, rows, strict=True):
        bad = [r for r in rs if "error" in r]
        if bad:
            out.append({"model": model, "preset": preset, "variant": variant, "error": bad[0]["error"]})
            continue
        med = dict(rs[0], variant=variant)
        for key in ("samples_per_s", "step_s", "cpu_step_s", "loader_share", "peak_rss_mib"):
            med[key] = statistics.median(r[key] for r in rs)
        med["repeats"] = len(rs)
        out.append(med)
    base = out[0].get(args.measure)
    for r in out:
        r["speedup"] = base / r[args.measure] if base and args.measure in r else float("nan")
    return out


def time_loader(data: Path, task: str, preset: str, threads: int) -> dict:
    import torch

    from carebench.data.loading import build_fold, make_loader
    from carebench.data.store import open_dataset
    from carebench.training.config import PRESETS

    torch.set_num_threads(threads)
    p = PRESETS[preset]
    fold = build_fold(open_dataset(data), task=task, fold=1, image_size=p["image_size"])
    train = fold.train.augmented(0) if p.get("augment", True) else fold.train
    loader = make_loader(train, p["batch_size"], shuffle=True, drop_last=True)
    for _epoch in range(2):  # the first epoch warms the page cache of the memory-mapped arrays
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += len(batch["y"])
        dt = time.perf_counter() - t0
    return {"stays": n, "seconds": dt, "stays_per_s": n / dt if dt else float("nan")}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        throughput_worker(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a processed dataset")
    src.add_argument("--stays", type=int, help="synthesise and prepare this many stays first")
    ap.add_argument("--models", default="", help="comma-separated (default: every registered model)")
    ap.add_argument("--task", default="mortality")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--extra", default="", help="extra train arguments, space-separated (e.g. 'max_epochs=3')"
    )
    ap.add_argument("--steps", type=int, default=0, help="throughput mode: timed training steps per method")
    ap.add_argument("--warmup", type=int, default=3, help="throughput mode: untimed steps first")
    ap.add_argument("--batch-size", type=int, default=16, help="throughput mode: batch size")
    ap.add_argument("--presets", default="quick,full", help="throughput mode: comma-separated presets")
    ap.add_argument("--repeat", type=int, default=1, help="throughput mode: processes per variant (median)")
    ap.add_argument(
        "--measure",
        choices=("step_s", "cpu_step_s"),
        default="step_s",
        help="throughput mode: what 'vs first' compares: wall or CPU seconds per step (the fairer figure with "
        "--threads 1 on a shared machine)",
    )
    ap.add_argument(
        "--variants",
        default="",
        help="throughput mode: ';'-separated run settings to compare, interleaved (e.g. "
        "'precision=32-true channels_last=false;precision=bf16-mixed'); default: the preset's defaults",
    )
    args = ap.parse_args()

    from carebench.models import list_models

    models = [m for m in args.models.split(",") if m] or list_models()
    work = Path(tempfile.mkdtemp(prefix="carebench-bench-train-"))
    try:
        data = args.data if args.data else synthesise(args.stays, work)
        if args.steps:
            print(
                f"\nTraining throughput, task {args.task}, batch {args.batch_size}, {args.steps} timed steps after "
                f"{args.warmup}, median of {args.repeat} process(es) per variant, interleaved; {data} "
                f"({platform.processor() or platform.machine()}, {args.threads} threads, torch CPU, "
                f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())})\n"
            )
            print(
                "| model | preset | settings | precision | channels last | workers | image px | params | "
                "X-ray share | step s | CPU s per step | train samples/s | vs first | loader share | peak RSS MiB |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
            for preset in args.presets.split(","):
                for m in models:
                    for r in throughput(data, m, preset, args):
                        label = variant_label(r["variant"])
                        if "error" in r:
                            print(f"| {m} | {preset} | {label} | error: {r['error']} ||||||||||", flush=True)
                            continue
                        print(
                            f"| {m} | {preset} | {label} | {r['precision']} | {r['channels_last']} | "
                            f"{r['num_workers']} | {r['image_size']} | {r['params']:,} | {r['cxr_share']:.2f} | "
                            f"{r['step_s']:.3f} | {r['cpu_step_s']:.3f} | {r['samples_per_s']:.1f} | "
                            f"{r['speedup']:.2f}x | "
                            f"{r['loader_share']:.1%} | {r['peak_rss_mib']:.0f} |",
                            flush=True,
                        )
            print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
            return
        loader = time_loader(data, args.task, args.preset, args.threads)
        print(
            f"\n`carebench train --preset {args.preset} --task {args.task}` on {data} "
            f"({platform.processor() or platform.machine()}, {args.threads} threads, torch CPU, "
            f"load average before: {os.getloadavg()[0]:.1f})\n"
        )
        print(
            f"Loader (warm training epoch, incl. augmentation if the preset has it): {loader['stays']} stays in "
            f"{loader['seconds']:.2f} s = {loader['stays_per_s']:.0f} stays/s\n"
        )
        print(
            "| model | params | train stays | epochs | fit s | test s | wall s | peak RSS MiB | test metric |"
        )
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        for m in models:  # one row as soon as each run ends
            r = time_run(data, m, args.task, args.preset, args.threads, work / "runs", args.extra.split())
            if "error" in r:
                print(f"| {r['model']} | error: {r['error']} |||||||| ", flush=True)
                continue
            print(
                f"| {r['model']} | {r['params']:,} | {r['n_train']} | {r['epochs']} | {r['fit_s']:.1f} | "
                f"{r['test_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                f"{r['metric']} {r['value']:.3f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
