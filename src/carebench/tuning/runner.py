"""`carebench tune`: an Optuna study of one model on one task and fold, on the validation split only.

What it does (docs/tuning.md):
1. Checks everything before writing anything: the number of trials, the model and task, the fixed settings
   (`key=value`, the same as `carebench train`'s), the search space (the model's declared one or `--space`), the
   dataset and the storage. A bad option is one `error:` line naming it, and nothing is written.
2. Opens (or creates) the study named after its spec in the storage (`--storage URL`, default SQLite in
   ``OUT/study.db``), writes ``OUT/study.yaml``, and runs workers until the study holds `trials` COMPLETE trials:
   one in this process (`--jobs 1`), `--jobs N` local worker processes, or N Ray tasks (`--executor ray`).
   Running the same command again continues the study: finished trials stay as they are, a trial killed mid-way
   is failed and re-run with the same parameters, and nothing runs when the budget is already complete.
3. Returns the summary: trials per state, the best trial (number, validation value, parameters, run record).

No trial ever builds the test split (`TrainConfig.evaluate_test`); the best trial is tested only after its
study, by the analysis (`carebench analyze`) or `carebench evaluate OUT/trials/<run_id>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carebench.tuning.space import TuningError, describe, fixed_keys, model_class, read_space, study_space
from carebench.tuning.study import (
    DEFAULT_DB,
    RUN_ATTR,
    SPEC_FILE,
    TRIALS_DIR,
    StudySpec,
    default_storage,
    open_storage,
    open_study,
    read_spec,
    storage_label,
    write_spec,
)
from carebench.tuning.worker import STORAGE_ENV, base_config, counts, run_worker, worker_command

EXECUTORS = ("local", "ray")
LOGS = "logs"  # OUT/logs/: the output of worker processes that failed


@dataclass
class TuneSummary:
    """How a study stands after `tune`: trials per state, the best trial, what this invocation added."""

    study: str
    storage: str
    out: Path
    trials: int  # the budget: complete trials asked for
    metric: str
    space: str
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    new: int = 0  # trials that ended during this invocation
    best: dict[str, Any] | None = None  # number, value, params, run_id
    seconds: float = 0.0
    jobs: int = 1
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.interrupted and self.complete >= self.trials


def prepare_study(
    *,
    data: str | Path,
    model: str,
    task: str,
    fold: int = 1,
    cohort: str = "base",
    preset: str = "quick",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    space_file: str | Path | None = None,
    space: dict[str, Any] | None = None,
    space_where: str = "",
    pruning: bool = True,
) -> StudySpec:
    """The spec of a study, every setting checked (errors name the option); reads the dataset's manifest only.

    The space: `space_file` (`--space`), else `space` (a plan's `tuning.spaces`, named `space_where` in errors),
    else the model's declared search space."""
    from carebench.training.config import data_fingerprint, dataset_task

    model_class(model)
    data_fingerprint(data)  # an error naming --data first
    selection = dataset_task(data, task).selection_metric
    overrides = dict(overrides or {})
    for key in ("threads", "progress", "num_workers"):
        overrides.pop(key, None)  # per process, not part of a study
    spec = StudySpec(
        model=model,
        task=task,
        fold=fold,
        cohort=cohort,
        preset=preset,
        seed=seed,
        data=str(Path(data).absolute()),
        data_fingerprint="",
        selection_metric=selection,
        space=study_space(
            model,
            read_space(space_file) if space_file is not None else space,
            fixed_keys(overrides),
            f"--space {space_file}" if space_file is not None else space_where,
        ),
        overrides=overrides,
        pruning=pruning,
    )
    cfg = base_config(spec)  # the fixed settings, the preset, fold, cohort and the dataset, checked
    if cfg.devices != 1:
        raise TuningError(
            f"devices={cfg.devices}: a trial runs on one device; start more workers (--jobs) to use more"
        )
    return dataclasses.replace(spec, data_fingerprint=cfg.data_fingerprint)


def _check_out(out: Path, spec: StudySpec, storage: str | None) -> None:
    """`out` may be new, or hold this very study in this very storage (the command is being re-run)."""
    if out.exists() and not out.is_dir():
        raise TuningError(f"--out {out}: exists and is not a directory")
    if (out / SPEC_FILE).is_file():
        held, label = read_spec(out)
        if held.name != spec.name:
            raise TuningError(
                f"--out {out}: holds study {held.name} ({held.model}, {held.task}, fold {held.fold}), not this "
                f"command's study {spec.name}; use another --out directory"
            )
        now = DEFAULT_DB if storage is None else storage_label(storage)
        if label != now:
            raise TuningError(
                f"--storage: the study in --out {out} lives in {label}, not {now}; give the same --storage "
                "to continue it, or another --out for a new study"
            )


def best_trial(study: Any) -> dict[str, Any] | None:
    """The complete trial with the highest validation value (the earliest among equals), or None."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    t = max(done, key=lambda t: (t.value, -t.number))
    return {
        "number": t.number,
        "value": t.value,
        "params": dict(t.params),
        "run_id": t.user_attrs.get(RUN_ATTR),
    }


def _summary(study: Any, base: TuneSummary) -> TuneSummary:
    n = counts(study)
    base.complete, base.pruned, base.failed = n["COMPLETE"], n["PRUNED"], n["FAIL"]
    base.running = n["RUNNING"] + n["WAITING"]
    base.best = best_trial(study)
    return base


def trial_line(t: Any, metric: str) -> str:
    """One line per finished trial for the console."""
    params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
    secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else 0.0
    if t.state.name == "COMPLETE":
        what = f"complete  val {metric} {t.value:.4f}"
    elif t.state.name == "PRUNED":
        what = f"pruned at epoch {t.last_step}" if t.last_step is not None else "pruned"
    else:
        what = f"failed ({t.user_attrs.get('failure', 'see the log')})"
    return f"trial {t.number:>3}  {what}  {secs:.0f} s  {params}"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def tune(
    *,
    data: str | Path,
    model: str,
    task: str,
    out: str | Path,
    trials: int,
    fold: int = 1,
    cohort: str = "base",
    preset: str = "quick",
    seed: int = 0,
    storage: str | None = None,
    space_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    pruning: bool = True,
    jobs: int = 1,
    threads: int | None = None,
    executor: str = "local",
    address: str | None = None,
    spec: StudySpec | None = None,
    echo: Callable[[str], None] | None = None,
) -> TuneSummary:
    """Run (or continue) the study until it holds `trials` complete trials; return its summary.

    `spec` (from `prepare_study`) skips building it again (the benchmark prepares every study of a plan before
    running any). `echo` receives one line per finished trial.
    """
    t0 = time.perf_counter()
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise TuningError(
            f"--trials must be >= 1 (the number of complete trials the study holds), got {trials!r}"
        )
    if jobs < 1:
        raise TuningError(f"--jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise TuningError(f"--threads must be >= 1, got {threads}")
    if executor not in EXECUTORS:
        raise TuningError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if spec is None:
        spec = prepare_study(
            data=data,
            model=model,
            task=task,
            fold=fold,
            cohort=cohort,
            preset=preset,
            seed=seed,
            overrides=overrides,
            space_file=space_file,
            pruning=pruning,
        )
    out = Path(out).absolute()
    _check_out(out, spec, storage)
    store = open_storage(storage) if storage else None  # a bad URL is refused before anything is written
    ray = None
    if executor == "ray":
        from carebench.experiments.executors import import_ray

        ray = import_ray()
    url = storage or default_storage(out)
    out.mkdir(parents=True, exist_ok=True)
    if store is None:
        store = open_storage(url)
    study = open_study(spec, store, base_config(spec).max_epochs, create=True)
    write_spec(out, spec, url)
    summary = TuneSummary(
        spec.name, storage_label(url), out, trials, spec.selection_metric, describe(spec.space), jobs=jobs
    )
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    first = set(seen)

    def watch() -> None:
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in seen:
                seen.add(t.number)
                if echo is not None:
                    echo(trial_line(t, spec.selection_metric))

    try:
        if counts(study)["COMPLETE"] < trials:
            if executor == "local" and jobs == 1:
                run_worker(spec, url, trials, out, threads=threads or 0, on_trial=lambda _: watch())
            elif executor == "local":
                summary.errors += _local_workers(out, url, trials, jobs, threads, watch)
            else:
                summary.errors += _ray_workers(ray, spec, out, url, trials, jobs, threads, address, watch)
    except KeyboardInterrupt:
        summary.interrupted = True  # the running trials were failed and re-queued: the next run re-runs them
    watch()
    summary.new = len(seen - first)
    summary.seconds = time.perf_counter() - t0
    return _summary(study, summary)


def _cores() -> int:
    from carebench.experiments.executors import available_cores

    return available_cores()


def _local_workers(
    out: Path, url: str, trials: int, jobs: int, threads: int | None, watch: Callable[[], None]
) -> list[str]:
    """`jobs` worker processes on one study; returns the errors of those that failed (their logs kept)."""
    threads = threads or max(1, _cores() // jobs)
    env = {**os.environ, STORAGE_ENV: url, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    logs = out / LOGS
    logs.mkdir(exist_ok=True)
    procs = []
    for i in range(jobs):
        log = logs / f"worker-{os.getpid()}-{i}.log"
        with open(log, "wb") as fh:
            procs.append(
                (subprocess.Popen(worker_command(out, trials, threads), stdout=fh, stderr=fh, env=env), log)
            )
    errors = []
    try:
        while any(p.poll() is None for p, _ in procs):
            time.sleep(1.0)
            watch()
    except KeyboardInterrupt:
        for p, _ in procs:  # each worker re-queues its running trial, then exits
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGINT)
        for p, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        raise
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for p, log in procs:
        if p.returncode == 0:
            log.unlink(missing_ok=True)
        else:
            last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            errors.append(f"worker exited with code {p.returncode}: {last} (log: {log})")
    with contextlib.suppress(OSError):
        logs.rmdir()  # only when empty
    return errors


def _ray_workers(
    ray: Any,
    spec: StudySpec,
    out: Path,
    url: str,
    trials: int,
    jobs: int,
    threads: int | None,
    address: str | None,
    watch: Callable[[], None],
) -> list[str]:
    """`jobs` workers as Ray tasks (`num_cpus = threads`); connects to `address` (or RAY_ADDRESS) or starts a
    local Ray instance, or uses the one already initialised."""
    from carebench.tuning.worker import ray_worker

    owns = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        owns = True
    threads = threads or max(1, int(ray.cluster_resources().get("CPU", 1)) // jobs)
    task = ray.remote(ray_worker)
    refs = [
        task.options(num_cpus=threads, max_retries=0).remote(spec.to_dict(), url, trials, str(out), threads)
        for _ in range(jobs)
    ]
    errors = []
    try:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            watch()
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:
                    errors.append(
                        f"Ray worker failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                    )
    finally:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if owns:
            ray.shutdown()
    return errors


def print_summary(summary: TuneSummary, console: Any) -> None:
    """The study's trials per state and its best trial."""
    from rich.table import Table

    table = Table(title=f"study {summary.study}: {summary.storage}", title_justify="left")
    for col in ("trials asked", "complete", "pruned", "failed", "running/queued", "ended now", "wall time"):
        table.add_column(col, justify="right")
    s = round(summary.seconds)
    table.add_row(
        str(summary.trials),
        str(summary.complete),
        str(summary.pruned),
        str(summary.failed),
        str(summary.running),
        str(summary.new),
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}",
    )
    console.print(table)
    console.print(f"search space: {summary.space}", highlight=False)
    if summary.best is not None:
        b = summary.best
        params = ", ".join(f"{k}={_short(v)}" for k, v in b["params"].items())
        console.print(
            f"best: trial {b['number']}, validation {summary.metric} {b['value']:.4f}; {params}\n"
            f"      run record: {summary.out / TRIALS_DIR / str(b['run_id'])}",
            highlight=False,
        )
    for e in summary.errors:
        console.print(f"[red]error[/] {e}", highlight=False)
    if summary.interrupted:
        console.print("interrupted: run the same command again to resume the study", highlight=False)
