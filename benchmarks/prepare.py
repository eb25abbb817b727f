"""Measure `carebench prepare`: wall time, chartevents rows/s and peak RSS, on the real MIMIC-IV demo and on a
scaled input (the demo replicated with fresh subject/hadm/stay ids until chartevents has >= --rows rows).

Each measurement runs `carebench prepare` in a fresh subprocess (so peak RSS is that process's own) --repeat
times and reports the median. Prints a Markdown table for docs/performance.md.

    python benchmarks/prepare.py [--rows 5000000] [--repeat 3] [--threads 2] [--memory-limit 2GB]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO.parent / "shared" / "data" / "mimic-iv-demo-2.2"
TABLES = {
    "hosp": ["patients", "admissions", "labevents", "diagnoses_icd"],
    "icu": ["icustays", "chartevents", "outputevents"],
}
ID_COLUMNS = ("subject_id", "hadm_id", "stay_id", "labevent_id")


def replicate_demo(out: Path, copies: int) -> None:
    """Write the demo tables `copies` times over as csv.gz, shifting every id by copy * 10**8."""
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute("SET enable_progress_bar = false")
    for module, names in TABLES.items():
        (out / module).mkdir(parents=True, exist_ok=True)
        for name in names:
            src = DEMO / module / f"{name}.csv.gz"
            cols = [
                r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_csv('{src}', header=true)").fetchall()
            ]
            select = ", ".join(f"{c} + k * 100000000 AS {c}" if c in ID_COLUMNS else c for c in cols)
            con.execute(
                f"COPY (SELECT {select} FROM read_csv('{src}', header=true), range({copies}) t(k)) "
                f"TO '{out / module / (name + '.csv.gz')}' (HEADER, COMPRESSION gzip)"
            )


def run_prepare(raw: Path, out: Path, threads: int, memory_limit: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `carebench prepare` subprocess."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        str(Path(sys.executable).with_name("carebench")),
        "prepare",
        "--mimic-iv",
        str(raw),
        "--out",
        str(out),
        "--threads",
        str(threads),
        "--memory-limit",
        memory_limit,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all waited-for children: run each measurement in its own python.
    return wall, max(after, before) / 1024


def measure(raw: Path, label: str, repeat: int, threads: int, memory_limit: str, work: Path) -> dict:
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT count(*) FROM read_csv('{raw / 'icu' / 'chartevents.csv.gz'}', header=true)"
    ).fetchone()[0]
    walls, rss = [], []
    for i in range(repeat):
        # a fresh interpreter per repeat so RUSAGE_CHILDREN's max is this run's peak only
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_single",
                str(raw),
                str(work / f"out-{label}-{i}"),
                str(threads),
                memory_limit,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        w, m = map(float, res.stdout.split())
        walls.append(w)
        rss.append(m)
    wall = statistics.median(walls)
    return {
        "input": label,
        "chartevents_rows": rows,
        "wall_s": wall,
        "rows_per_s": rows / wall,
        "peak_rss_mib": statistics.median(rss),
        "walls": walls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", type=int, default=5_000_000, help="minimum chartevents rows of the scaled input"
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--workdir", default=None, help="where to write the scaled input (default: a temp dir)")
    ap.add_argument("--_single", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._single:
        raw, out, threads, mem = args._single
        w, m = run_prepare(Path(raw), Path(out), int(threads), mem)
        shutil.rmtree(out, ignore_errors=True)
        print(w, m)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="carebench-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    demo_rows = 668_862
    copies = math.ceil(args.rows / demo_rows)
    scaled = work / f"demo-x{copies}"
    if not (scaled / "icu" / "chartevents.csv.gz").exists():
        t0 = time.perf_counter()
        replicate_demo(scaled, copies)
        print(f"# wrote scaled input x{copies} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    results = [
        measure(DEMO, "demo", args.repeat, args.threads, args.memory_limit, work),
        measure(scaled, f"demo x{copies}", args.repeat, args.threads, args.memory_limit, work),
    ]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"duckdb {duckdb.__version__}; --threads {args.threads} --memory-limit {args.memory_limit}; "
        f"median of {args.repeat}"
    )
    print("| input | chartevents rows | wall (s) | chartevents rows/s | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['input']} | {r['chartevents_rows']:,} | {r['wall_s']:.2f} | {r['rows_per_s']:,.0f} | "
            f"{r['peak_rss_mib']:,.0f} |"
        )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
