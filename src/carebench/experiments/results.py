"""Finished runs of a runs directory, collected into tidy tables for the analysis.

Why discovery by scanning rather than reading `RUNS/runs.csv`: the index lists *planned* runs with a status, but
a run counts only when its record is complete, and runs trained by hand with `carebench train --out RUNS` belong
to the same benchmark. So a run is a directory `RUNS/<run_id>/` holding `DONE` (written last by
`training.run.train_run`) and `config.yaml`; everything else (partial directories, `analysis/`, `report/`,
`failed/`) is ignored. `RUNS/plan.yaml` (written by `carebench benchmark`) is read only for the analysis options
(missingness test rates, fairness attributes, statistics settings).

Runs are grouped for comparison by task x cohort x X-ray dropout setting; within a group the methods are the
model names and every (method, fold, seed) must be one run, otherwise two configurations of the same method
would be pooled as if they were seeds (an error names both run ids).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from carebench.errors import UserError
from carebench.training.config import TrainConfig

PLAN_FILE = "plan.yaml"
DONE = "DONE"  # = training.run.DONE (not imported: that module imports torch and Lightning)
PREDICTIONS = "predictions.parquet"
VAL_PREDICTIONS = "predictions_val.parquet"  # = training.run.VAL_PREDICTIONS (newer run records only)
RUN_COLUMNS = [
    "run_id",
    "model",
    "task",
    "cohort",
    "fold",
    "seed",
    "preset",
    "cxr_dropout_train",
    "cxr_dropout_val",
    "cxr_dropout_test",
    "modalities",
    "unimodal",
    "main",
    "data_fingerprint",
]
KEY_COLUMNS = ["method", "run_id", "fold", "seed"]


class ResultsError(UserError, ValueError):
    """A runs directory without finished runs, an unreadable run record, or runs that cannot be pooled."""


@dataclass(frozen=True)
class RunRecord:
    """One finished run: where it is, its resolved configuration and what its model reads."""

    path: Path
    config: TrainConfig
    modalities: tuple[str, ...]

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return self.config.model

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def cohort(self) -> str:
        return self.config.cohort

    @property
    def dropout(self) -> tuple[float, float, float]:
        """(train, val, test) X-ray dropout rates the run was trained and tested with."""
        c = self.config
        return float(c.cxr_dropout_train), float(c.cxr_dropout_val), float(c.cxr_dropout_test)

    @property
    def main(self) -> bool:
        """True for runs of the main grid: no X-ray removed from any split (the natural availability)."""
        return self.dropout == (0.0, 0.0, 0.0)

    @property
    def unimodal(self) -> bool:
        return len(self.modalities) == 1

    @property
    def uses_cxr(self) -> bool:
        return "cxr" in self.modalities

    @property
    def uses_ehr(self) -> bool:
        return "ehr" in self.modalities


def _modalities(model: str, where: Path) -> tuple[str, ...]:
    from carebench.models import get_model_class

    try:
        return tuple(get_model_class(model).modalities)
    except (KeyError, ValueError, UserError) as e:
        raise ResultsError(f"{where}: model {model!r} is not registered ({e})") from None


def find_runs(runs_dir: str | Path) -> list[RunRecord]:
    """Every finished run (`<run_id>/DONE` and `config.yaml`) directly under `runs_dir`, in a fixed order.

    Order: task, cohort, model, fold, seed, dropout rates, run id. An unreadable `config.yaml`, a directory name
    that is not the run id of its configuration, or a missing `predictions.parquet` is an error naming the file.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise ResultsError(
            f"{root}: not a directory (expected a runs directory written by `carebench benchmark` "
            "or `carebench train --out`)"
        )
    records = []
    for done in sorted(root.glob(f"*/{DONE}")):
        d = done.parent
        if d.name.startswith("."):
            continue
        cfg_path = d / "config.yaml"
        if not cfg_path.is_file():
            raise ResultsError(f"{cfg_path}: missing (a finished run needs its resolved configuration)")
        try:
            cfg = TrainConfig.from_yaml(cfg_path)
        except (UserError, TypeError, yaml.YAMLError) as e:
            raise ResultsError(f"{cfg_path}: not a run configuration ({e})".replace("\n", " ")) from None
        declared = (yaml.safe_load(cfg_path.read_text()) or {}).get("run_id")
        if declared is not None and declared != d.name:
            raise ResultsError(f"{cfg_path}: run_id {declared!r} does not match its directory {d.name!r}")
        if not (d / PREDICTIONS).is_file():
            raise ResultsError(f"{d / PREDICTIONS}: missing (expected in every finished run)")
        records.append(RunRecord(path=d, config=cfg, modalities=_modalities(cfg.model, cfg_path)))
    if not records:
        raise ResultsError(
            f"{root}: no finished runs (no <run_id>/{DONE} with config.yaml); run "
            "`carebench benchmark --out RUNS` first"
        )
    records.sort(
        key=lambda r: (r.task, r.cohort, r.method, r.config.fold, r.config.seed, r.dropout, r.run_id)
    )
    return records


def runs_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per run: `RUN_COLUMNS` (modalities joined with '+')."""
    rows = [
        {
            "run_id": r.run_id,
            "model": r.method,
            "task": r.task,
            "cohort": r.cohort,
            "fold": r.config.fold,
            "seed": r.config.seed,
            "preset": r.config.preset,
            "cxr_dropout_train": r.dropout[0],
            "cxr_dropout_val": r.dropout[1],
            "cxr_dropout_test": r.dropout[2],
            "modalities": "+".join(r.modalities),
            "unimodal": r.unimodal,
            "main": r.main,
            "data_fingerprint": r.config.data_fingerprint,
        }
        for r in records
    ]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def read_plan(runs_dir: str | Path) -> dict[str, Any] | None:
    """`RUNS/plan.yaml` as a mapping, or None when the runs were not made by `carebench benchmark`."""
    path = Path(runs_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ResultsError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ResultsError(f"{path}: expected a mapping (the resolved plan written by `carebench benchmark`)")
    return raw


def common_dataset(records: Sequence[RunRecord]) -> tuple[str, str]:
    """(path, fingerprint) of the one dataset all runs were trained on; runs on two datasets are an error."""
    prints = {}
    for r in records:
        prints.setdefault(r.config.data_fingerprint, r)
    if len(prints) > 1:
        a, b = list(prints.values())[:2]
        raise ResultsError(
            f"runs {a.run_id} and {b.run_id} were trained on different datasets (fingerprints "
            f"{a.config.data_fingerprint} and {b.config.data_fingerprint}); analyse one dataset "
            "per runs directory"
        )
    r = records[0]
    return r.config.data, r.config.data_fingerprint


def groups(
    records: Iterable[RunRecord],
) -> dict[tuple[str, str, tuple[float, float, float]], list[RunRecord]]:
    """Runs keyed by (task, cohort, dropout rates), each group checked to hold one run per (method, fold, seed)."""
    out: dict[tuple[str, str, tuple[float, float, float]], list[RunRecord]] = {}
    for r in records:
        out.setdefault((r.task, r.cohort, r.dropout), []).append(r)
    for (task, cohort, rates), members in out.items():
        seen: dict[tuple[str, int, int], RunRecord] = {}
        for r in members:
            key = (r.method, r.config.fold, r.config.seed)
            if key in seen:
                raise ResultsError(
                    f"runs {seen[key].run_id} and {r.run_id}: two configurations of method {r.method!r} for task "
                    f"{task!r}, cohort {cohort!r}, fold {r.config.fold}, seed {r.config.seed} (X-ray dropout "
                    f"{rates}); keep one per runs directory (they would be pooled as one method)"
                )
            seen[key] = r
    return out


def read_predictions(record: RunRecord, split: str = "test") -> pd.DataFrame | None:
    """The run's saved predictions of `split` ("test": predictions.parquet; "val": predictions_val.parquet,
    None when the record predates it)."""
    path = record.path / (PREDICTIONS if split == "test" else VAL_PREDICTIONS)
    if split != "test" and not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: unreadable ({e})") from None


def with_keys(frame: pd.DataFrame, record: RunRecord) -> pd.DataFrame:
    """A predictions frame with the run's `method`, `run_id`, `fold` and `seed` columns in front."""
    keys = pd.DataFrame(
        {
            "method": record.method,
            "run_id": record.run_id,
            "fold": record.config.fold,
            "seed": record.config.seed,
        },
        index=frame.index,
    )
    return pd.concat([keys, frame], axis=1)


def long_predictions(frames: Iterable[tuple[RunRecord, pd.DataFrame]]) -> pd.DataFrame:
    """Concatenate per-run prediction frames into the long table of `evaluation.statistics` (one row per
    method, seed and stay; folds side by side)."""
    parts = [with_keys(f, r) for r, f in frames]
    if not parts:
        return pd.DataFrame(columns=KEY_COLUMNS)
    return pd.concat(parts, ignore_index=True)
