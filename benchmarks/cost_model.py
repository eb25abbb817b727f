"""Device-hours of a benchmark plan, carebench vs the reference toolkit, from measured training-step times.

    python benchmarks/cost_model.py --steps STEPS.json --data DATA [--plan paper] [--epochs 25,50] [--batch-size 16]

STEPS.json is what `benchmarks/reference_steps.py --json` writes: per method and X-ray availability, the seconds
per training step of the reference, of carebench in float32 and of carebench with its defaults, on one device.
DATA is a processed dataset of the size the plan will run on (its folds give each run's training, validation and
test stays; the X-ray share of the training stays of each run follows from its cohort and X-ray dropout).

Per run: epochs x (training steps x step time + validation batches x forward time) + test batches x forward time,
with training steps = floor(training stays / batch), a forward pass costing 1/3 of a training step (forward +
backward + optimiser ~ 3 forwards), and `--epochs` the mean number of epochs a run trains (the paper setting
stops after 10 epochs without improvement, at least 4 and at most 50: 50 is the upper bound). carebench's step
time at an X-ray availability `a` is interpolated linearly between the two measured availabilities (its image
encoder runs on the present X-rays only: EHR part + a x image part); the reference runs its CNN on every stay, so
its step time does not depend on availability (the mean of the measured ones is used). Methods without a
reference measurement (e.g. Flex-MoE, whose reference needs CUDA-only fastmoe) are left out of both totals.
"""

from __future__ import annotations

import os.path
import sys

if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

FORWARD_SHARE = 1.0 / 3.0


def step_model(rows: list[dict]) -> dict[str, dict[str, tuple[float, float] | float]]:
    """Per method: ours fp32 and ours default as (EHR part, image part per unit availability); reference mean."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    out: dict[str, dict] = {}
    for method, rs in by.items():
        if any(r.get(s) is None for r in rs for s in ("reference", "ours fp32", "ours default")):
            continue
        rs = sorted(rs, key=lambda r: r["availability"])
        entry: dict = {"reference": sum(r["reference"] for r in rs) / len(rs)}
        for side in ("ours fp32", "ours default"):
            if len(rs) == 1:
                entry[side] = (rs[0][side], 0.0)
                continue
            (a0, t0), (a1, t1) = (rs[0]["availability"], rs[0][side]), (rs[-1]["availability"], rs[-1][side])
            img = max(0.0, (t1 - t0) / (a1 - a0))
            entry[side] = (max(0.0, t0 - a0 * img), img)
        out[method] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=Path, required=True, help="reference_steps.py --json output")
    ap.add_argument("--data", required=True)
    ap.add_argument("--plan", default="paper")
    ap.add_argument("--epochs", default="25,50", help="mean epochs per run (comma-separated scenarios)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import numpy as np

    from carebench.data.folds import cxr_dropout, split_rows
    from carebench.data.store import open_dataset
    from carebench.experiments.plan import expand_plan, load_plan

    rows = json.loads(args.steps.read_text())
    model = step_model(rows)
    measure = rows[0].get("measure", "step_s") if rows else "step_s"
    configs = expand_plan(load_plan(args.plan), args.data)
    ds = open_dataset(args.data, mmap=True)
    cohort = ds.cohort
    ids = cohort["stay_id"].to_numpy(np.int64)
    has = cohort["has_cxr"].to_numpy(bool)
    split_cache: dict = {}
    per_run: list[
        tuple[str, float, float, float, float, int]
    ] = []  # method, avail, n_train, n_val, n_test, ...
    skipped = sorted({c.model for c in configs} - set(model))
    for c in configs:
        if c.model not in model:
            continue
        key = (c.task, c.fold, c.cohort)
        if key not in split_cache:
            split_cache[key] = split_rows(cohort, ds.label_columns(c.task), c.fold, c.cohort)
        rows_ = split_cache[key]
        tr = rows_["train"]
        dropped = cxr_dropout(ids[tr], has[tr], c.cxr_dropout_train, c.cxr_dropout_seed)
        avail = float((has[tr] & ~dropped).mean()) if "cxr" in c.modalities and len(tr) else 0.0
        per_run.append((c.model, avail, len(tr), len(rows_["val"]), len(rows_["test"]), 1))
    bs = args.batch_size
    batch = {r["method"]: int(r.get("batch") or bs) for r in rows}  # the batch each step time was measured at
    print(
        f"Plan {args.plan!r} on {args.data}: {len(configs)} runs, {len(per_run)} with a reference measurement "
        f"(left out: {', '.join(skipped) or 'none'}); step times: {args.steps} ({measure}); batch {bs} unless the "
        "step was measured at another (the reference's published one, e.g. HEALNet 4); "
        f"forward = {FORWARD_SHARE:.2f} x a training step\n"
    )
    print("| mean epochs per run | reference device-hours | carebench fp32 device-hours | carebench default "
          "device-hours | reference / carebench default |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for epochs in (float(e) for e in args.epochs.split(",")):
        totals = {"reference": 0.0, "ours fp32": 0.0, "ours default": 0.0}
        for method, avail, n_tr, n_val, n_test, _ in per_run:
            m = model[method]
            for side in totals:
                if side == "reference":
                    t_step = m["reference"]
                else:
                    ehr, img = m[side]
                    t_step = ehr + avail * img
                b = batch.get(method, bs)
                steps = math.floor(n_tr / b)
                fwd = FORWARD_SHARE * t_step
                seconds = epochs * (steps * t_step + math.ceil(n_val / b) * fwd) + math.ceil(n_test / b) * fwd
                totals[side] += seconds / 3600
        print(
            f"| {epochs:g} | {totals['reference']:,.0f} | {totals['ours fp32']:,.0f} | "
            f"{totals['ours default']:,.0f} | {totals['reference'] / totals['ours default']:.2f}x |"
        )


if __name__ == "__main__":
    main()
