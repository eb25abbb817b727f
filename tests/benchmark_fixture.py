"""A small benchmark (runs directory) for tests of `carebench analyze` and `carebench report`.

Two kinds of runs, both real run records (resolved config.yaml named by its run id, predictions, DONE):
- trained runs (`train_runs`): `training.run.train_run` with the `test` preset, so checkpoints exist and the
  analysis re-loads them (ablations, test-time missingness, validation predictions);
- written runs (`write_runs`): predictions drawn from a known model of the labels, without a checkpoint, so
  many folds, seeds and methods cost nothing and the expected statistics can be computed in the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from carebench.data.folds import fold_roles
from carebench.data.store import open_dataset
from carebench.training import resolve_config, train_run

PHENO_SIGNAL = {"lstm": 0.8, "resnet": 0.3, "latefusion": 1.0, "medfuse": 1.6}


def train_runs(
    data_dir: Path, out: Path, models: Iterable[str], task: str = "mortality", **options
) -> dict[str, Path]:
    """Train each model for one epoch (preset `test`); returns model -> run directory."""
    res = {}
    for model in models:
        cfg = resolve_config(
            data=data_dir,
            model=model,
            task=task,
            preset="test",
            options={"progress": False, "max_epochs": 1, **options},
        )
        res[model] = train_run(cfg, out).run_dir
    return res


def _probabilities(y: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    logit = signal * (2.0 * y - 1.0) + rng.normal(0.0, 1.0, y.shape)
    return 1.0 / (1.0 + np.exp(-logit))


def write_run(
    data_dir: Path,
    out: Path,
    model: str,
    task: str,
    fold: int,
    seed: int,
    signal: float,
    overrides: dict | None = None,
) -> Path:
    """A finished run record whose test/validation predictions are sigmoid(signal * (2y - 1) + N(0, 1))
    (LOS: softmax(signal * onehot(y) + N(0, 1)))."""
    cfg = resolve_config(
        data=data_dir,
        model=model,
        task=task,
        preset="test",
        options={"progress": False, "fold": fold, "seed": seed},
        overrides=overrides,
    )
    ds = open_dataset(data_dir)
    cohort, decl = ds.cohort, ds.task(task)
    names = decl.output_names
    rng = np.random.default_rng([fold, seed, sum(map(ord, model)), sum(map(ord, task))])
    run = out / cfg.run_id
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    roles = fold_roles(fold)
    for split, fname in (("test", "predictions.parquet"), ("val", "predictions_val.parquet")):
        part = cohort[cohort["fold"].isin(roles[split])].sort_values("stay_id")
        frame = {"stay_id": part["stay_id"].to_numpy(), "cxr_input": part["has_cxr"].to_numpy(bool)}
        y = part[list(decl.labels)].to_numpy()
        if decl.spec.kind == "multiclass":  # softmax(signal * onehot(y) + N(0, 1))
            z = signal * (y[:, :1] == np.arange(len(names))) + rng.normal(0.0, 1.0, (len(y), len(names)))
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            frame[f"y_{task}"] = y[:, 0].astype(np.int64)
        else:
            p = _probabilities(y, signal, rng)
            for j, name in enumerate(names):
                frame[f"y_{name}"] = y[:, j].astype(np.int8)
        for j, name in enumerate(names):
            frame[f"p_{name}"] = p[:, j].astype(np.float64)
        pd.DataFrame(frame).to_parquet(run / fname, index=False)
    (run / "metrics.json").write_text(json.dumps({"run_id": cfg.run_id, "test": {}}))
    (run / "DONE").write_text("written by tests/benchmark_fixture.py\n")
    return run


def write_runs(
    data_dir: Path,
    out: Path,
    task: str = "phenotype",
    signal: dict[str, float] | None = None,
    folds=(1, 2),
    seeds=(0, 1),
) -> list[Path]:
    """`write_run` for every method x fold x seed."""
    signal = signal or PHENO_SIGNAL
    return [write_run(data_dir, out, m, task, f, s, signal[m]) for m in signal for f in folds for s in seeds]


def write_plan(out: Path, **sections) -> None:
    """A minimal RUNS/plan.yaml carrying analysis options (as `carebench benchmark` records them)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.yaml").write_text(yaml.safe_dump({"name": "test-plan", **sections}))
