"""A plan's `tuning` section: the studies its runs need, running them, and the runs' tuned hyper-parameters.

Why per method, task, fold and cohort (docs/tuning.md): a study on fold k trains on three folds and validates on
fold k+1; only the runs tested on fold k have seen none of its stays. So every run takes its hyper-parameters from
the study of its own fold (and cohort, task, method and fixed settings), which is a validation-only study: no
trial ever builds a test split. Runs with the same fixed settings share a study (the main grid and the
missing-X-ray grid, every seed).

- `plan_studies(plan, data)`: the spec of every study the plan's runs need (`tuning.runner.prepare_study`), keyed
  by the run settings that select it. A method whose space is empty (every setting fixed) keeps its defaults.
- `run_studies(...)`: with `tuning.trials`, run or continue each study to that many complete trials (in
  `tuning.studies`, default ``RUNS/tuning/<study>/``); without it, find finished studies under `tuning.studies`.
- `TunedHparams`: the lookup `expand_plan` calls for each run: the best trial's values as overrides, and the
  source (study, storage, trial number, validation value) recorded in the run's configuration.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carebench.experiments.plan import Plan, PlanError, run_overrides
from carebench.tuning.runner import best_trial, prepare_study, tune
from carebench.tuning.space import EmptySpaceError, TuningError, as_overrides
from carebench.tuning.study import SPEC_FILE, StudySpec, open_storage, open_study, read_spec, storage_of
from carebench.tuning.worker import base_config, counts

STUDIES_DIR = "tuning"  # RUNS/tuning/<study name>/: the default home of a plan's studies


def _key(model: str, task: str, fold: int, cohort: str, overrides: dict[str, Any]) -> str:
    return json.dumps([model, task, fold, cohort, overrides], sort_keys=True, default=str)


def plan_studies(plan: Plan, data: str | Path) -> dict[str, StudySpec | None]:
    """Run settings -> the spec of the study they need (None: nothing to tune, the defaults are used)."""
    t = plan.tuning
    assert t is not None
    out: dict[str, StudySpec | None] = {}
    for grid in plan.training_grids():
        for model in grid.models:
            overrides = run_overrides(grid, model)
            for task in grid.tasks:
                for fold in grid.folds:
                    for cohort in grid.cohorts:
                        key = _key(model, task, fold, cohort, overrides)
                        if key in out:
                            continue
                        try:
                            out[key] = prepare_study(
                                data=data,
                                model=model,
                                task=task,
                                fold=fold,
                                cohort=cohort,
                                preset=plan.preset,
                                seed=t.seed,
                                overrides=overrides,
                                space=t.spaces.get(model),
                                space_where=f"plan {plan.name!r}: key 'tuning.spaces.{model}'",
                                pruning=t.pruning,
                            )
                        except EmptySpaceError:
                            out[key] = None
                        except TuningError as e:
                            raise PlanError(
                                f"plan {plan.name!r}, tuning of {model!r} on {task!r}: {e}"
                            ) from None
    return out


@dataclass
class Study:
    """A study a plan uses: where it is and its best trial."""

    spec: StudySpec
    out: Path
    storage: str
    complete: int
    best: dict[str, Any] | None

    def record(self) -> dict[str, Any]:
        """Its entry in `RUNS/plan.yaml` (`studies`), read by the analysis."""
        from carebench.tuning.study import storage_label

        return {
            "study": self.spec.name,
            "dir": str(self.out),
            "storage": storage_label(self.storage),
            "model": self.spec.model,
            "task": self.spec.task,
            "fold": self.spec.fold,
            "cohort": self.spec.cohort,
            "complete": self.complete,
            "best_trial": None if self.best is None else self.best["number"],
            "best_value": None if self.best is None else self.best["value"],
        }


def studies_dir(plan: Plan, runs_dir: Path) -> Path:
    t = plan.tuning
    assert t is not None
    return Path(t.studies).absolute() if t.studies else runs_dir / STUDIES_DIR


def _existing(root: Path) -> dict[str, Path]:
    """Study name -> its directory, for every study kept under `root` (or in `root` itself)."""
    found = {}
    for f in [root / SPEC_FILE, *sorted(root.glob(f"*/{SPEC_FILE}"))]:
        if f.is_file():
            with_spec = read_spec(f.parent)[0]
            found.setdefault(with_spec.name, f.parent)
    return found


def _open(spec: StudySpec, out: Path, storage: str | None) -> Study:
    _, label = read_spec(out)
    url = storage_of(out, label, storage)
    study = open_study(spec, open_storage(url, "tuning.storage"), base_config(spec).max_epochs, create=False)
    return Study(spec, out, url, counts(study)["COMPLETE"], best_trial(study))


def run_studies(
    plan: Plan,
    specs: dict[str, StudySpec | None],
    runs_dir: Path,
    *,
    executor: str = "local",
    jobs: int = 1,
    threads: int | None = None,
    address: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Study]:
    """Each distinct study of `specs`, run to `tuning.trials` complete trials (or found finished); by name."""
    t = plan.tuning
    assert t is not None
    root = studies_dir(plan, runs_dir)
    existing = _existing(root) if root.is_dir() else {}
    unique = {s.name: s for s in specs.values() if s is not None}
    out: dict[str, Study] = {}
    for i, (name, spec) in enumerate(unique.items(), 1):
        where = existing.get(name, root / name)
        if t.trials is None:
            if name not in existing:
                raise PlanError(
                    f"plan {plan.name!r}: key 'tuning.studies': no study of {spec.model} on {spec.task}, fold "
                    f"{spec.fold}, {spec.cohort} cohort with this plan's settings under {root} (expected "
                    f"{name}); run `carebench tune` with them, or give tuning.trials"
                )
            study = _open(spec, where, t.storage)
            if study.best is None:
                raise PlanError(f"plan {plan.name!r}: study {name} in {where} has no complete trial")
        else:
            if echo is not None:
                echo(f"study {i}/{len(unique)}: {spec.model} on {spec.task}, fold {spec.fold} ({name})")
            tune(
                data=spec.data,
                model=spec.model,
                task=spec.task,
                out=where,
                trials=t.trials,
                storage=t.storage,
                jobs=jobs,
                threads=threads,
                executor=executor,
                address=address,
                spec=spec,
                echo=echo,
            )
            study = _open(spec, where, t.storage)
            if study.complete < t.trials:
                raise PlanError(
                    f"plan {plan.name!r}: study {name} ended with {study.complete} of {t.trials} complete trials"
                )
        out[name] = study
    return out


class TunedHparams:
    """The `expand_plan` lookup: a run's best-trial values (as overrides) and their source."""

    def __init__(self, specs: dict[str, StudySpec | None], studies: dict[str, Study]) -> None:
        self.specs, self.studies = specs, studies

    def __call__(
        self, model: str, task: str, fold: int, cohort: str, overrides: dict[str, Any]
    ) -> tuple[dict[str, Any], Any] | None:
        spec = self.specs.get(_key(model, task, fold, cohort, overrides))
        if spec is None:
            return None
        study = self.studies[spec.name]
        assert study.best is not None
        from carebench.tuning.study import storage_label

        source = {
            "study": spec.name,
            "storage": storage_label(study.storage),
            "trial": study.best["number"],
            "value": study.best["value"],
        }
        return as_overrides(study.best["params"]), source


def studies_status(
    plan: Plan, data: str | Path, runs_dir: str | Path
) -> tuple[list[str], TunedHparams | None]:
    """For `benchmark --dry-run`: one line per study (its complete trials so far), and the lookup of the runs'
    hyper-parameters when every study is finished (None otherwise: the runs are known only after tuning)."""
    t = plan.tuning
    assert t is not None
    specs = plan_studies(plan, data)
    root = studies_dir(plan, Path(runs_dir).absolute())
    existing = _existing(root) if root.is_dir() else {}
    lines, found = [], {}
    need = t.trials or 1
    for name, spec in {s.name: s for s in specs.values() if s is not None}.items():
        study = _open(spec, existing[name], t.storage) if name in existing else None
        done = study.complete if study is not None else 0
        lines.append(f"study {name}\t{done}/{t.trials or '-'} complete")
        if study is not None and done >= need:
            found[name] = study
    finished = len(found) == len({s.name for s in specs.values() if s is not None})
    return lines, TunedHparams(specs, found) if finished else None
