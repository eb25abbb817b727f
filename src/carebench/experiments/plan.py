"""Experiment plans: a YAML grid of runs, validated early, expanded into the resolved `TrainConfig` of every run.

Why a plan file rather than a loop in a shell script: the grid (methods x tasks x cohorts x folds x seeds, the
missing-modality settings, the options of the analysis) is itself a result-defining record. It is validated as a
whole before any run starts (a typo in the 900th run must not surface after a day of training), written next to
the runs (`RUNS/plan.yaml`), and expanded deterministically: the same plan and dataset always give the same runs
in the same order, each identified by the hash of its resolved configuration (`TrainConfig.run_id`), so a
re-started benchmark finds exactly the runs it already finished. Every run is resolved by
`training.config.resolve_config`, the same function `carebench train` uses, so a run of a plan and the same run
trained by hand are one and the same run.

Schema (docs/benchmark.md): name, description, preset, models ("all" or names), tasks, cohorts, folds, seeds,
overrides (every run), model_overrides (per model), grids (optional list of sub-grids that inherit the keys above),
missingness {train_rates, test_rates, models, tasks, cohorts, folds, seeds}, fairness {enabled, attributes},
statistics {n_bootstrap, n_permutations, confidence, seed, label_groups}, tuning {trials, fold, seed, pruning,
storage, studies, spaces} (docs/tuning.md: the runs use the best trial of a validation-only study per method,
task, fold and cohort). The defaults of the analysis sections
are those of the dataclasses that own them (`StatisticsOptions`, `FairnessOptions`, `Missingness`), the same
`carebench analyze` uses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from carebench import runs
from carebench.data.folds import COHORTS, N_FOLDS
from carebench.errors import OptionError, UserError
from carebench.evaluation.options import FairnessOptions, StatisticsOptions
from carebench.tasks import TaskError, check_task_name
from carebench.training.config import PRESETS, ConfigError, TrainConfig, parse_overrides, resolve_config

GRID_KEYS = ("models", "tasks", "cohorts", "folds", "seeds", "overrides", "model_overrides")
PLAN_KEYS = (
    "name",
    "description",
    "preset",
    *GRID_KEYS,
    "grids",
    "missingness",
    "fairness",
    "statistics",
    "tuning",
)
MISSINGNESS_KEYS = ("train_rates", "test_rates", "models", "tasks", "cohorts", "folds", "seeds")
FAIRNESS_KEYS = ("enabled", "attributes")
STATISTICS_KEYS = ("n_bootstrap", "n_permutations", "confidence", "seed", "label_groups")
TUNING_KEYS = ("trials", "fold", "seed", "pruning", "storage", "studies", "spaces")
# Set by the grid itself: an override of these would silently collapse or duplicate grid cells.
GRID_OWNED = {
    "cohort": "cohorts",
    "fold": "folds",
    "seed": "seeds",
    "cxr_dropout_train": "missingness.train_rates",
    "cxr_dropout_val": "missingness.train_rates",
    "cxr_dropout_seed": "seeds",
}
DEFAULTS = {"cohorts": ("base",), "folds": (1,), "seeds": (0,)}
# Test-time X-ray missing rates at which the analysis evaluates every trained run (docs/benchmark.md).
DEFAULT_TEST_RATES = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0, 0.1, ..., 0.9
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PlanError(UserError, ValueError):
    """A plan file is malformed; the message names the plan, the key and what was expected."""


@dataclass(frozen=True)
class Grid:
    """One block of the run grid: the product models x tasks x cohorts x folds x seeds at one X-ray dropout."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    cohorts: tuple[str, ...]
    folds: tuple[int, ...]
    seeds: tuple[int, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    cxr_dropout: float = 0.0  # the train and validation X-ray missing rate of these runs
    where: str = ""  # its place in the plan file, for error messages ("" = the top level)

    @property
    def size(self) -> int:
        return len(self.models) * len(self.tasks) * len(self.cohorts) * len(self.folds) * len(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: list(getattr(self, k)) for k in ("models", "tasks", "cohorts", "folds", "seeds")
        }
        out["overrides"] = dict(self.overrides)
        out["model_overrides"] = {m: dict(v) for m, v in self.model_overrides.items()}
        return out


@dataclass(frozen=True)
class Missingness:
    """Controlled X-ray missing rates. A train rate r > 0 adds training runs (cxr_dropout_train = val = r) for
    `grid`; test rates are not runs: the analysis evaluates trained runs at each of them."""

    train_rates: tuple[float, ...] = ()
    test_rates: tuple[float, ...] = DEFAULT_TEST_RATES
    grid: Grid | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"train_rates": list(self.train_rates), "test_rates": list(self.test_rates)}
        if self.grid is not None:
            out.update({k: v for k, v in self.grid.to_dict().items() if k in MISSINGNESS_KEYS})
        return out


@dataclass(frozen=True)
class Tuning:
    """The plan's `tuning` section: every run uses the best trial of the validation-only study of its method,
    task, fold and cohort (with the run's fixed settings), run to `trials` complete trials before the grid, or
    read from finished studies under `studies` when `trials` is left out."""

    trials: int | None = None
    fold: int | str = "each"  # "each": a study per fold of the plan; F: the plan's runs are all on fold F
    seed: int = 0
    pruning: bool = True
    storage: str | None = None  # one Optuna RDB URL for every study; default SQLite in each study's directory
    studies: str | None = None  # where the studies live; default RUNS/tuning
    spaces: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: replaces its declared space

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if v is not None and v != {}}


@dataclass(frozen=True)
class Plan:
    name: str
    preset: str
    top: Grid  # the top-level keys: the only grid without `grids`, the defaults of each with
    grids: tuple[Grid, ...]
    missingness: Missingness
    fairness: dict[str, Any]
    statistics: dict[str, Any]
    description: str = ""
    source: str = ""
    tuning: Tuning | None = None

    def training_grids(self) -> list[Grid]:
        """The main grids, then one grid per non-zero train missing rate (rate 0 is the main grids' setting)."""
        out = list(self.grids)
        ms = self.missingness
        if ms.grid is not None:
            for rate in ms.train_rates:
                if rate > 0:
                    out.append(
                        dataclasses.replace(
                            ms.grid, cxr_dropout=rate, where=f"missingness (train rate {rate:g})"
                        )
                    )
        return out

    def to_dict(self) -> dict[str, Any]:
        """The resolved plan ("all" expanded, defaults filled): what `RUNS/plan.yaml` records."""
        top = {
            k: v for k, v in self.top.to_dict().items() if v
        }  # a top level of defaults only may leave keys out
        return {
            "name": self.name,
            "description": self.description,
            "preset": self.preset,
            **top,
            "grids": [g.to_dict() for g in self.grids],
            "missingness": self.missingness.to_dict(),
            "fairness": dict(self.fairness),
            "statistics": dict(self.statistics),
            **({"tuning": self.tuning.to_dict()} if self.tuning is not None else {}),
        }


# --------------------------------------------------------------------------------------------------- loading
def profiles() -> list[str]:
    """Names of the built-in plans (`experiments/profiles/<name>.yaml`)."""
    root = resources.files("carebench.experiments") / "profiles"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_plan(spec: str | Path, overrides: dict[str, Any] | None = None) -> Plan:
    """A built-in profile name (`quick`, `paper`) or a YAML file -> validated `Plan`.

    `overrides` (e.g. from `carebench benchmark ... key=value`) are added to the plan's global overrides.
    """
    spec = str(spec)
    if spec in profiles():
        source = f"profile {spec!r}"
        text = (resources.files("carebench.experiments") / "profiles" / f"{spec}.yaml").read_text()
    elif Path(spec).is_file():
        source = str(spec)
        text = Path(spec).read_text()
    else:
        raise PlanError(
            f"--plan {spec!r}: neither a built-in profile ({', '.join(profiles())}) nor a YAML file"
        )
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PlanError(f"{source}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise PlanError(f"{source}: expected a mapping of plan keys ({', '.join(PLAN_KEYS)})")
    if overrides:
        base = raw.get("overrides") or {}
        if not isinstance(base, dict):
            raise PlanError(f"{source}: key 'overrides': expected a mapping of option: value")
        raw["overrides"] = {**base, **overrides}
    return parse_plan(raw, source=source)


def parse_plan(raw: dict[str, Any], source: str = "plan") -> Plan:
    """Validate a plan mapping and fill defaults; every error names the key."""
    from carebench.models import get_model_class, list_models

    _keys(raw, PLAN_KEYS, source, "")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PlanError(
            f"{source}: key 'name': expected a name of letters, digits, '_', '.', '-', got {name!r}"
        )
    where = f"plan {name!r} ({source})" if source != f"profile {name!r}" else f"plan {name!r}"
    description = raw.get("description", "") or ""
    if not isinstance(description, str):
        raise PlanError(f"{where}: key 'description': expected a string")
    preset = raw.get("preset", "quick")
    if preset not in PRESETS:
        raise PlanError(f"{where}: key 'preset': expected one of {sorted(PRESETS)}, got {preset!r}")

    models = list_models()
    grids_raw = raw.get("grids")
    top = (
        _grid(raw, None, where, "", models, require=("models", "tasks"))
        if grids_raw is None
        else _grid(raw, None, where, "", models, partial=True)
    )
    if grids_raw is None:
        grids = (top,)
    else:
        if not isinstance(grids_raw, list) or not grids_raw:
            raise PlanError(f"{where}: key 'grids': expected a non-empty list of grid mappings")
        grids = tuple(
            _grid(g or {}, top, where, f"grids[{i}].", models, require=("models", "tasks"))
            for i, g in enumerate(grids_raw)
        )

    missingness = _missingness(raw.get("missingness"), _defaults(top, grids), where, models, get_model_class)
    fairness = _fairness(raw.get("fairness"), where)
    statistics = _statistics(raw.get("statistics"), where)
    plan = Plan(
        name=name,
        preset=preset,
        top=top,
        grids=grids,
        missingness=missingness,
        fairness=fairness,
        statistics=statistics,
        description=description.strip(),
        source=source,
    )
    if raw.get("tuning") is not None:
        plan = dataclasses.replace(plan, tuning=_tuning(raw["tuning"], plan, where))
    return plan


def _keys(raw: Any, allowed: tuple[str, ...], where: str, prefix: str) -> None:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: key '{prefix.rstrip('.')}': expected a mapping")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise PlanError(f"{where}: unknown key '{prefix}{unknown[0]}'; expected one of: {', '.join(allowed)}")


def _list(raw: Any, key: str, where: str) -> list[Any]:
    value = [raw] if isinstance(raw, str | int | float) and not isinstance(raw, bool) else raw
    if not isinstance(value, list) or not value:
        raise PlanError(f"{where}: key '{key}': expected a non-empty list, got {raw!r}")
    if len(set(map(repr, value))) != len(value):
        raise PlanError(f"{where}: key '{key}': values repeat in {raw!r}")
    return value


def _ints(raw: Any, key: str, where: str, lo: int, hi: int | None = None) -> tuple[int, ...]:
    values = _list(raw, key, where)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise PlanError(f"{where}: key '{key}': expected integers {rng}, got {v!r}")
    return tuple(values)


def _choices(raw: Any, key: str, where: str, allowed: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    values = _list(raw, key, where)
    for v in values:
        if v not in allowed:
            raise PlanError(
                f"{where}: key '{key}': unknown value {v!r}; expected some of: {', '.join(allowed)}"
            )
    return tuple(values)


def _task_names(raw: Any, key: str, where: str) -> tuple[str, ...]:
    """Task names (checked against the dataset's declared tasks when the plan is expanded on it)."""
    values = _list(raw, key, where)
    for v in values:
        try:
            check_task_name(v)
        except TaskError as e:
            raise PlanError(f"{where}: key '{key}': {e}") from None
    return tuple(values)


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string: read string values the way `key=value` overrides are read."""
    if isinstance(value, str):
        return parse_overrides([f"x={value}"])["x"]
    return value


def _overrides(raw: Any, key: str, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: key '{key}': expected a mapping of option: value, got {raw!r}")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str):
            raise PlanError(f"{where}: key '{key}': option names must be strings, got {k!r}")
        if k in GRID_OWNED:
            raise PlanError(f"{where}: key '{key}.{k}': set by the grid; use the plan key '{GRID_OWNED[k]}'")
        if k == "threads":
            raise PlanError(f"{where}: key '{key}.threads': set per job by `carebench benchmark --threads`")
        if isinstance(v, dict | list):
            raise PlanError(f"{where}: key '{key}.{k}': expected a single value, got {v!r}")
        out[k] = _number(v)
    return out


def _grid(
    raw: dict[str, Any],
    parent: Grid | None,
    where: str,
    prefix: str,
    models: list[str],
    require: tuple[str, ...] = (),
    partial: bool = False,
) -> Grid:
    if parent is not None:
        _keys(raw, GRID_KEYS, where, prefix)
    for key in require:
        if key not in raw and not (parent and getattr(parent, key)):
            raise PlanError(f"{where}: missing key '{prefix}{key}'")
    vals: dict[str, Any] = {}
    spec = raw.get("models")
    if spec is None:
        vals["models"] = parent.models if parent else ()
    elif spec == "all":
        vals["models"] = tuple(models)
    else:
        vals["models"] = _choices(spec, f"{prefix}models", where, models)
    vals["tasks"] = (
        _task_names(raw["tasks"], f"{prefix}tasks", where)
        if "tasks" in raw
        else parent.tasks
        if parent
        else ()
    )
    # unset cohorts/folds/seeds: the parent's, else base/1/0 (left empty on a top level that only holds defaults)
    inherited = {
        k: (getattr(parent, k) if parent else ()) or (() if partial else v) for k, v in DEFAULTS.items()
    }
    vals["cohorts"] = (
        _choices(raw["cohorts"], f"{prefix}cohorts", where, COHORTS)
        if "cohorts" in raw
        else inherited["cohorts"]
    )
    vals["folds"] = (
        _ints(raw["folds"], f"{prefix}folds", where, 1, N_FOLDS) if "folds" in raw else inherited["folds"]
    )
    vals["seeds"] = _ints(raw["seeds"], f"{prefix}seeds", where, 0) if "seeds" in raw else inherited["seeds"]
    overrides = dict(parent.overrides) if parent else {}
    overrides.update(_overrides(raw.get("overrides"), f"{prefix}overrides", where))
    per_model = {m: dict(v) for m, v in parent.model_overrides.items()} if parent else {}
    mo = raw.get("model_overrides")
    if mo is not None:
        if not isinstance(mo, dict):
            raise PlanError(
                f"{where}: key '{prefix}model_overrides': expected a mapping model: {{option: value}}"
            )
        for m, values in mo.items():
            if m not in models:
                raise PlanError(
                    f"{where}: key '{prefix}model_overrides.{m}': unknown model; registered: "
                    f"{', '.join(models)}"
                )
            per_model.setdefault(m, {}).update(_overrides(values, f"{prefix}model_overrides.{m}", where))
    return Grid(overrides=overrides, model_overrides=per_model, where=prefix.rstrip("."), **vals)


def _defaults(top: Grid, grids: tuple[Grid, ...]) -> Grid:
    """The missingness grid's defaults: each top-level key, or where the top level leaves it out, the union of
    the grids' values (in order of first appearance)."""
    vals = {}
    for key in ("models", "tasks", "cohorts", "folds", "seeds"):
        vals[key] = getattr(top, key) or tuple(dict.fromkeys(v for g in grids for v in getattr(g, key)))
    return dataclasses.replace(top, **vals)


def _rates(raw: Any, key: str, where: str) -> tuple[float, ...]:
    if raw is None:
        return ()
    values = [_number(v) for v in _list(raw, key, where)]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
            raise PlanError(f"{where}: key '{key}': expected X-ray missing rates in [0, 1), got {v!r}")
    return tuple(sorted(float(v) for v in values))


def _missingness(raw: Any, top: Grid, where: str, models: list[str], get_model_class) -> Missingness:
    if raw is None:
        return Missingness()
    _keys(raw, MISSINGNESS_KEYS, where, "missingness.")
    train = _rates(raw.get("train_rates"), "missingness.train_rates", where)
    test = DEFAULT_TEST_RATES
    if raw.get("test_rates") is not None:
        test = _rates(raw["test_rates"], "missingness.test_rates", where)
    uses_cxr = [m for m in models if "cxr" in get_model_class(m).modalities]
    sub = {k: v for k, v in raw.items() if k in GRID_KEYS}
    if "models" not in sub:  # default: the plan's models that read the X-ray
        sub["models"] = [m for m in top.models if m in uses_cxr]
        if not sub["models"]:
            if any(r > 0 for r in train):
                raise PlanError(
                    f"{where}: key 'missingness.train_rates': no model of the plan uses the X-ray"
                )
            return Missingness(train_rates=train, test_rates=test)
    grid = _grid(sub, top, where, "missingness.", models)
    no_cxr = [m for m in grid.models if m not in uses_cxr]
    if no_cxr:
        raise PlanError(f"{where}: key 'missingness.models': {no_cxr[0]!r} does not use the X-ray")
    return Missingness(train_rates=train, test_rates=test, grid=grid)


def _tuning(raw: Any, plan: Plan, where: str) -> Tuning:
    """The plan's `tuning` section, checked. A fixed `fold` F is accepted only when every run of the plan is on
    fold F: a study on fold F trains on three other folds and validates on a fourth, so its choice has seen the
    test stays of every other fold (their runs need their own study: `fold: each`)."""
    _keys(raw, TUNING_KEYS, where, "tuning.")
    trials = raw.get("trials")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise PlanError(f"{where}: key 'tuning.trials': expected an integer >= 1 (complete trials per study)")
    studies = raw.get("studies")
    if trials is None and studies is None:
        raise PlanError(
            f"{where}: key 'tuning': give 'trials' (run the studies first) or 'studies' (a directory of finished "
            "studies made by `carebench tune`)"
        )
    for key in ("storage", "studies"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise PlanError(f"{where}: key 'tuning.{key}': expected a string")
    fold = raw.get("fold", "each")
    folds = sorted({f for g in plan.training_grids() for f in g.folds})
    if fold != "each":
        if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= N_FOLDS:
            raise PlanError(
                f"{where}: key 'tuning.fold': expected 'each' or a fold 1..{N_FOLDS}, got {fold!r}"
            )
        if folds != [fold]:
            raise PlanError(
                f"{where}: key 'tuning.fold': a study on fold {fold} trains and validates on the stays of the "
                f"other folds, which are the test stays of this plan's runs on folds "
                f"{[f for f in folds if f != fold]}; use 'fold: each' (a study per fold) or plan fold {fold} only"
            )
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PlanError(f"{where}: key 'tuning.seed': expected an integer >= 0, got {seed!r}")
    pruning = raw.get("pruning", True)
    if not isinstance(pruning, bool):
        raise PlanError(f"{where}: key 'tuning.pruning': expected true or false, got {pruning!r}")
    spaces = raw.get("spaces") or {}
    if not isinstance(spaces, dict):
        raise PlanError(f"{where}: key 'tuning.spaces': expected a mapping method: {{setting: spec}}")
    models = {m for g in plan.training_grids() for m in g.models}
    for m, space in spaces.items():
        if m not in models:
            raise PlanError(f"{where}: key 'tuning.spaces.{m}': not a method of this plan")
        if not isinstance(space, dict):
            raise PlanError(f"{where}: key 'tuning.spaces.{m}': expected a mapping {{setting: spec}}")
    return Tuning(
        trials=trials,
        fold=fold,
        seed=seed,
        pruning=pruning,
        storage=raw.get("storage"),
        studies=studies,
        spaces={m: dict(v) for m, v in spaces.items()},
    )


def _fairness(raw: Any, where: str) -> dict[str, Any]:
    """The plan's `fairness` section, validated by `FairnessOptions` (its defaults where a key is left out)."""
    if raw is not None and not isinstance(raw, dict):
        raise PlanError(f"{where}: key 'fairness': expected a mapping of {', '.join(FAIRNESS_KEYS)}")
    try:
        return FairnessOptions.from_mapping(raw).to_dict()
    except OptionError as e:
        raise PlanError(f"{where}: key 'fairness.{e.key}': {e.problem}") from None


def _statistics(raw: Any, where: str) -> dict[str, Any]:
    """The plan's `statistics` section, validated by `StatisticsOptions` (its defaults where a key is left out)."""
    if raw is not None and not isinstance(raw, dict):
        raise PlanError(f"{where}: key 'statistics': expected a mapping of {', '.join(STATISTICS_KEYS)}")
    raw = dict(raw or {})
    if "confidence" in raw:
        raw["confidence"] = _number(raw["confidence"])
    try:
        return StatisticsOptions.from_mapping(raw).to_dict()
    except OptionError as e:
        problem = e.problem + (" (label columns)" if e.key == "label_groups" else "")
        raise PlanError(f"{where}: key 'statistics.{e.key}': {problem}") from None


# ------------------------------------------------------------------------------------------------- expansion
# (model, task, fold, cohort, the run's fixed overrides) -> (tuned overrides, their source), or None = defaults
HparamsLookup = Callable[[str, str, int, str, dict[str, Any]], tuple[dict[str, Any], Any] | None]


def run_overrides(grid: Grid, model: str) -> dict[str, Any]:
    """The fixed settings of `model`'s runs in `grid`: the grid's overrides and the method's model_overrides."""
    return {**grid.overrides, **grid.model_overrides.get(model, {})}


def expand_plan(plan: Plan, data: str | Path, hparams: HparamsLookup | None = None) -> list[TrainConfig]:
    """Every run of the plan, resolved against the dataset `data`, in a fixed order, without duplicates.

    Order: grid by grid (main grids, then the missingness train rates); within a grid fold, seed, task, cohort,
    model (models innermost, so an interrupted benchmark has complete method comparisons for the first folds and
    seeds). A run that two grids share (same resolved configuration, same run id) appears once, at its first place.

    `hparams` gives a run's tuned hyper-parameters (`experiments.tuned`) and their source, recorded in the run's
    `hparams_source`; without it (or where it returns None) the runs use the preset's defaults.
    """
    planned: dict[str, TrainConfig] = {}
    for grid in plan.training_grids():
        for fold in grid.folds:
            for seed in grid.seeds:
                for task in grid.tasks:
                    for cohort in grid.cohorts:
                        for model in grid.models:
                            options = {
                                "cohort": cohort,
                                "fold": fold,
                                "seed": seed,
                                "progress": False,
                                "cxr_dropout_train": grid.cxr_dropout,
                                "cxr_dropout_val": grid.cxr_dropout,
                            }
                            overrides = run_overrides(grid, model)
                            found = hparams(model, task, fold, cohort, overrides) if hparams else None
                            tuned, source = found if found is not None else ({}, "defaults")
                            try:
                                cfg = resolve_config(
                                    data=data,
                                    model=model,
                                    task=task,
                                    preset=plan.preset,
                                    options=options,
                                    overrides={**overrides, **tuned},
                                )
                                cfg = dataclasses.replace(cfg, hparams_source=source)
                            except ConfigError as e:
                                at = ", ".join(
                                    x
                                    for x in (
                                        f"plan {plan.name!r}",
                                        grid.where,
                                        f"model {model!r}",
                                        f"task {task!r}",
                                    )
                                    if x
                                )
                                raise PlanError(f"{at}: {e}") from None
                            planned.setdefault(cfg.run_id, cfg)
    return list(planned.values())


def plan_record(
    plan: Plan, configs: list[TrainConfig], studies: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`RUNS/plan.yaml`: the resolved plan, the dataset it was expanded on, the number of runs and, for a plan
    with `tuning`, the studies its runs took their hyper-parameters from."""
    from carebench import __version__

    first = configs[0] if configs else None
    return {
        **plan.to_dict(),
        "source": plan.source,
        "n_runs": len(configs),
        "data": first.data if first else None,
        "data_fingerprint": first.data_fingerprint if first else None,
        "carebench_version": __version__,
        **({"studies": studies} if studies is not None else {}),
    }


def read_plan_record(runs_dir: str | Path) -> dict[str, Any] | None:
    """`RUNS/plan.yaml` (written by `carebench benchmark`) as a mapping, or None for runs made without a plan."""
    path = Path(runs_dir) / runs.PLAN_FILE
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: expected a mapping (the resolved plan written by `carebench benchmark`)")
    return raw
