"""Tuned against default hyper-parameters: per method, a `carebench tune` study on the validation split, its best
trial tested once after the study, beside a run with the method's default hyper-parameters (same preset, fold, seed).

    python benchmarks/tune_vs_default.py --data DATA --out DIR [--models medfuse,mmtm,latefusion] [--task phenotype]
        [--preset quick] [--fold 1] [--trials 8] [--threads 2]

Resumable: the studies live in DIR/<model>/ (re-running continues them; `--trials` is the total of complete trials)
and the default runs in DIR/defaults/. Prints one markdown row per method: trials (complete / pruned / failed),
wall time of the study, the validation value of the task's selection metric (default run vs best trial) and the
test values of the selection metric and of macro AUROC (default run vs best trial), plus the best parameters.
"""

from __future__ import annotations

import os.path
import sys

if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import platform
import time
from pathlib import Path


def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="medfuse,mmtm,latefusion")
    ap.add_argument("--task", default="phenotype")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from carebench.tasks import get_task
    from carebench.training.config import resolve_config
    from carebench.training.run import evaluate_run, train_run
    from carebench.tuning import tune

    out = Path(args.out)
    selection = get_task(args.task).selection_metric
    rows = []
    for model in args.models.split(","):
        t0 = time.perf_counter()
        summary = tune(data=args.data, model=model, task=args.task, out=out / model, trials=args.trials,
                       fold=args.fold, preset=args.preset, seed=args.seed, threads=args.threads,
                       echo=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
        study_s = time.perf_counter() - t0
        best = summary.best
        if best is None:
            raise SystemExit(f"{model}: the study has no complete trial")
        tested = evaluate_run(out / model / "trials" / best["run_id"])
        cfg = resolve_config(data=args.data, model=model, task=args.task, preset=args.preset,
                             options={"fold": args.fold, "seed": args.seed, "threads": args.threads,
                                      "progress": False})  # fmt: skip
        default = train_run(cfg, out / "defaults").metrics
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(best["params"].items()))
        rows.append(
            f"| {model} | {summary.complete} / {summary.pruned} / {summary.failed} | {study_s / 60:.1f} | "
            f"{default['val_best']:.3f} | {best['value']:.3f} | {default['test'][selection]:.3f} | "
            f"{tested[selection]:.3f} | {default['test']['auroc_macro']:.3f} | {tested['auroc_macro']:.3f} | "
            f"{params} |"
        )
    print(f"\n{args.task}, preset {args.preset}, fold {args.fold}, seed {args.seed}, {args.trials} complete trials per "
          f"study; {platform.machine()}, {os.cpu_count()} logical CPUs, {args.threads} threads; "
          f"{time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print(f"| method | trials complete / pruned / failed | study min | val {selection} default | val best trial | "
          f"test {selection} default | test best trial | test auroc_macro default | test best trial | best parameters |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
