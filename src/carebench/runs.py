"""The run record: the one module that knows a run folder (a torch-free leaf; no Lightning, no torch).

A finished run is the directory ``RUNS/<run_id>/``:

===========================  ===================================================================================
``config.yaml``              the complete resolved configuration (``run_id`` first), written by training
``metrics.json``             test metrics, selection metric, splits, timings, normalisation, versions
``predictions.parquet``      one row per test stay (``predictions_frame``: ``stay_id``, ``cxr_input``, ``y_*``,
                             ``p_*``, ``p_*__<head>``); absent from a validation-only run (a tuning trial,
                             ``evaluate_test: false``), which never builds its test split
``predictions_val.parquet``  the same for the validation stays (decision thresholds are chosen on these)
``checkpoint``               the best validation epoch's weights (Lightning checkpoint)
``log/``                     per-epoch curves (``log/metrics.csv``)
``DONE``                     written last: a directory without it is not a finished run
===========================  ===================================================================================

Why one home: "what a finished run is" used to be written in the training, the runner, the results reader, the
CLI and the modality analysis, each with its own string literals. Here it is defined once:

- **Writing** (`start_run`, `finish_run`): everything goes into ``RUNS/.<run_id>.partial/``; ``DONE`` is written
  last and the directory is renamed into place, so a killed run never leaves a record that looks finished. A
  final directory without ``DONE`` (an interrupted earlier attempt) is replaced.
- **Identity** (`run_id`): ``<model>_<task>_f<fold>_s<seed>_<hash>``, the hash of every result-relevant setting of
  the resolved configuration (settings in `NOT_HASHED` cannot change a result), so the same configuration always
  lands in the same directory and a finished run is skipped on resume.
- **Reading** (`read_run`, `find_runs`, `runs_table`, `read_predictions`, `read_metrics`): only directories with
  ``DONE`` count; anything else in ``RUNS/`` (partial directories, the plan, the index, analysis, report) is
  ignored. A malformed finished run is an error naming the file.
- **The dataset** a run was trained on (`common_dataset`, `check_dataset`): every run records the fingerprint of
  its processed dataset (``data/store.dataset_fingerprint``); runs made on different datasets, or on a dataset
  that has changed since, are refused with a message naming both fingerprints, never pooled.
- **The predictions frame** (`predictions_frame`, `prediction_columns`, `prediction_arrays`, `prediction_heads`,
  `head_frame`): the columns of the two predictions files, written and read here only.

The runs directory also holds ``plan.yaml`` and ``runs.csv`` (written by ``carebench benchmark``), ``.locks/``
(`run_lock`), ``failed/`` (logs of failed runs), ``analysis/`` and ``report/``; docs/architecture.md has the map.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from carebench.errors import UserError
from carebench.tasks import get_task

# ------------------------------------------------------------------------------------------ names on disk
CONFIG = "config.yaml"
METRICS = "metrics.json"
PREDICTIONS = "predictions.parquet"
VAL_PREDICTIONS = "predictions_val.parquet"
CHECKPOINT = "checkpoint"
LOG_DIR = "log"
DONE = "DONE"
PARTIAL_SUFFIX = ".partial"
# The runs directory around the run folders.
PLAN_FILE = "plan.yaml"  # the resolved plan of `carebench benchmark`
INDEX = "runs.csv"  # one row per planned run with its status
LOCKS = ".locks"  # flock files, one per run and one per benchmark
FAILED = "failed"  # logs of failed runs
# Configuration keys that cannot change a run's result, or only by float rounding (`threads`, `channels_last`,
# `cudnn_benchmark`: other kernels, same arithmetic): recorded in config.yaml, left out of the run id.
# `hparams_source` says where the hyper-parameters came from (defaults, or a study's trial); the values
# themselves are hashed.
NOT_HASHED = (
    "data",
    "num_workers",
    "threads",
    "progress",
    "modalities",
    "hparams_source",
    "channels_last",
    "cudnn_benchmark",
)
# Keys added after run ids were first issued: hashed only when they differ from this value, so the runs made
# before them keep their ids. `evaluate_test: false` marks a validation-only run (a tuning trial).
HASHED_UNLESS = {"evaluate_test": True}
SPLIT_FILES = {"test": PREDICTIONS, "val": VAL_PREDICTIONS}


class RunsError(UserError, ValueError):
    """A runs directory without finished runs, a malformed run record, or runs that cannot be pooled."""


# ------------------------------------------------------------------------------------------ identity
def run_id(config: Mapping[str, Any]) -> str:
    """``<model>_<task>_f<fold>_s<seed>_<hash>``: a readable prefix and the hash of every result-relevant key.

    `config` is the flat resolved configuration (``TrainConfig.to_dict()``); keys in `NOT_HASHED`, ``run_id``
    itself and keys of `HASHED_UNLESS` at their value there are left out of the hash.
    """
    hashed = {
        k: v
        for k, v in config.items()
        if k not in NOT_HASHED and k != "run_id" and not (k in HASHED_UNLESS and v == HASHED_UNLESS[k])
    }
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{config['model']}_{config['task']}_f{config['fold']}_s{config['seed']}_{digest}"


def config_yaml(config: Mapping[str, Any]) -> str:
    """The text of ``config.yaml``: ``run_id`` first, then every key in order."""
    return yaml.safe_dump({"run_id": run_id(config), **dict(config)}, sort_keys=False)


def parse_config(text: str, where: str | Path) -> dict[str, Any]:
    """``config.yaml`` text -> the configuration mapping (``run_id`` removed); an error naming `where`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RunsError(f"{where}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise RunsError(f"{where}: expected a mapping (a resolved run configuration)")
    raw.pop("run_id", None)
    return raw


def read_config(path: str | Path) -> dict[str, Any]:
    """A run's ``config.yaml`` (or its folder) -> the configuration mapping."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG
    if not path.is_file():
        raise RunsError(f"{path}: missing (a run needs its resolved configuration)")
    return parse_config(path.read_text(), path)


# ------------------------------------------------------------------------------------------ writing
def partial_dir(runs_dir: str | Path, rid: str) -> Path:
    """Where a run is built before it is renamed into place: ``RUNS/.<run_id>.partial``."""
    return Path(runs_dir) / f".{rid}{PARTIAL_SUFFIX}"


def is_done(runs_dir: str | Path, rid: str) -> bool:
    """True when ``RUNS/<run_id>/DONE`` exists (the run finished; its record is complete)."""
    return (Path(runs_dir) / rid / DONE).is_file()


def finish_stamp(run_dir: str | Path) -> str | None:
    """What a finished run's ``DONE`` holds (the time it finished; a retrained run has another), or None."""
    try:
        return (Path(run_dir) / DONE).read_text()
    except OSError:
        return None


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python numbers, tuples -> lists (recursively)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """`obj` (made `json_safe`) as indented JSON, via a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# Partial run folders this process is writing -> (descriptor holding the folder's flock, directories created for
# it). The flock tells `clean_partials` (another benchmark, or this one at start) that the folder is alive.
_WRITING: dict[Path, tuple[int, list[Path]]] = {}


def _lock_folder(path: Path) -> int | None:
    """An exclusive flock on the folder itself (its descriptor), or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def start_run(runs_dir: str | Path, config: Mapping[str, Any]) -> Path:
    """A fresh ``RUNS/.<run_id>.partial/`` holding ``config.yaml``, locked by this process until `finish_run` or
    `abandon_run`. A leftover partial folder of a dead process is deleted first; one that a live process is
    writing is an error."""
    rid = run_id(config)
    work = partial_dir(runs_dir, rid)
    if work.is_dir():
        fd = _lock_folder(work)
        if fd is None:
            raise RunsError(f"{work}: run {rid} is being written by another process (wait for it to finish)")
        shutil.rmtree(work)
        os.close(fd)
    created = [p for p in (work.parent, *work.parent.parents) if not p.exists()][::-1]
    work.mkdir(parents=True)
    fd = _lock_folder(work)
    _WRITING[work] = (-1 if fd is None else fd, created)
    try:
        (work / CONFIG).write_text(config_yaml(config))
    except BaseException:
        abandon_run(work)
        raise
    return work


def _release(work: Path) -> list[Path]:
    fd, created = _WRITING.pop(work, (-1, []))
    if fd >= 0:
        os.close(fd)
    return created


def abandon_run(work: str | Path) -> None:
    """A run that failed: delete its partial folder, and the runs directory (and parents) if `start_run` created
    them and they are empty, so a failed `carebench train` leaves nothing behind."""
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    for d in reversed(_release(work)):
        with contextlib.suppress(OSError):
            d.rmdir()


def finish_run(work: str | Path) -> Path:
    """Write ``DONE`` last in a partial run folder and rename it into place; return the final folder.

    A final folder that already exists has no ``DONE`` (callers skip finished runs), i.e. it is an interrupted
    earlier attempt: it is replaced.
    """
    work = Path(work)
    if not work.name.startswith(".") or not work.name.endswith(PARTIAL_SUFFIX):
        raise ValueError(f"{work}: not a partial run folder")
    final = work.with_name(work.name[1 : -len(PARTIAL_SUFFIX)])
    (work / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(work, final)
    _release(work)
    return final


@contextlib.contextmanager
def run_lock(runs_dir: str | Path, name: str, *, blocking: bool = True) -> Iterator[bool]:
    """Exclusive lock on ``RUNS/.locks/<name>.lock``; yields whether it was acquired (always, when blocking).

    flock locks belong to the open file and are released by the kernel when the holder exits or is killed, so a
    lock never outlives a dead process. Lock files are never deleted (deleting them would race with a waiter).
    """
    folder = Path(runs_dir) / LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            acquired = True
        except BlockingIOError:
            acquired = False
        yield acquired
    finally:
        os.close(fd)


def clean_partials(runs_dir: str | Path) -> list[str]:
    """Delete ``.<run_id>.partial`` folders that no live process is writing (their run lock and the folder's own
    lock are free); return their run ids. A partial folder is never a finished run, so nothing of value is lost."""
    removed = []
    for p in sorted(Path(runs_dir).glob(f".*{PARTIAL_SUFFIX}")):
        rid = p.name[1 : -len(PARTIAL_SUFFIX)]
        with run_lock(runs_dir, rid, blocking=False) as free:
            if not free or not p.is_dir() or p in _WRITING:
                continue
            fd = _lock_folder(p)  # a `carebench train` writing this run holds the folder's own lock
            if fd is None:
                continue
            try:
                shutil.rmtree(p)
            finally:
                os.close(fd)
            removed.append(rid)
    return removed


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class RunRecord:
    """One finished run: its folder and its resolved configuration (a plain mapping, as in config.yaml)."""

    path: Path
    config: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return str(self.config["model"])

    @property
    def task(self) -> str:
        return str(self.config["task"])

    @property
    def cohort(self) -> str:
        return str(self.config.get("cohort", "base"))

    @property
    def fold(self) -> int:
        return int(self.config["fold"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def preset(self) -> str:
        return str(self.config.get("preset", ""))

    @property
    def precision(self) -> str:
        return str(self.config.get("precision", "32-true"))

    @property
    def data(self) -> str:
        return str(self.config.get("data", ""))

    @property
    def data_fingerprint(self) -> str:
        return str(self.config.get("data_fingerprint", ""))

    @property
    def dropout(self) -> tuple[float, float, float]:
        """(train, val, test) X-ray dropout rates the run was trained and tested with."""
        c = self.config
        return tuple(float(c.get(f"cxr_dropout_{s}", 0.0)) for s in ("train", "val", "test"))  # type: ignore[return-value]

    @property
    def main(self) -> bool:
        """True for runs of the main grid: no X-ray removed from any split (the natural availability)."""
        return self.dropout == (0.0, 0.0, 0.0)

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the run's model reads, as recorded by training (empty for a record that predates the key)."""
        return tuple(self.config.get("modalities") or ())

    @property
    def unimodal(self) -> bool:
        return len(self.modalities) == 1

    @property
    def uses_cxr(self) -> bool:
        return "cxr" in self.modalities

    @property
    def uses_ehr(self) -> bool:
        return "ehr" in self.modalities

    @property
    def tested(self) -> bool:
        """False for a validation-only run (a tuning trial): it never built its test split and has no test
        predictions."""
        return bool(self.config.get("evaluate_test", True))

    @property
    def hparams_source(self) -> str:
        """Where the run's hyper-parameters came from: "defaults", or "study <name> trial <n>"."""
        src = self.config.get("hparams_source", "defaults")
        if isinstance(src, dict):
            return f"study {src.get('study')} trial {src.get('trial')}"
        return str(src)

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    def with_modalities(self, modalities: Sequence[str]) -> RunRecord:
        """The same record with `modalities` filled in (for records written before training recorded them)."""
        return RunRecord(self.path, {**self.config, "modalities": list(modalities)})


def read_run(path: str | Path) -> RunRecord:
    """The finished run in folder `path`: ``DONE``, a readable ``config.yaml`` whose ``run_id`` is the folder's
    name, and ``predictions.parquet`` (``predictions_val.parquet`` for a validation-only run); anything else is
    an error naming the file."""
    d = Path(path)
    if not (d / DONE).is_file():
        raise RunsError(f"{d / DONE}: missing (expected a finished run folder)")
    cfg_path = d / CONFIG
    config = read_config(cfg_path)
    missing = [k for k in ("model", "task", "fold", "seed") if k not in config]
    if missing:
        raise RunsError(f"{cfg_path}: not a run configuration (missing keys {missing})")
    declared = (yaml.safe_load(cfg_path.read_text()) or {}).get("run_id")
    if declared is not None and declared != d.name:
        raise RunsError(f"{cfg_path}: run_id {declared!r} does not match its folder {d.name!r}")
    record = RunRecord(path=d, config=config)
    needed = PREDICTIONS if record.tested else VAL_PREDICTIONS
    if not (d / needed).is_file():
        raise RunsError(f"{d / needed}: missing (expected in every finished run)")
    return record


def finished_run_ids(runs_dir: str | Path) -> list[str]:
    """The run ids of the finished run folders directly under `runs_dir` (``DONE`` present), sorted, without
    reading them."""
    return sorted(
        d.parent.name for d in Path(runs_dir).glob(f"*/{DONE}") if not d.parent.name.startswith(".")
    )


def find_runs(runs_dir: str | Path, broken: dict[str, str] | None = None) -> list[RunRecord]:
    """Every finished run directly under `runs_dir`, in a fixed order (task, cohort, model, fold, seed, dropout
    rates, run id). Folders without ``DONE`` (killed or failed runs, partial folders) are not runs.

    A finished run whose record is malformed is an error naming the file; with `broken` (a dict), it is recorded
    there instead (run folder name -> the problem) and left out."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise RunsError(
            f"{root}: not a directory (expected a runs directory written by `carebench benchmark` or "
            "`carebench train --out`)"
        )
    records = []
    for done in sorted(root.glob(f"*/{DONE}")):
        if done.parent.name.startswith("."):
            continue
        try:
            records.append(read_run(done.parent))
        except RunsError as e:
            if broken is None:
                raise
            broken[done.parent.name] = str(e)
    if not records and broken:
        shown = "; ".join(f"{k}: {v}" for k, v in list(broken.items())[:3])
        raise RunsError(f"{root}: no usable finished run ({len(broken)} unusable: {shown})")
    if not records:
        raise RunsError(
            f"{root}: no finished runs (no <run_id>/{DONE} with {CONFIG}); run `carebench benchmark --out RUNS` first"
        )
    records.sort(key=lambda r: (r.task, r.cohort, r.method, r.fold, r.seed, r.dropout, r.run_id))
    return records


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
    "hparams_source",
]


def runs_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per run: `RUN_COLUMNS` (modalities joined with '+')."""
    rows = [
        {
            "run_id": r.run_id,
            "model": r.method,
            "task": r.task,
            "cohort": r.cohort,
            "fold": r.fold,
            "seed": r.seed,
            "preset": r.preset,
            "cxr_dropout_train": r.dropout[0],
            "cxr_dropout_val": r.dropout[1],
            "cxr_dropout_test": r.dropout[2],
            "modalities": "+".join(r.modalities),
            "unimodal": r.unimodal,
            "main": r.main,
            "data_fingerprint": r.data_fingerprint,
            "hparams_source": r.hparams_source,
        }
        for r in records
    ]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def read_predictions(record: RunRecord, split: str = "test") -> pd.DataFrame | None:
    """The run's saved predictions of `split` ("test"; "val": None for a record that predates them)."""
    if split not in SPLIT_FILES:
        raise RunsError(f"split: expected one of {sorted(SPLIT_FILES)}, got {split!r}")
    if split == "test" and not record.tested:
        raise RunsError(
            f"{record.path}: a validation-only run (a tuning trial) has no test predictions; it is never tested"
        )
    path = record.path / SPLIT_FILES[split]
    if split != "test" and not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # OSError, ValueError, ArrowInvalid ...: a truncated or overwritten file
        raise RunsError(f"{path}: unreadable ({_first_line(e)})") from None


def run_problem(record: RunRecord) -> str | None:
    """What makes a finished run unusable for analysis, or None: unreadable or truncated predictions (test or
    validation), predictions without the task's columns, repeated stays, probabilities that are not numbers in
    [0, 1], an unreadable ``metrics.json``. The message names the file."""
    try:
        frame = read_predictions(record)
        read_predictions(record, "val")
        metrics = read_metrics(record)
    except RunsError as e:
        return str(e)
    except Exception as e:  # a file that parses into something unexpected
        return f"{record.path}: unreadable ({type(e).__name__}: {e})"
    where = record.path / PREDICTIONS
    if not isinstance(metrics, dict):
        return f"{record.path / METRICS}: expected a JSON object, got {type(metrics).__name__}"
    try:
        ycols, pcols, names = prediction_columns(frame.columns, record.task)
    except UserError as e:
        return f"{record.path / CONFIG}: {e}"
    missing = [c for c in ["stay_id", *ycols, *pcols] if c not in frame.columns]
    if missing or not names:
        return f"{where}: missing columns {missing or ['y_*', 'p_*']} for task {record.task!r}"
    if frame.empty:
        return f"{where}: no rows (expected one row per test stay)"
    if frame["stay_id"].duplicated().any():
        return f"{where}: stay_id {frame.loc[frame['stay_id'].duplicated(), 'stay_id'].iloc[0]} appears twice"
    p = frame[pcols].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~(np.isfinite(p) & (p >= 0) & (p <= 1))
    if bad.any():
        col = pcols[int(np.argwhere(bad)[0][1])]
        return f"{where}: column {col} has {int(bad.sum())} value(s) that are not probabilities in [0, 1]"
    return None


def read_metrics(record_or_path: RunRecord | str | Path) -> dict[str, Any]:
    """The run's ``metrics.json``."""
    d = record_or_path.path if isinstance(record_or_path, RunRecord) else Path(record_or_path)
    path = d / METRICS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunsError(f"{path}: unreadable ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------------ the dataset
def common_dataset(records: Sequence[RunRecord]) -> tuple[str, str]:
    """(path, fingerprint) of the one dataset all runs were trained on; runs on two datasets are an error."""
    prints: dict[str, RunRecord] = {}
    for r in records:
        prints.setdefault(r.data_fingerprint, r)
    if len(prints) > 1:
        a, b = list(prints.values())[:2]
        raise RunsError(
            f"runs {a.run_id} and {b.run_id} were trained on different datasets (fingerprints "
            f"{a.data_fingerprint} and {b.data_fingerprint}); analyse one dataset per runs directory"
        )
    r = records[0]
    return r.data, r.data_fingerprint


def check_dataset(expected: str, root: str | Path, actual: str, who: str = "the runs were") -> None:
    """Refuse a dataset whose fingerprint `actual` differs from the `expected` one recorded by the run(s).

    `who` completes the message: "the runs were" or "run <run_id> was".
    """
    if actual != expected:
        raise RunsError(
            f"{root}: not the dataset {who} trained on: its fingerprint is {actual}, the run record says "
            f"{expected} (the dataset has changed or is another one)"
        )


# ------------------------------------------------------------------------------------------ predictions
HEAD_SEP = "__"  # p_<name>__<head>: the probability of <name> from the per-modality head <head>


def predictions_frame(task: str, names: Sequence[str], arrays: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """One row per stay, sorted by stay: ``stay_id``, ``cxr_input`` (the X-ray given to the model), labels and
    probabilities. `arrays`: ``stay_id``, ``has_cxr``, ``y`` (task shape), ``p`` and ``p__<head>`` ([n, outputs]).

    Binary and multilabel tasks have ``y_<name>`` (int8) and ``p_<name>`` per output; a multiclass task has one
    label column ``y_<task>`` (the class) and ``p_<name>`` per class. Heads add ``p_<name>__<head>``.
    """
    cols: dict[str, np.ndarray] = {
        "stay_id": np.asarray(arrays["stay_id"]).astype(np.int64),
        "cxr_input": np.asarray(arrays["has_cxr"]).astype(bool),
    }
    y = np.asarray(arrays["y"])
    if get_task(task).kind == "multiclass":
        cols[f"y_{task}"] = y.reshape(-1).astype(np.int64)
    else:
        for j, name in enumerate(names):
            cols[f"y_{name}"] = y[:, j].astype(np.int8)
    for key in ["p", *sorted(k for k in arrays if k.startswith("p__"))]:
        suffix = key[1:]  # "" or "__<head>"
        for j, name in enumerate(names):
            cols[f"p_{name}{suffix}"] = np.asarray(arrays[key])[:, j].astype(np.float64)
    return pd.DataFrame(cols).sort_values("stay_id", kind="stable").reset_index(drop=True)


def prediction_columns(columns: Sequence[str], task: str) -> tuple[list[str], list[str], list[str]]:
    """(label columns, probability columns, output names) of `task` in a predictions frame's `columns`."""
    cols = list(columns)
    if get_task(task).kind == "multiclass":
        pattern = re.compile(rf"p_({re.escape(task)}_(\d+))")
        found = sorted((int(m.group(2)), m.group(1)) for c in cols if (m := pattern.fullmatch(c)))
        names = [n for _, n in found]
        return [f"y_{task}"], [f"p_{n}" for n in names], names
    names = [c[2:] for c in cols if c.startswith("y_")]
    return [f"y_{n}" for n in names], [f"p_{n}" for n in names], names


def prediction_arrays(frame: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, probabilities, output names) of a predictions frame; per-modality heads are ignored.

    binary: y [n], p [n]; multilabel: y [n, L], p [n, L]; multiclass: y [n] classes, p [n, K].
    """
    ycols, pcols, names = prediction_columns(frame.columns, task)
    missing = [c for c in ["stay_id", *ycols, *pcols] if c not in frame.columns]
    if missing or not names:
        raise RunsError(f"predictions: missing columns {missing or ycols + pcols} for task {task!r}")
    kind = get_task(task).kind
    y = frame[ycols].to_numpy()
    p = frame[pcols].to_numpy(dtype=np.float64)
    if kind != "multilabel":
        y = y[:, 0]
    if kind == "binary":
        p = p[:, 0]
    return y, p, names


def prediction_heads(frame: pd.DataFrame) -> list[str]:
    """Names of the per-modality heads in a predictions frame (``p_<name>__<head>`` columns), sorted."""
    return sorted({c.split(HEAD_SEP, 1)[1] for c in frame.columns if c.startswith("p_") and HEAD_SEP in c})


def head_frame(frame: pd.DataFrame, head: str, task: str) -> pd.DataFrame:
    """The predictions of one head as if they were the model's (``p_<name>__<head>`` -> ``p_<name>``; every
    other probability column dropped)."""
    names = prediction_columns(frame.columns, task)[2]
    rename = {f"p_{n}{HEAD_SEP}{head}": f"p_{n}" for n in names}
    missing = [c for c in rename if c not in frame.columns]
    if missing:
        raise RunsError(f"predictions: no head {head!r} (missing columns {missing[:3]})")
    keep = [c for c in frame.columns if not c.startswith("p_")]
    return pd.concat([frame[keep], frame[list(rename)].rename(columns=rename)], axis=1)


# ------------------------------------------------------------------------------------------ thresholds
def validation_thresholds(val: pd.DataFrame, task: str) -> dict[str, np.ndarray | None]:
    """Decision thresholds chosen on a run's VALIDATION predictions by its task's rule (`TaskSpec.threshold`),
    per predictor: "" = the model, then each per-modality head. [outputs] arrays (NaN for an output whose
    validation labels have one class), None for a multiclass task (argmax)."""
    from carebench.evaluation.metrics import task_thresholds  # scikit-learn only where thresholds are chosen

    out: dict[str, np.ndarray | None] = {}
    for head in ["", *prediction_heads(val)]:
        y, p, _ = prediction_arrays(val if not head else head_frame(val, head, task), task)
        out[head] = task_thresholds(task, y, p)
    return out


def thresholds_record(task: str, names: Sequence[str], thresholds: Mapping[str, np.ndarray | None]) -> dict:
    """What metrics.json records of the thresholds: the rule, the split they were chosen on, one per output."""

    def per_output(t: np.ndarray | None) -> dict[str, float | None] | None:
        return None if t is None else {n: json_safe(float(v)) for n, v in zip(names, t, strict=True)}

    return {
        "rule": get_task(task).threshold,
        "chosen_on": "validation",
        "outputs": per_output(thresholds.get("")),
        "heads": {h: per_output(t) for h, t in thresholds.items() if h},
    }


def frame_metrics(
    frame: pd.DataFrame, task: str, thresholds: Mapping[str, np.ndarray | None] | None = None
) -> dict[str, Any]:
    """Test metrics of a predictions frame (`evaluation.metrics.compute_metrics`) at the given thresholds (the
    run's validation thresholds, `validation_thresholds`), with `head:<name>` entries for per-modality heads."""
    from carebench.evaluation.metrics import compute_metrics

    thresholds = thresholds or {}
    y, p, names = prediction_arrays(frame, task)
    out: dict[str, Any] = compute_metrics(task, y, p, names, thresholds.get(""))
    for head in prediction_heads(frame):
        hy, hp, _ = prediction_arrays(head_frame(frame, head, task), task)
        out[f"head:{head}"] = compute_metrics(task, hy, hp, names, thresholds.get(head))
    return out
