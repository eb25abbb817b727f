"""One tuning worker: run trials of a study until it holds the asked number of complete trials.

Any number of workers (processes on this machine, Ray tasks, or the same command started on other machines) may
run on one study at once; they coordinate only through its storage:

- A worker starts a trial only while ``complete + running < trials``; when the rest are running elsewhere it
  waits for them, and takes over if one of them ends pruned or failed. The rare race of two workers starting the
  last trial at once is settled by trial number: the later one is failed at once as over budget (marked so) and
  never trained. So ``--trials N`` ends with exactly N complete trials.
- Each trial is a validation-only run (`TrainConfig.evaluate_test` false: its fold is built without the test
  split) written as a normal run record under ``OUT/trials/<run_id>/``, with the study and the trial number in
  its configuration (`hparams_source`). The trial's value is the run's best validation value of the task's
  selection metric; it is reported to the study after every epoch of the model's last stage for pruning.
- A trial whose configuration is refused (a parameter combination the model or the training cannot take) is
  failed with the reason and the study goes on; five in a row stop the worker. Any other error stops it.
- A killed trial (SIGKILL, a lost machine) is failed and re-queued with the same parameters by the next worker
  to look (`study.recover_dead_trials`, heartbeats); an interrupted one (Ctrl-C, SIGINT) is failed and
  re-queued at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carebench import atomic, runs
from carebench.errors import UserError
from carebench.tuning.space import TuningError, as_overrides, suggest
from carebench.tuning.study import (
    RUN_ATTR,
    TRIALS_DIR,
    WORKER_ATTR,
    StudySpec,
    open_storage,
    open_study,
    read_spec,
    recover_dead_trials,
    requeue,
    storage_label,
    worker_identity,
)

POLL_S = 2.0  # how often a waiting worker looks at the study again
MAX_INVALID = 5  # refused configurations in a row before a worker gives up
STORAGE_ENV = "CAREBENCH_TUNE_STORAGE"  # how a worker process gets the storage URL (not on its command line)
INTERRUPTED = "interrupted"  # the failure of a trial stopped by Ctrl-C (re-queued at once)
WRITE_FAILED = (
    "its run record could not be written (disk full or read-only)"  # re-queued, then the study stops
)


class OverBudget(Exception):
    """Another worker started the last trial of the budget at the same moment: this trial is not run."""


class InvalidTrial(Exception):
    """The trial's parameters make a configuration the model or the training refuses."""


@dataclass
class WorkerResult:
    started: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0


def base_config(spec: StudySpec, threads: int = 0, params: dict[str, Any] | None = None) -> Any:
    """The resolved configuration of a trial of `spec` with `params` (none: the fixed settings only)."""
    from carebench.training.config import resolve_config

    options = {
        "cohort": spec.cohort,
        "fold": spec.fold,
        "seed": spec.seed,
        "progress": False,
        "threads": threads,
    }
    return resolve_config(
        data=spec.data,
        model=spec.model,
        task=spec.task,
        preset=spec.preset,
        options=options,
        overrides={**spec.overrides, **as_overrides(params or {})},
    )


def trial_config(spec: StudySpec, params: dict[str, Any], number: int, storage: str, threads: int = 0) -> Any:
    """A trial's run configuration: validation only, its source the study's trial `number`."""
    cfg = base_config(spec, threads, params)
    source = {"study": spec.name, "storage": storage_label(storage), "trial": number}
    return dataclasses.replace(cfg, evaluate_test=False, hparams_source=source)


def counts(study: Any) -> dict[str, int]:
    """Trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    from optuna.trial import TrialState

    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def _within_budget(study: Any, number: int, trials: int) -> bool:
    from optuna.trial import TrialState

    active = sorted(
        t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    )
    return number in active and active.index(number) < trials


def run_worker(
    spec: StudySpec,
    storage_url: str,
    trials: int,
    out: str | Path,
    *,
    threads: int = 0,
    on_trial: Callable[[Any], None] | None = None,
) -> WorkerResult:
    """Run trials of `spec`'s study until it holds `trials` complete trials; records go to ``OUT/trials/``."""
    import optuna
    import torch
    from optuna.trial import TrialState

    from carebench.data.store import dataset_fingerprint, open_dataset
    from carebench.training.run import train_run

    if threads:
        torch.set_num_threads(threads)
    storage = open_storage(storage_url)
    max_epochs = base_config(spec).max_epochs
    study = open_study(spec, storage, max_epochs, create=False)
    trials_dir = Path(out).absolute() / TRIALS_DIR
    trials_dir.mkdir(parents=True, exist_ok=True)
    runs.clean_partials(trials_dir)
    data = open_dataset(spec.data)
    runs.check_dataset(
        spec.data_fingerprint, spec.data, dataset_fingerprint(spec.data), f"study {spec.name} was"
    )
    result = WorkerResult()
    current: dict[str, Any] = {}

    def objective(trial: Any) -> float:
        current["number"] = trial.number
        trial.set_user_attr(WORKER_ATTR, worker_identity())
        try:
            return run_trial(trial)
        except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C during fit into SystemExit(1)
            trial.set_user_attr("failure", INTERRUPTED)
            raise KeyboardInterrupt from None
        except atomic.OutputError:  # not the trial's fault: no other trial can be written either
            trial.set_user_attr("failure", WRITE_FAILED)
            raise

    def run_trial(trial: Any) -> float:
        if not _within_budget(study, trial.number, trials):
            trial.set_user_attr(
                "failure", "over budget: another worker started the last trial at the same time"
            )
            raise OverBudget(f"trial {trial.number}: the budget of {trials} trials is taken")
        params = suggest(trial, spec.space)
        try:
            cfg = trial_config(spec, params, trial.number, storage_url, threads)
        except UserError as e:
            trial.set_user_attr("failure", str(e))
            raise InvalidTrial(str(e)) from None
        trial.set_user_attr(RUN_ATTR, cfg.run_id)

        def report(epoch: int, best: float) -> None:
            trial.report(best, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: best validation {spec.selection_metric} {best:.4f}")

        with runs.run_lock(trials_dir, cfg.run_id):
            if runs.is_done(trials_dir, cfg.run_id):  # the same configuration as an earlier trial: its record
                metrics = runs.read_metrics(trials_dir / cfg.run_id)
            else:
                try:
                    metrics = train_run(cfg, trials_dir, data=data, on_validation=report).metrics
                except atomic.OutputError:
                    raise
                except UserError as e:
                    trial.set_user_attr("failure", str(e))
                    raise InvalidTrial(str(e)) from None
                finally:
                    shutil.rmtree(runs.partial_dir(trials_dir, cfg.run_id), ignore_errors=True)
        value = metrics.get("val_best")
        if value is None:
            trial.set_user_attr("failure", "no finite validation metric (the training diverged)")
            raise InvalidTrial(f"trial {trial.number}: no finite validation {spec.selection_metric}")
        trial.set_user_attr("best_epoch", metrics.get("best_epoch"))
        trial.set_user_attr("epochs_trained", metrics.get("epochs_trained"))
        return float(value)

    invalid = 0
    while True:
        recover_dead_trials(study)
        optuna.storages.fail_stale_trials(study)
        n = counts(study)
        if n["COMPLETE"] >= trials:
            return result
        if n["COMPLETE"] + n["RUNNING"] >= trials:
            time.sleep(POLL_S)  # the last trials run elsewhere: wait, take over if one ends pruned or failed
            continue
        current.clear()
        try:
            study.optimize(objective, n_trials=1, catch=(OverBudget, InvalidTrial))
        except (KeyboardInterrupt, SystemExit):
            if "number" in current:
                requeue(study, current["number"], INTERRUPTED)
            raise KeyboardInterrupt from None
        except atomic.OutputError:
            if "number" in current:
                requeue(study, current["number"], WRITE_FAILED)
            raise
        if "number" not in current:
            continue
        frozen = study.trials[current["number"]]
        result.started += 1
        if frozen.state == TrialState.COMPLETE:
            result.complete += 1
            invalid = 0
        elif frozen.state == TrialState.PRUNED:
            result.pruned += 1
            invalid = 0
        elif frozen.user_attrs.get("failure", "").startswith("over budget"):
            result.started -= 1
        else:
            result.failed += 1
            invalid += 1
            if invalid >= MAX_INVALID:
                raise TuningError(
                    f"study {spec.name}: {invalid} trials in a row were refused; the last: "
                    f"{frozen.user_attrs.get('failure', 'no reason recorded')}"
                )
        if on_trial is not None:
            on_trial(frozen)


# --------------------------------------------------------------------------------------------- processes
def worker_command(out: Path, trials: int, threads: int) -> list[str]:
    """The command line of a local worker process (the storage URL goes in `STORAGE_ENV`)."""
    return [
        sys.executable,
        "-m",
        "carebench.tuning.worker",
        "--out",
        str(out),
        "--trials",
        str(trials),
        "--threads",
        str(threads),
        "--parent",
        str(os.getpid()),
    ]


def main(argv: list[str] | None = None) -> None:
    """A local worker process: the study kept in --out (its spec in study.yaml), storage from the environment."""
    from carebench.experiments.executors import die_with_parent

    ap = argparse.ArgumentParser(prog="carebench-tune-worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--trials", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--parent", type=int, required=True)
    args = ap.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec, _ = read_spec(args.out)
    try:
        run_worker(spec, os.environ[STORAGE_ENV], args.trials, args.out, threads=args.threads)
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def ray_worker(spec: dict[str, Any], storage_url: str, trials: int, out: str, threads: int) -> dict[str, int]:
    """A worker as a Ray task (module level: Ray pickles it by reference)."""
    res = run_worker(StudySpec.from_dict(spec, "ray task"), storage_url, trials, out, threads=threads)
    return dataclasses.asdict(res)


if __name__ == "__main__":
    main()
