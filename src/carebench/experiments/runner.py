"""The benchmark runner: a plan's runs, minus the finished ones, through an executor, with progress and an index.

Why it is shaped this way (docs/benchmark.md, "Resume"):
- The runs are keyed by the hash of their resolved configuration, so "what is left to do" is simply the runs
  without a finished record (`runs.is_done`). Those are counted as skipped and never launched. Nothing else is remembered
  between invocations, so a benchmark killed at any moment (even SIGKILL) is resumed by running the same command.
- `train_run` builds each record in `RUNS/.<run_id>.partial/` and renames it into place with its finish marker written last;
  partial directories left by a killed process are deleted here, at start, unless a live process holds that
  run's lock (`runs.clean_partials`). One benchmark at a time may use a runs directory
  (`RUNS/.locks/benchmark.lock`).
- `RUNS/plan.yaml` (the resolved plan) and `RUNS/runs.csv` (one row per planned run with its status) are the
  entry points of the analysis. The index is rewritten atomically (temporary file, rename) after every run, so it
  is always complete and consistent with the run directories at the time it was written.
- A failed run does not stop the others: its log goes to `RUNS/failed/<run_id>.log`, the summary lists it and
  the command exits non-zero. Re-running the command retries exactly the failed and unfinished runs.
- A plan with `tuning` first runs (or continues, or finds) the validation-only study of every method, task, fold
  and cohort (`experiments.tuned`), then expands its runs with each study's best trial. The studies are resumable
  like the runs, so a re-started benchmark continues where it stopped, in the studies or in the grid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from carebench import atomic, runs
from carebench.errors import UserError
from carebench.experiments.executors import LOGS, Event, Outcome, Started, make_executor
from carebench.experiments.plan import Plan, expand_plan, plan_record
from carebench.experiments.tuned import TunedHparams, plan_studies, run_studies
from carebench.training.config import TrainConfig, data_fingerprint

INDEX_COLUMNS = (
    "run_id",
    "model",
    "task",
    "cohort",
    "fold",
    "seed",
    "cxr_dropout_train",
    "cxr_dropout_val",
    "preset",
    "status",
    "error",
)


class BenchmarkBusyError(UserError, RuntimeError):
    """Another `carebench benchmark` is running on the same runs directory."""


@dataclass
class BenchmarkSummary:
    plan: str
    runs_dir: Path
    planned: int
    skipped: int = 0  # already finished when the benchmark started
    done: int = 0  # finished by this invocation
    failed: list[Outcome] = field(default_factory=list)
    not_run: int = 0  # left pending (interrupted)
    seconds: float = 0.0
    interrupted: bool = False
    jobs: int = 1
    threads: int = 1
    executor: str = "local"

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and self.not_run == 0


# ------------------------------------------------------------------------------------------------ files
def _write_atomic(path: Path, text: str) -> None:
    atomic.write_text(path, text)  # a temporary sibling renamed into place; a full disk keeps the old file


def write_index(
    runs_dir: Path, configs: list[TrainConfig], status: dict[str, str], errors: dict[str, str]
) -> None:
    """`RUNS/runs.csv`: one row per planned run, in plan order (rewritten atomically)."""
    rows = [
        {
            "run_id": c.run_id,
            "model": c.model,
            "task": c.task,
            "cohort": c.cohort,
            "fold": c.fold,
            "seed": c.seed,
            "cxr_dropout_train": c.cxr_dropout_train,
            "cxr_dropout_val": c.cxr_dropout_val,
            "preset": c.preset,
            "status": status[c.run_id],
            "error": errors.get(c.run_id, ""),
        }
        for c in configs
    ]
    _write_atomic(runs_dir / runs.INDEX, pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).to_csv(index=False))


def read_index(runs_dir: str | Path) -> pd.DataFrame:
    """The index of a runs directory (for the analysis): columns `INDEX_COLUMNS`, `error` as strings."""
    path = Path(runs_dir) / runs.INDEX
    if not path.is_file():
        raise UserError(f"{path}: missing (expected a runs directory written by `carebench benchmark`)")
    return pd.read_csv(path, dtype={"run_id": str, "error": str}, keep_default_na=False)


# ------------------------------------------------------------------------------------------------ progress
class EtaEstimator:
    """Remaining wall time from the durations of the runs finished so far.

    A pending run is expected to take the mean duration of the finished runs of the same model (the models differ
    by an order of magnitude), or of all finished runs before its model has finished one; a running run the
    remainder of that. The total work is shared by the `jobs` parallel slots. Thread-safe: the progress bar reads
    it from its refresh thread.
    """

    def __init__(self, models: dict[str, str], jobs: int) -> None:
        self._model = models  # run_id -> model
        self._pending = set(models)
        self._running: dict[str, float] = {}
        self._durations: dict[str, list[float]] = defaultdict(list)
        self._jobs = max(1, jobs)
        self._lock = threading.Lock()

    def started(self, run_id: str) -> None:
        with self._lock:
            self._pending.discard(run_id)
            self._running[run_id] = time.perf_counter()

    def finished(self, run_id: str, seconds: float) -> None:
        with self._lock:
            self._running.pop(run_id, None)
            self._pending.discard(run_id)
            self._durations[self._model[run_id]].append(seconds)

    def seconds(self) -> float | None:
        with self._lock:
            every = [d for ds in self._durations.values() for d in ds]
            if not every:
                return None
            overall = sum(every) / len(every)

            def expected(run_id: str) -> float:
                ds = self._durations.get(self._model[run_id])
                return sum(ds) / len(ds) if ds else overall

            now = time.perf_counter()
            work = sum(expected(r) for r in self._pending)
            work += sum(max(0.0, expected(r) - (now - t0)) for r, t0 in self._running.items())
            slots = min(self._jobs, len(self._pending) + len(self._running)) or 1
            return work / slots


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _EtaColumn(ProgressColumn):
    def __init__(self, eta: EtaEstimator) -> None:
        super().__init__()
        self.eta = eta

    def render(self, task) -> Text:
        s = None if task.finished else self.eta.seconds()
        if s is None:
            return Text("ETA -:--:--" if not task.finished else "", style="progress.remaining")
        return Text(f"ETA {_hms(s)}", style="progress.remaining")


# ------------------------------------------------------------------------------------------------ runner
def run_benchmark(
    plan: Plan,
    data: str | Path,
    out: str | Path,
    *,
    executor: str = "local",
    jobs: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    console: Console | None = None,
) -> BenchmarkSummary:
    """Expand `plan` on `data`, skip finished runs, run the rest with the executor; return the summary.

    Everything that can be checked is checked before the first run starts: the plan, every run's configuration,
    the dataset, the executor (e.g. Ray installed), and that no other benchmark uses `out`.
    """
    console = console or Console(stderr=True)
    runs_dir = Path(out).absolute()
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory (expected a runs directory)")
    data_fingerprint(data)  # an error naming --data before the plan is expanded run by run
    configs = expand_plan(plan, data)  # every run's settings checked (with default hyper-parameters) first
    specs = plan_studies(plan, data) if plan.tuning is not None else None
    ex = make_executor(executor, jobs, threads, address)
    atomic.make_parents(runs_dir / runs.INDEX, "--out")
    t0 = time.perf_counter()
    with runs.run_lock(runs_dir, "benchmark", blocking=False) as free:
        if not free:
            raise BenchmarkBusyError(f"--out {runs_dir}: another `carebench benchmark` is running on it")
        studies = None
        if specs is not None:
            found = run_studies(
                plan,
                specs,
                runs_dir,
                executor=executor,
                jobs=jobs or 1,
                threads=threads,
                address=address,
                echo=lambda line: console.print(line, highlight=False),
            )
            configs = expand_plan(plan, data, TunedHparams(specs, found))
            studies = [s.record() for s in found.values()]
        _write_atomic(
            runs_dir / runs.PLAN_FILE, yaml.safe_dump(plan_record(plan, configs, studies), sort_keys=False)
        )
        shutil.rmtree(runs_dir / LOGS, ignore_errors=True)  # logs of a killed earlier invocation
        cleaned = runs.clean_partials(runs_dir)
        status = {c.run_id: "done" if runs.is_done(runs_dir, c.run_id) else "pending" for c in configs}
        errors: dict[str, str] = {}
        todo = [c for c in configs if status[c.run_id] == "pending"]
        summary = BenchmarkSummary(
            plan.name, runs_dir, len(configs), skipped=len(configs) - len(todo), executor=ex.name
        )
        write_index(runs_dir, configs, status, errors)
        if cleaned:
            console.print(
                f"removed {len(cleaned)} unfinished run "
                f"director{'ies' if len(cleaned) > 1 else 'y'} of an interrupted benchmark"
            )
        if todo:
            ex.start()
        summary.jobs, summary.threads = ex.jobs, ex.threads
        console.print(
            f"[bold]{plan.name}[/]: {len(configs)} runs planned, {summary.skipped} already done, "
            f"{len(todo)} to run ({ex.name} executor, {ex.jobs} at a time, {ex.threads} "
            f"thread{'s' if ex.threads > 1 else ''} each)",
            highlight=False,
        )
        eta = EtaEstimator({c.run_id: c.model for c in todo}, ex.jobs)
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            _EtaColumn(eta),
            console=console,
            transient=False,
        )
        events = ex.execute(todo, runs_dir) if todo else _no_events()
        try:
            with progress:
                bar = progress.add_task(plan.name, total=len(todo))
                for event in events:
                    if isinstance(event, Started):
                        eta.started(event.run_id)
                        continue
                    o = _record(event.outcome, runs_dir, status, errors)
                    eta.finished(o.run_id, o.seconds)
                    if o.ok:
                        summary.done += 1
                        progress.console.print(
                            f"[green]done[/]   {o.run_id}  {o.seconds:.0f} s", highlight=False
                        )
                    else:
                        summary.failed.append(o)
                        progress.console.print(
                            f"[red]failed[/] {o.run_id}  {o.error}  (log: {o.log})", highlight=False
                        )
                    write_index(runs_dir, configs, status, errors)
                    progress.update(
                        bar,
                        advance=1,
                        description=f"{plan.name}"
                        + (f" ({len(summary.failed)} failed)" if summary.failed else ""),
                    )
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            events.close()  # stops the workers (and so releases their runs' locks)
            runs.clean_partials(runs_dir)  # runs cut short by an interrupt
            with contextlib.suppress(
                atomic.OutputError
            ):  # a full disk: the error that got here is the one to show
                write_index(runs_dir, configs, status, errors)
        summary.not_run = sum(1 for s in status.values() if s == "pending")
        summary.seconds = time.perf_counter() - t0
        logs = runs_dir / LOGS
        if logs.is_dir() and not any(logs.iterdir()):
            logs.rmdir()
    return summary


def _no_events() -> Iterator[Event]:
    yield from ()


def _record(o: Outcome, runs_dir: Path, status: dict[str, str], errors: dict[str, str]) -> Outcome:
    """Book one finished run: status and error in the index, the log kept under failed/ or deleted."""
    if o.ok and not runs.is_done(runs_dir, o.run_id):
        o.ok, o.error = False, "the worker reported success but the run record is not finished"
    failed_log = runs_dir / runs.FAILED / f"{o.run_id}.log"
    if o.ok:
        status[o.run_id] = "done"
        errors.pop(o.run_id, None)
        failed_log.unlink(missing_ok=True)
        if o.log is not None:
            o.log.unlink(missing_ok=True)
    else:
        status[o.run_id] = "failed"
        errors[o.run_id] = o.error
        failed_log.parent.mkdir(exist_ok=True)
        if o.log is not None and o.log.is_file():
            os.replace(o.log, failed_log)
        else:
            failed_log.write_text(o.error + "\n")
        o.log = failed_log
    return o


def print_summary(summary: BenchmarkSummary, console: Console) -> None:
    """Final table: planned, skipped, done, failed, not run, wall time; then the failed runs and their logs."""
    table = Table(title=f"benchmark {summary.plan}: {summary.runs_dir}", title_justify="left")
    for col in ("planned", "skipped (already done)", "done now", "failed", "not run", "wall time"):
        table.add_column(col, justify="right")
    table.add_row(
        str(summary.planned),
        str(summary.skipped),
        str(summary.done),
        str(len(summary.failed)),
        str(summary.not_run),
        _hms(summary.seconds),
    )
    console.print(table)
    for o in summary.failed:
        console.print(f"[red]failed[/] {o.run_id}: {o.error}\n       log: {o.log}", highlight=False)
    if summary.interrupted:
        console.print("interrupted: run the same command again to resume", highlight=False)
    elif summary.failed:
        console.print("run the same command again to retry the failed runs", highlight=False)


__all__ = [
    "INDEX_COLUMNS",
    "BenchmarkSummary",
    "EtaEstimator",
    "print_summary",
    "read_index",
    "run_benchmark",
    "write_index",
]
