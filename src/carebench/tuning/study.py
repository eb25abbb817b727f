"""One Optuna study: what defines it (`StudySpec`), where it lives (storage), how it samples, prunes and recovers.

Why these choices (docs/tuning.md):
- **Identity.** A study is named after everything that defines its objective: model, task, fold, cohort, preset,
  seed, the fixed settings, the space, pruning and the dataset's fingerprint (`StudySpec.name`). Re-running the
  same command finds the same study and continues it; a changed command starts another study, never mixes trials
  of two objectives. The spec is stored in the study (user attribute) and in ``OUT/study.yaml``.
- **Storage.** Any Optuna RDB URL (PostgreSQL, MySQL, SQLite); by default SQLite in ``OUT/study.db``. Many
  processes on many machines share one study through it, the standard Optuna way to distribute; there is no
  scheduler of ours. Workers send heartbeats; a trial whose worker stopped beating is failed and re-queued with
  the same parameters (`optuna.storages.RetryHeartbeatStaleTrialCallback`). On one machine a dead worker is also
  noticed at once: every trial records its host and process, and a RUNNING trial whose process is gone is failed
  and re-queued the same way (`recover_dead_trials`).
- **Reproducible sampling.** The parameters of trial n are drawn by TPE with a random state seeded by (seed, n)
  (`TrialSeededSampler`), so they depend on the seed, n and the finished trials only: a study run as
  ``--trials 2`` then ``--trials 4`` draws the same parameters as one run of ``--trials 4``, on CPU.
- **Pruning.** Optuna's median rule on the best validation value so far, per epoch of the model's last training
  stage, after a warm-up of a quarter of the epochs and three finished trials (`make_pruner`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carebench.tuning.space import TuningError

SPEC_FILE = "study.yaml"  # OUT/study.yaml: the study's spec, storage and name
DEFAULT_DB = "study.db"  # OUT/study.db: the default SQLite storage
TRIALS_DIR = "trials"  # OUT/trials/<run_id>/: the run record of every complete trial
SPEC_ATTR = "carebench_spec"  # the study's user attribute holding its spec
WORKER_ATTR = "worker"  # a trial's user attribute: {host, pid, started} of the process running it
RUN_ATTR = "run_id"  # a trial's user attribute: its run record's id
# TPE: random draws for the first trials, then the model of good vs bad trials.
STARTUP_TRIALS = 5
# Pruning: never before this many finished trials, nor in the first quarter of the epochs.
PRUNER_STARTUP_TRIALS = 3
# Heartbeats: a RUNNING trial silent for GRACE_S seconds is failed and re-queued (any machine).
HEARTBEAT_S = 20
GRACE_S = 120
MAX_RETRY = 3  # a trial killed more often than this is not re-queued again


@dataclass(frozen=True)
class StudySpec:
    """Everything that defines a study's objective; `name` hashes it."""

    model: str
    task: str
    fold: int
    cohort: str
    preset: str
    seed: int
    data: str  # the dataset's path when the study was made (recorded, not part of the identity)
    data_fingerprint: str
    selection_metric: str
    space: dict[str, dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed settings of every trial (key=value)
    pruning: bool = True

    def identity(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("data")
        return out

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()
        return f"{self.model}_{self.task}_f{self.fold}_{digest[:10]}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> StudySpec:
        raw = dict(raw)
        raw.pop("name", None)
        try:
            return cls(**raw)
        except TypeError as e:
            raise TuningError(f"{where}: not a study spec ({e})") from None


# ------------------------------------------------------------------------------------------------ storage
def default_storage(out: str | Path) -> str:
    return f"sqlite:///{(Path(out).absolute() / DEFAULT_DB)}"


def storage_label(url: str) -> str:
    """The URL with its password hidden (for messages and records)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # carebench prints each trial's outcome itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(url: str, option: str = "--storage") -> Any:
    """An Optuna RDB storage with heartbeats and re-queueing of stale trials; an error naming `option` when the
    URL cannot be opened (bad syntax, a missing driver, an unreachable server, a directory that does not
    exist)."""
    import optuna

    _quiet_optuna()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # several workers on one file wait for the lock
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=kwargs,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRY
            ),
        )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TuningError(
            f"{option} {storage_label(url)}: cannot open it as an Optuna database ({type(e).__name__}: {first}); "
            "expected an RDB URL such as sqlite:///path/study.db or postgresql://user@host/db"
        ) from None


# ------------------------------------------------------------------------------------------------ sampling
def _mix(seed: int, number: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "little")


def make_sampler(seed: int) -> Any:
    """`TrialSeededSampler` around TPE (`STARTUP_TRIALS` random draws first)."""
    import optuna

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        """TPE whose random state is re-seeded with (seed, trial number) before each trial.

        TPE keeps no state between trials but its random generator (it re-reads the finished trials from the
        storage), so the parameters of trial n are a function of (seed, n, the trials before it): the same
        whether the study ran in one go or was resumed, and different for trials that run at once on several
        workers (they have different numbers)."""

        def __init__(self) -> None:
            self._inner = self._tpe(0)

        @staticmethod
        def _tpe(number: int) -> Any:
            return optuna.samplers.TPESampler(seed=_mix(seed, number), n_startup_trials=STARTUP_TRIALS)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._inner = self._tpe(trial.number)
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            return self._inner.sample_independent(study, trial, name, dist)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self._inner.reseed_rng()

    return TrialSeededSampler()


def make_pruner(max_epochs: int, pruning: bool) -> Any:
    """Median rule on the best validation value so far, or none."""
    import optuna

    if not pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=max(1, max_epochs // 4), interval_steps=1
    )


def open_study(spec: StudySpec, storage: Any, max_epochs: int, *, create: bool) -> Any:
    """The study of `spec` in `storage` (created when `create`; its stored spec must equal `spec`)."""
    import optuna

    _quiet_optuna()
    sampler, pruner = make_sampler(spec.seed), make_pruner(max_epochs, spec.pruning)
    if create:
        study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    else:
        try:
            study = optuna.load_study(storage=storage, study_name=spec.name, sampler=sampler, pruner=pruner)
        except KeyError:
            raise TuningError(f"study {spec.name}: not found in its storage") from None
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None and create:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
    elif stored is not None and StudySpec.from_dict(stored, spec.name) != dataclasses.replace(
        spec, data=stored.get("data", spec.data)
    ):
        raise TuningError(f"study {spec.name}: its storage holds a study of the same name with another spec")
    return study


# ------------------------------------------------------------------------------------------------ workers
def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def worker_identity() -> dict[str, Any]:
    """{host, pid, started} of this process, recorded in each trial it runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _process_start(pid)}


def _alive(worker: dict[str, Any]) -> bool:
    started = _process_start(int(worker.get("pid", -1)))
    return started is not None and (worker.get("started") is None or abs(started - worker["started"]) < 1e-3)


def retry(study: Any, trial: Any) -> None:
    """Queue a failed trial again with the same parameters (Optuna's `RetryHeartbeatStaleTrialCallback`, which
    also records `failed_trial` and `retry_history`), without the attributes that describe the failed attempt
    (its worker, run record and failure): a queued copy carrying a dead worker would look dead itself."""
    import copy

    import optuna

    t = copy.deepcopy(trial)
    t.user_attrs = {k: v for k, v in t.user_attrs.items() if k not in (WORKER_ATTR, RUN_ATTR, "failure")}
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, t)


def _fail(study: Any, trial: Any, why: str) -> bool:
    """Mark a RUNNING trial failed with the reason `why`; False when it had already finished."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "failure", why)
        return bool(storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process got there first


def recover_dead_trials(study: Any) -> list[int]:
    """Fail and re-queue (same parameters) the RUNNING trials of this host whose process is gone (a killed
    worker); return their numbers. Trials of other hosts are left to the heartbeat rule."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        if not isinstance(worker, dict) or worker.get("host") != host or _alive(worker):
            continue
        if _fail(study, t, "its worker process died (killed mid-way)"):
            retry(study, study._storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed


def requeue(study: Any, number: int, why: str) -> None:
    """Fail trial `number` if it is still running and re-queue it with the same parameters (after an
    interrupt); a trial that ended otherwise (complete, pruned, refused) is left as it is."""
    from optuna.trial import TrialState

    t = study._storage.get_trial(study.trials[number]._trial_id)
    if t.state == TrialState.RUNNING:
        if not _fail(study, t, why):
            return
    elif t.state != TrialState.FAIL or t.user_attrs.get("failure", why) != why:
        return  # it ended otherwise: complete, pruned, or failed for a reason of its own
    retry(study, study._storage.get_trial(t._trial_id))


# ------------------------------------------------------------------------------------------------ the spec file
def write_spec(out: Path, spec: StudySpec, storage: str) -> None:
    """``OUT/study.yaml``: the spec, the study's name and its storage, atomically. The storage is written as
    ``study.db`` when it is the default file beside it (so the directory can move), else as its URL with the
    password hidden."""
    label = DEFAULT_DB if storage == default_storage(out) else storage_label(storage)
    text = yaml.safe_dump({**spec.to_dict(), "storage": label}, sort_keys=False)
    tmp = out / f".{SPEC_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out / SPEC_FILE)


def read_spec(out: str | Path) -> tuple[StudySpec, str]:
    """(spec, storage label) of the study kept in `out` (``OUT/study.yaml``)."""
    path = Path(out) / SPEC_FILE
    if not path.is_file():
        raise TuningError(f"{path}: missing (expected a directory written by `carebench tune --out`)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TuningError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise TuningError(f"{path}: expected the mapping written by `carebench tune`")
    storage = str(raw.pop("storage", ""))
    return StudySpec.from_dict(raw, str(path)), storage


def storage_of(out: str | Path, label: str, given: str | None = None) -> str:
    """The storage URL of the study kept in `out`: `given`, else the default SQLite file in `out` when that is
    what it used, else the recorded URL (which has no password, or it would be hidden)."""
    if given:
        return given
    if label == DEFAULT_DB:
        return default_storage(out)
    if "***" in label:
        raise TuningError(
            f"{Path(out) / SPEC_FILE}: its storage {label} needs a password; give the storage URL"
        )
    return label
