"""Where the rank kernels' prefix sums switch from numpy's cumsum to the running row (`CUMSUM_MAX_COLUMNS`).

`carebench.evaluation.statistics._prefix_at` sums integer weights [n items, R weightings] in score order and reads
the prefix at a few thousand points. Two ways: numpy's cumsum over all items (writes n x R prefixes), or a running
row of R sums advanced segment by segment (a Python loop over the points). This times both, single-threaded, for
several R and n, checks they agree, and prints a Markdown table (median of --repeat calls each).

    python benchmarks/prefix_sums.py [--repeat 5]
"""

from __future__ import annotations

import os.path
import sys

if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import statistics
import time

import numpy as np

from carebench.evaluation import statistics as st


def _median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| items n | points | columns R | running row ms | cumsum ms | running row / cumsum |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (600, 7_000, 35_000):
        items = rng.permutation(n)
        points = np.unique(rng.integers(0, n + 1, int(0.6 * n)))
        for r in (1, 8, 32, 64, 128, 600):
            wt = rng.integers(0, 3, (n, r)).astype(np.int16)
            old = st.CUMSUM_MAX_COLUMNS
            try:
                st.CUMSUM_MAX_COLUMNS = 0
                loop = st._prefix_at(wt, items, points, np.int16)
                t_loop = _median_s(lambda: st._prefix_at(wt, items, points, np.int16), args.repeat)  # noqa: B023
                st.CUMSUM_MAX_COLUMNS = 10**9
                cum = st._prefix_at(wt, items, points, np.int16)
                t_cum = _median_s(lambda: st._prefix_at(wt, items, points, np.int16), args.repeat)  # noqa: B023
            finally:
                st.CUMSUM_MAX_COLUMNS = old
            if not np.array_equal(loop, cum):
                raise SystemExit(f"n={n}, R={r}: the two prefix sums differ")
            print(
                f"| {n:,} | {len(points):,} | {r} | {t_loop * 1e3:.2f} | {t_cum * 1e3:.2f} | {t_loop / t_cum:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
