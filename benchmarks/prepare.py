"""Measure `carebench prepare` as the input grows: wall time, rows/s, per-stage times and peak RSS, and the full
MIMIC-IV extrapolation.

Inputs: the real MIMIC-IV demo, and the demo replicated `--copies` times with fresh subject/hadm/stay ids (each copy
a new set of patients). By default (`--lab-mix full`) labevents is replicated more often than the other tables, so
that labevents : chartevents is full MIMIC-IV's 118 M : 313 M (the demo has 0.16 : 1): the extra copies repeat a
copy's rows for the same patients, so they are read, joined and aggregated like real rows. `--lab-mix demo`
keeps the demo's ratio.

Each measurement runs `carebench prepare` in a fresh subprocess (peak RSS is that process's own), --repeat
times per size, interleaved over sizes (size 1, size 2, ..., size 1, ...), and reports medians; the stage times
come from the output's manifest.json. A least-squares line through (rows read, wall seconds) and (rows read, peak
RSS) over the replicated sizes gives the full MIMIC-IV extrapolation (313 M chartevents + 118 M labevents +
4.2 M outputevents rows); a stage whose time per row grows with size shows in the per-stage columns. Disk: the
inputs are kept in --workdir (about 6.4 MB of csv.gz per million chartevents rows with their labevents).

    python benchmarks/prepare.py --workdir /tmp/bench --copies 8,25,75 --repeat 2 --threads 2 --memory-limit 2GB

Memory against --memory-limit: one raw MIMIC-IV folder (e.g. a `carebench synth` cohort of the paper's size)
prepared at each limit, peak RSS beside the limit (DuckDB spills to disk beyond it; the rest is the interpreter,
the libraries and the output arrays):

    python benchmarks/prepare.py --raw RAW/mimic-iv --memory-limits 512MB,1GB,2GB,4GB,8GB --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
EVENT_TABLES = {"chartevents": "icu", "labevents": "hosp", "outputevents": "icu"}
# Full MIMIC-IV v2.2 (PhysioNet): rows of the three event tables prepare reads.
FULL_MIMIC = {"chartevents": 313_645_063, "labevents": 118_171_367, "outputevents": 4_234_967}
SHIFT = 100_000_000  # id offset per copy (demo ids are below it)


def replicate_demo(out: Path, copies: int, lab_copies: int) -> None:
    """The demo tables written `copies` times over as csv.gz, copy k's ids shifted by k * SHIFT; labevents
    `lab_copies` times, copy j taking the ids of copy j % copies (the same patients' rows again)."""
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
            n = lab_copies if name == "labevents" else copies
            shift = f"(k % {copies}) * {SHIFT}"
            select = ", ".join(f"{c} + {shift} AS {c}" if c in ID_COLUMNS else c for c in cols)
            if name == "labevents":  # labevent_id must stay unique across the repeated copies
                select = select.replace(f"labevent_id + {shift} AS labevent_id", f"labevent_id + k * {SHIFT}")
            tmp = out / module / f".{name}.csv.gz.tmp"
            con.execute(
                f"COPY (SELECT {select} FROM read_csv('{src}', header=true), range({n}) t(k)) "
                f"TO '{tmp}' (HEADER, COMPRESSION gzip, FORMAT csv)"
            )
            os.replace(tmp, out / module / f"{name}.csv.gz")
    (out / "COMPLETE").write_text(f"{copies} {lab_copies}\n")


def count_rows(raw: Path) -> dict[str, int]:
    con = duckdb.connect()
    return {
        t: con.execute(
            f"SELECT count(*) FROM read_csv('{raw / m / (t + '.csv.gz')}', header=true)"
        ).fetchone()[0]
        for t, m in EVENT_TABLES.items()
    }


def run_prepare(raw: Path, out: Path, threads: int, memory_limit: str) -> dict:
    """Wall seconds, peak RSS (MiB), stage timings and cohort size of one `carebench prepare` subprocess."""
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
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 1024
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": peak,
        "stages": manifest["timings_s"],
        "stays": manifest["cohort"]["stays"],
        "features": len(manifest["features"]),
    }


def measure_once(raw: Path, out: Path, threads: int, memory_limit: str) -> dict:
    """In a fresh interpreter, so RUSAGE_CHILDREN's maximum is this run's peak only."""
    res = subprocess.run(
        [sys.executable, __file__, "--_single", str(raw), str(out), str(threads), memory_limit],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", default="8", help="comma-separated replication factors of the demo")
    ap.add_argument(
        "--lab-mix", choices=("full", "demo"), default="full", help="labevents : chartevents ratio"
    )
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--workdir", default=None, help="where to keep the scaled inputs (default: a temp dir)")
    ap.add_argument("--raw", default=None, help="with --memory-limits: the raw MIMIC-IV folder to prepare")
    ap.add_argument("--memory-limits", default="", help="comma-separated --memory-limit values to compare")
    ap.add_argument("--_single", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._single:
        raw, out, threads, mem = args._single
        print(json.dumps(run_prepare(Path(raw), Path(out), int(threads), mem)))
        return
    if args.memory_limits:
        memory_limits(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="carebench-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    demo_rows = count_rows(DEMO)
    lab_factor = (
        FULL_MIMIC["labevents"]
        / FULL_MIMIC["chartevents"]
        * demo_rows["chartevents"]
        / demo_rows["labevents"]
        if args.lab_mix == "full"
        else 1.0
    )
    inputs: list[tuple[str, Path]] = [("demo", DEMO)]
    for copies in (int(c) for c in args.copies.split(",") if c):
        lab_copies = max(copies, round(copies * lab_factor))
        raw = work / f"demo-x{copies}-lab{lab_copies}"
        if not (raw / "COMPLETE").is_file():
            t0 = time.perf_counter()
            replicate_demo(raw, copies, lab_copies)
            print(f"# wrote {raw.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        inputs.append((f"demo x{copies} (labevents x{lab_copies})", raw))
    rows = {label: count_rows(raw) for label, raw in inputs}
    runs: dict[str, list[dict]] = {label: [] for label, _ in inputs}
    load_before = os.getloadavg()
    for i in range(args.repeat):
        for label, raw in inputs:
            runs[label].append(measure_once(raw, work / f"out-{i}", args.threads, args.memory_limit))
    load_after = os.getloadavg()

    stage_names = [s for s in runs["demo"][0]["stages"] if s != "total"]
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"duckdb {duckdb.__version__}; --threads {args.threads} --memory-limit {args.memory_limit}; median of "
        f"{args.repeat}, sizes interleaved; load average before {' '.join(f'{x:.1f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.1f}' for x in load_after)}\n"
    )
    head = [
        "input",
        "chartevents",
        "labevents",
        "outputevents",
        "stays",
        "wall s",
        "CPU s",
        "events rows/s",
        "peak RSS MiB",
    ]
    print("| " + " | ".join(head + [f"{s} s" for s in stage_names]) + " |")
    print("|---|" + "---:|" * (len(head) - 1 + len(stage_names)))
    table = []
    for label, _ in inputs:
        rs = runs[label]
        r = rows[label]
        total_rows = sum(r.values())
        wall = statistics.median(x["wall_s"] for x in rs)
        cpu = statistics.median(x["cpu_s"] for x in rs)
        rss = statistics.median(x["peak_rss_mib"] for x in rs)
        stages = {s: statistics.median(x["stages"].get(s, 0.0) for x in rs) for s in stage_names}
        table.append(
            {
                "label": label,
                "rows": total_rows,
                "wall": wall,
                "cpu": cpu,
                "rss": rss,
                "stays": rs[0]["stays"],
            }
        )
        print(
            f"| {label} | {r['chartevents']:,} | {r['labevents']:,} | {r['outputevents']:,} | {rs[0]['stays']:,} | "
            f"{wall:.1f} | {cpu:.1f} | {total_rows / wall:,.0f} | {rss:,.0f} | "
            + " | ".join(f"{stages[s]:.2f}" for s in stage_names)
            + " |"
        )
    scaled = table[1:]
    if len(scaled) >= 2:
        full_rows = sum(FULL_MIMIC.values())
        a, b = fit_line([t["rows"] for t in scaled], [t["wall"] for t in scaled])
        c, d = fit_line([t["rows"] for t in scaled], [t["rss"] for t in scaled])
        e, f = fit_line([t["rows"] for t in scaled], [t["cpu"] for t in scaled])
        per_stay = scaled[-1]["stays"] / scaled[-1]["rows"]
        print(
            f"\nLinear fit over the replicated sizes: wall = {a:.1f} s + {b * 1e6:.3f} s per million event rows; "
            f"CPU = {e:.1f} s + {f * 1e6:.3f} s per million rows; peak RSS = {c:.0f} MiB + {d * 1e6:.2f} MiB per "
            f"million rows.\nFull MIMIC-IV ({full_rows / 1e6:.0f} M event rows, about {full_rows * per_stay:,.0f} "
            f"cohort stays at the demo's rows per stay) at --threads {args.threads}: wall "
            f"{(a + b * full_rows) / 60:.1f} min, CPU {(e + f * full_rows) / 60:.1f} min, peak RSS "
            f"{(c + d * full_rows) / 1024:.2f} GiB (linear extrapolation; the X-ray stage is not included)."
        )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def memory_limits(args: argparse.Namespace) -> None:
    if not args.raw:
        raise SystemExit("--memory-limits needs --raw (a raw MIMIC-IV folder)")
    raw, work = Path(args.raw), Path(tempfile.mkdtemp(prefix="carebench-bench-"))
    rows = count_rows(raw)
    limits = [x for x in args.memory_limits.split(",") if x]
    runs: dict[str, list[dict]] = {lim: [] for lim in limits}
    load_before = os.getloadavg()
    for i in range(args.repeat):
        for lim in limits:
            runs[lim].append(measure_once(raw, work / f"out-{i}", args.threads, lim))
    shutil.rmtree(work, ignore_errors=True)
    first = runs[limits[0]][0]
    print(
        f"\n{raw}: {rows['chartevents']:,} chartevents, {rows['labevents']:,} labevents, "
        f"{rows['outputevents']:,} outputevents rows; {first['stays']:,} cohort stays x {first['features']} "
        f"features; --threads {args.threads}; median of {args.repeat}; {platform.machine()}, {os.cpu_count()} "
        f"logical CPUs, duckdb {duckdb.__version__}; load average before {' '.join(f'{x:.1f}' for x in load_before)}"
        "\n\n| --memory-limit | wall s | CPU s | peak RSS MiB | peak RSS − limit MiB |\n|---|---:|---:|---:|---:|"
    )
    for lim in limits:
        rs = runs[lim]
        rss = statistics.median(x["peak_rss_mib"] for x in rs)
        mib = _mib(lim)
        print(
            f"| {lim} | {statistics.median(x['wall_s'] for x in rs):.1f} | "
            f"{statistics.median(x['cpu_s'] for x in rs):.1f} | {rss:,.0f} | {rss - mib:+,.0f} |"
        )


def _mib(size: str) -> float:
    """MiB of a DuckDB size string (512MB = 512 x 1000^2 bytes, 2GiB = 2 x 1024^3 bytes)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT])(i?)B\s*", size, flags=re.IGNORECASE)
    if not m:
        raise SystemExit(f"--memory-limits: {size!r} is not a size such as 512MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    return float(m.group(1)) * base ** ("KMGT".index(m.group(2).upper()) + 1) / 2**20


if __name__ == "__main__":
    main()
