"""Measure `carebench synth`: stays/s, CPU time and peak memory, at several sizes (memory should not grow with N).

Each size runs `carebench synth` in a fresh subprocess. Peak memory is sampled every 0.1 s with psutil over the
whole process tree (parent + worker processes): the peak of the summed RSS and the largest single process.
Prints a Markdown table for docs/performance.md.

    python benchmarks/synth.py [--stays 2000,20000] [--image-size 512] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    procs = [proc]
    try:
        procs += proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = []
    for p in procs:
        try:
            rss.append(p.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return sum(rss), max(rss, default=0)


def run(stays: int, image_size: int, workers: int, out: Path) -> dict:
    cmd = [
        str(Path(sys.executable).with_name("carebench")),
        "synth",
        "--out",
        str(out),
        "--stays",
        str(stays),
        "--seed",
        "0",
        "--image-size",
        str(image_size),
        "--workers",
        str(workers),
    ]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(child.pid)
    peak_sum = peak_one = 0
    cpu = 0.0
    while child.poll() is None:
        s, m = _tree_rss(ps)
        peak_sum, peak_one = max(peak_sum, s), max(peak_one, m)
        try:
            times = [ps.cpu_times()] + [c.cpu_times() for c in ps.children(recursive=True)]
            cpu = max(cpu, sum(t.user + t.system for t in times))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"carebench synth failed with exit code {child.returncode}: {' '.join(cmd)}")
    files = [p for p in out.rglob("*") if p.is_file()]
    images = sum(1 for p in files if p.suffix == ".jpg")
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    return {
        "stays": stays,
        "wall": wall,
        "cpu": cpu,
        "stays_per_s": stays / wall,
        "peak_sum": peak_sum / 2**20,
        "peak_one": peak_one / 2**20,
        "images": images,
        "mb": size_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stays", default="2000,20000", help="comma-separated sizes")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, load average "
        f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}",
        file=sys.stderr,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        for n in (int(s) for s in args.stays.split(",")):
            out = Path(tmp) / f"raw{n}"
            rows.append(run(n, args.image_size, args.workers, out))
            print(rows[-1], file=sys.stderr)
            subprocess.run(["rm", "-rf", str(out)], check=True)
    print(
        "| stays | image px | workers | wall s | CPU s | stays/s | images | output MiB | "
        "peak RSS, all processes MiB | peak RSS, largest process MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['stays']:,} | {args.image_size} | {args.workers} | {r['wall']:.1f} | {r['cpu']:.1f} | "
            f"{r['stays_per_s']:.0f} | {r['images']:,} | {r['mb']:.0f} | {r['peak_sum']:.0f} | "
            f"{r['peak_one']:.0f} |"
        )


if __name__ == "__main__":
    main()
