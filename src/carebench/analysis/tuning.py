"""The `tuning` table: per study a benchmark's runs took their hyper-parameters from, what was searched, how many
trials, the best parameters, and the validation-vs-test gap of the best trial.

Why the test figure is computed here and only here: a study never builds a test split (its trials are
validation-only runs), so its choice cannot depend on the test stays. Once the study is finished, the analysis
tests the best trial's checkpoint (`training.run.evaluate_run`, which builds the fold with its test split) to
show how optimistic the best validation value is: gap = validation - test. Nothing reads this figure back into
any choice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from carebench.errors import UserError

TUNING_COLUMNS = [
    "method",
    "task",
    "fold",
    "cohort",
    "study",
    "space",
    "n_trials",
    "n_complete",
    "n_pruned",
    "n_failed",
    "best_trial",
    "best_params",
    "metric",
    "val",
    "test",
    "gap",
    "run_id",
]


def tuning_table(
    plan: dict[str, Any] | None,
    data_root: str | Path,
    *,
    device: str = "cpu",
    warn: Callable[[str], None] = lambda _: None,
    tick: Callable[[], None] = lambda: None,
) -> pd.DataFrame:
    """One row per study listed in the runs' `plan.yaml` (`studies`, written by a benchmark with `tuning`)."""
    from carebench.training.run import evaluate_run
    from carebench.tuning.runner import best_trial
    from carebench.tuning.space import describe
    from carebench.tuning.study import TRIALS_DIR, open_storage, open_study, read_spec, storage_of
    from carebench.tuning.worker import base_config, counts

    studies = (plan or {}).get("studies") or []
    storage = ((plan or {}).get("tuning") or {}).get("storage")
    rows = []
    for entry in studies:
        out = Path(entry["dir"])
        try:
            spec, label = read_spec(out)
            store = open_storage(storage_of(out, label, storage), "tuning.storage")
            study = open_study(spec, store, base_config(spec).max_epochs, create=False)
        except UserError as e:
            warn(f"study {entry.get('study')} left out of the tuning table: {e}")
            tick()
            continue
        n = counts(study)
        best = best_trial(study)
        row: dict[str, Any] = {
            "method": spec.model,
            "task": spec.task,
            "fold": spec.fold,
            "cohort": spec.cohort,
            "study": spec.name,
            "space": describe(spec.space),
            "n_trials": sum(n.values()),
            "n_complete": n["COMPLETE"],
            "n_pruned": n["PRUNED"],
            "n_failed": n["FAIL"],
            "metric": spec.selection_metric,
        }
        if best is not None:
            run_dir = out / TRIALS_DIR / str(best["run_id"])
            test = evaluate_run(run_dir, data_root, accelerator="gpu" if device.startswith("cuda") else "cpu")
            row.update(
                best_trial=best["number"],
                best_params=json.dumps(best["params"], sort_keys=True),
                val=best["value"],
                test=test.get(spec.selection_metric),
                run_id=best["run_id"],
            )
            row["gap"] = row["val"] - row["test"] if row["test"] is not None else None
        rows.append(row)
        tick()
    return pd.DataFrame(rows, columns=TUNING_COLUMNS)
