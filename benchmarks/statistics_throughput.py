"""Measure the paired permutation test and the bootstrap against a straightforward scikit-learn loop.

Workload (the phenotype task at benchmark scale): ~2,000 test stays, 25 labels (prevalence 5-40 %), two models.
- Permutation test: 10,000 permutations; per permutation both arms (A*, B*) get AUROC and average precision for
  every label (plus the macro averages, free from the per-label values).
- Bootstrap: 2,000 resamples of the paired difference, same metrics.
The vectorised implementation (carebench.evaluation.statistics) runs the full workload. The loop - per
permutation / resample, swap or index the arrays and call sklearn's roc_auc_score and average_precision_score for
each label and arm - is timed on a subset (--loop-permutations) and extrapolated linearly to the full count
(its cost per permutation is constant). Both are single-threaded. Each is repeated --repeats times; the median
wall and CPU time are reported. The loop's statistics are checked against the vectorised null distribution on the
same swap patterns, so both compute the same numbers.

    python benchmarks/statistics_throughput.py                      # prints a Markdown table for docs/performance.md
    python benchmarks/statistics_throughput.py --stays 2000 --labels 25 --permutations 10000 --repeats 3
"""

from __future__ import annotations

import os
import sys

# This file shares its name with the standard library's `statistics`: drop its directory from the import path so
# `import statistics` anywhere (numpy, scipy, ...) gets the standard module, not this script.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import sklearn  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from carebench.evaluation.statistics import (  # noqa: E402
    bootstrap_weights,
    paired_bootstrap_cis,
    paired_permutation_tests,
    swap_blocks,
)


def workload(n: int, n_labels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.05, 0.40, n_labels)
    y = (rng.random((n, n_labels)) < prevalence).astype(int)
    p_a = np.clip(0.30 * y + 0.70 * rng.random((n, n_labels)), 0, 1)
    p_b = np.clip(0.25 * y + 0.75 * rng.random((n, n_labels)), 0, 1)
    names = [f"pheno_{j}" for j in range(n_labels)]
    return y, p_a, p_b, names


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds over `repeats` calls, and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus)), out


def loop_permutations(y, p_a, p_b, swaps: np.ndarray) -> np.ndarray:
    """The straightforward test: per permutation, swap the scores and call sklearn per label and arm."""
    out = np.empty((len(swaps), y.shape[1], 2))
    for r, s in enumerate(swaps.astype(bool)):
        a_star, b_star = np.where(s[:, None], p_b, p_a), np.where(s[:, None], p_a, p_b)
        for j in range(y.shape[1]):
            out[r, j, 0] = skm.roc_auc_score(y[:, j], a_star[:, j]) - skm.roc_auc_score(y[:, j], b_star[:, j])
            out[r, j, 1] = skm.average_precision_score(y[:, j], a_star[:, j]) - skm.average_precision_score(
                y[:, j], b_star[:, j]
            )
    return out


def loop_bootstrap(y, p_a, p_b, counts: np.ndarray) -> np.ndarray:
    """The straightforward bootstrap: per resample, index the stays and call sklearn per label and model."""
    out = np.empty((len(counts), y.shape[1], 2))
    for r, w in enumerate(counts):
        idx = np.repeat(np.arange(len(y)), w)
        yr, ar, br = y[idx], p_a[idx], p_b[idx]
        for j in range(y.shape[1]):
            out[r, j, 0] = skm.roc_auc_score(yr[:, j], ar[:, j]) - skm.roc_auc_score(yr[:, j], br[:, j])
            out[r, j, 1] = skm.average_precision_score(yr[:, j], ar[:, j]) - skm.average_precision_score(
                yr[:, j], br[:, j]
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stays", type=int, default=2000)
    ap.add_argument("--labels", type=int, default=25)
    ap.add_argument("--permutations", type=int, default=10000)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--loop-permutations", type=int, default=20, help="permutations/resamples the loop runs")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    y, p_a, p_b, names = workload(args.stays, args.labels)
    keys = [f"{m}/{nm}" for m in ("auroc", "auprc") for nm in names] + ["auroc_macro", "auprc_macro"]
    rows = []

    # --- permutation test
    wall, cpu, res = timed(
        lambda: paired_permutation_tests(
            y, p_a, p_b, keys, names=names, n_permutations=args.permutations, seed=0
        ),
        args.repeats,
    )
    k = args.loop_permutations
    _, blocks = swap_blocks(args.stays, args.permutations, 0)
    swaps = next(iter(blocks))[:k]
    lwall, lcpu, loop = timed(lambda: loop_permutations(y, p_a, p_b, swaps), args.repeats)
    vec = np.stack([[res[f"{m}/{nm}"].null_distribution[:k] for m in ("auroc", "auprc")] for nm in names])
    assert np.allclose(vec.transpose(2, 0, 1), loop, atol=1e-12), "loop and vectorised nulls differ"
    scale = args.permutations / k
    rows.append(
        (
            "paired permutation test",
            f"{args.permutations:,} permutations",
            wall,
            cpu,
            lwall * scale,
            lcpu * scale,
        )
    )

    # --- paired bootstrap
    bwall, bcpu, bres = timed(
        lambda: paired_bootstrap_cis(y, p_a, p_b, keys, names=names, n_resamples=args.resamples, seed=0),
        args.repeats,
    )
    counts = next(iter(bootstrap_weights(args.stays, args.resamples, 0))).T[:k]
    blwall, blcpu, bloop = timed(lambda: loop_bootstrap(y, p_a, p_b, counts), args.repeats)
    bvec = np.stack([[bres[f"{m}/{nm}"].distribution[:k] for m in ("auroc", "auprc")] for nm in names])
    assert np.allclose(bvec.transpose(2, 0, 1), bloop, atol=1e-12), "loop and vectorised bootstrap differ"
    scale = args.resamples / k
    rows.append(
        ("paired bootstrap", f"{args.resamples:,} resamples", bwall, bcpu, blwall * scale, blcpu * scale)
    )

    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"Machine: {cpu_name}, {os.cpu_count()} logical CPUs, single-threaded; 1-min load average {load:.1f} at "
        f"the start (the machine may be shared: CPU times are the fairer figure); {datetime.date.today().isoformat()}; Python {platform.python_version()}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, scikit-learn {sklearn.__version__}."
    )
    print(
        f"Workload: {args.stays:,} stays x {args.labels} labels, AUROC + AUPRC per label and arm; loop timed on "
        f"{k} permutations/resamples and extrapolated; median of {args.repeats} repeats.\n"
    )
    print(
        "| procedure | size | vectorised wall s | vectorised CPU s | sklearn loop wall s (extrapolated) "
        "| sklearn loop CPU s (extrapolated) | ratio wall | ratio CPU |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, size, w, c, lw, lc in rows:
        print(
            f"| {name} | {size} | {w:.1f} | {c:.1f} | {lw:,.0f} | {lc:,.0f} | {lw / w:,.0f}x | {lc / c:,.0f}x |"
        )


if __name__ == "__main__":
    main()
