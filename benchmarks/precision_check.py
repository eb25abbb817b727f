"""Does bf16-mixed change the results? Test macro AUROC per method in bfloat16 mixed precision against float32, beside
the seed-to-seed spread of float32 (the noise a precision difference must be compared with).

    carebench benchmark --plan benchmarks/plans/precision_fp32.yaml --data DATA --out RUNS --jobs 2
    carebench benchmark --plan benchmarks/plans/precision_bf16.yaml --data DATA --out RUNS --jobs 2
    python benchmarks/precision_check.py RUNS [--metric auroc_macro] [--task phenotype]

Reads the finished runs under RUNS (fold 1): float32 seeds 0 and 1, bf16-mixed seed 0; prints one markdown row per
method and a summary line (median and largest |bf16 - fp32| against median and largest |seed 1 - seed 0|).
"""

from __future__ import annotations

import os.path
import sys

if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs")
    ap.add_argument("--metric", default="auroc_macro")
    ap.add_argument("--task", default="phenotype")
    args = ap.parse_args()

    from carebench import runs

    values: dict[str, dict[tuple[str, int], float]] = {}
    for r in runs.find_runs(Path(args.runs)):
        if r.task != args.task or r.fold != 1 or not r.main:
            continue
        precision = str(r.config.get("precision"))
        arm = "bf16" if precision.startswith("bf16") else "fp32" if precision.startswith("32") else precision
        values.setdefault(r.method, {})[(arm, r.seed)] = float(runs.read_metrics(r)["test"][args.metric])
    print("| method | fp32 seed 0 | fp32 seed 1 | seed 1 − seed 0 | bf16 seed 0 | bf16 − fp32 (seed 0) |")
    print("|---|---:|---:|---:|---:|---:|")
    seed_d, prec_d = [], []
    for method, v in sorted(values.items()):
        a, b, c = v.get(("fp32", 0)), v.get(("fp32", 1)), v.get(("bf16", 0))
        ds = None if a is None or b is None else b - a
        dp = None if a is None or c is None else c - a
        if ds is not None:
            seed_d.append(abs(ds))
        if dp is not None:
            prec_d.append(abs(dp))
        cells = [f"{x:.3f}" if x is not None else "" for x in (a, b)]
        cells += [f"{ds:+.3f}" if ds is not None else "", f"{c:.3f}" if c is not None else ""]
        cells += [f"{dp:+.3f}" if dp is not None else ""]
        print(f"| {method} | " + " | ".join(cells) + " |")
    if seed_d and prec_d:
        print(
            f"\n|bf16 − fp32|: median {statistics.median(prec_d):.4f}, largest {max(prec_d):.4f} ({len(prec_d)} methods); "
            f"|seed 1 − seed 0| in fp32: median {statistics.median(seed_d):.4f}, largest {max(seed_d):.4f} "
            f"({len(seed_d)} methods)"
        )


if __name__ == "__main__":
    main()
