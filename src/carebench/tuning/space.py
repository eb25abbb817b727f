"""A study's search space: the model's declared `search_space`, or one read from a file, checked and sampled.

Why here and not in the model: a model declares what may be tuned (`BaseModel.search_space`, checked at
registration by `models.registry.check_search_space`); a study decides what it tunes. A space file
(`carebench tune --space FILE`) replaces the declared space for one study, is checked by the same rules
(`models.registry.validate_space`), and may also tune the training options in `TRAINING_KEYS`. A setting fixed on
the command line or in a plan (`key=value`) is not searched: it is dropped from the space, so the study never
tunes a value the runs would then ignore.

Spec forms (the registry's): ``{"type": "float", "low": a, "high": b, "log": bool}``,
``{"type": "int", "low": a, "high": b}``, ``{"type": "categorical", "choices": [...]}``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from carebench.errors import UserError

# Training options a space file may tune besides the model's hyper-parameters (TrainConfig fields).
TRAINING_KEYS = ("lr", "weight_decay", "batch_size")


class TuningError(UserError, ValueError):
    """A tuning option is wrong: unknown model or task, an empty or malformed search space, a storage that
    cannot be opened, a bad number of trials; the message names the option."""


class EmptySpaceError(TuningError):
    """The space has no setting left to search (declared empty, an empty file, or every setting fixed)."""


def training_defaults() -> dict[str, Any]:
    """The defaults of the tunable training options (`TrainConfig`'s), which fix their types."""
    from carebench.training.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return {k: fields[k].default for k in TRAINING_KEYS}


def model_class(model: str) -> Any:
    """The registered class of `model`; an error naming --model otherwise."""
    from carebench.models import get_model_class

    try:
        return get_model_class(model)
    except UserError as e:
        raise TuningError(f"--model: {e}") from None


def read_space(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) file holding one mapping {setting: spec}; an error naming --space otherwise."""
    p = Path(path)
    if not p.is_file():
        raise TuningError(f"--space {p}: no such file (expected a YAML mapping {{setting: spec}})")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise TuningError(f"--space {p}: not valid YAML ({e})".replace("\n", " ")) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TuningError(f"--space {p}: expected a mapping {{setting: spec}}, got {type(raw).__name__}")
    return raw


def study_space(
    model: str,
    space: dict[str, Any] | None = None,
    fixed: tuple[str, ...] | list[str] = (),
    where: str = "",
) -> dict[str, dict[str, Any]]:
    """The space a study of `model` searches: `space` if given (read from a file or a plan; it may also tune
    `TRAINING_KEYS`), else the model's declared one, without the settings in `fixed`; checked
    (`validate_space`), normalised (every numeric spec has `log`). `where` names the source in errors.

    An empty space (declared empty, an empty file, or every setting fixed) is an `EmptySpaceError`: there is
    nothing to tune, and a study of one configuration would only cost time.
    """
    from carebench.models.registry import validate_space

    cls = model_class(model)
    if space is not None:
        where = where or "search space"
        defaults = {**cls.default_hparams, **training_defaults()}
        if not isinstance(space, dict):
            raise TuningError(f"{where}: expected a mapping {{setting: spec}}, got {type(space).__name__}")
    else:
        space, where = copy.deepcopy(cls.search_space), f"--model {model}: its declared search_space"
        defaults = dict(cls.default_hparams)
    dropped = [k for k in space if _plain(k) in fixed or k in fixed]
    space = {_plain(k): v for k, v in space.items() if k not in dropped}
    if not space:
        why = f" (every setting in it is fixed: {', '.join(dropped)})" if dropped else ""
        raise EmptySpaceError(f"{where}: empty search space{why}; nothing to tune")
    try:
        validate_space(space, defaults, where)
    except ValueError as e:
        raise TuningError(str(e)) from None
    out = {}
    for key, spec in space.items():
        spec = dict(spec)
        if spec["type"] == "categorical":
            spec["choices"] = list(spec["choices"])
        else:
            spec["log"] = bool(spec.get("log", False))
        out[key] = spec
    return out


def _plain(key: str) -> str:
    """`model.hidden` -> `hidden` (a space file may name model hyper-parameters as overrides do)."""
    return key[len("model.") :] if key.startswith("model.") else key


def fixed_keys(overrides: dict[str, Any]) -> tuple[str, ...]:
    """The settings `key=value` overrides fix (model hyper-parameters named bare or as `model.<name>`)."""
    return tuple(_plain(k) for k in overrides)


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Draw one value of every setting of `space` from an Optuna trial."""
    params: dict[str, Any] = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec["log"])
        else:
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])
    return params


def as_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's values as `key=value` overrides: training options bare, model hyper-parameters as
    `model.<name>` (so a model setting never collides with a training option)."""
    return {(k if k in TRAINING_KEYS else f"model.{k}"): v for k, v in params.items()}


def describe(space: dict[str, dict[str, Any]]) -> str:
    """One line for the report: ``hidden {64, 128}; dropout [0, 0.5]; lr [1e-4, 1e-2] log``."""
    parts = []
    for key, spec in space.items():
        if spec["type"] == "categorical":
            parts.append(f"{key} {{{', '.join(str(c) for c in spec['choices'])}}}")
        else:
            scale = " log" if spec.get("log") else ""
            kind = " int" if spec["type"] == "int" else ""
            parts.append(f"{key} [{spec['low']:g}, {spec['high']:g}]{kind}{scale}")
    return "; ".join(parts)
