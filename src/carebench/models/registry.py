"""Registry of methods by name: ``@register("name")``, ``create_model``, ``list_models``, ``get_model_class``.

One registry and one constructor signature (as in timm) so the CLI, the experiment planner and the tests can
reach every method by its name, and a new method is covered by the contract tests the moment it is registered.
Methods live in ``carebench.models.baselines`` and ``carebench.models.fusion.*``; importing
``carebench.models`` registers them all (no optional heavy dependencies are imported on the way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from carebench.models.base import BaseModel, ModelConfigError, fits_default_type

_REGISTRY: dict[str, type[BaseModel]] = {}


def register(name: str) -> Callable[[type[BaseModel]], type[BaseModel]]:
    """Class decorator: register a ``BaseModel`` subclass under ``name`` (and set its ``name`` attribute)."""

    def decorator(cls: type[BaseModel]) -> type[BaseModel]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise TypeError(f"@register({name!r}) expects a BaseModel subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not cls.modalities or not set(cls.modalities) <= {"ehr", "cxr"}:
            raise ValueError(f"{cls.__qualname__}.modalities must be a non-empty subset of ('ehr', 'cxr')")
        check_search_space(cls)
        for preset, values in cls.presets.items():
            for key in values:
                if key not in cls.default_hparams:
                    raise ValueError(f"{cls.__qualname__}.presets[{preset!r}] names unknown key {key!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


SPACE_TYPES = ("float", "int", "categorical")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_search_space(cls: type[BaseModel]) -> None:
    """Validate ``cls.search_space`` (read by hyper-parameter search), raising ``ValueError`` naming the key.

    ``{"type": "float", "low": a, "high": b, "log": bool}`` for a float hyper-parameter, ``{"type": "int", ...}``
    (integer bounds) for an int one, ``{"type": "categorical", "choices": [...]}`` with distinct choices of the
    default's type; ``low < high``, and a log scale needs ``low > 0``.
    """
    validate_space(cls.search_space, cls.default_hparams, f"{cls.__qualname__}.search_space")


def validate_space(space: Any, defaults: dict[str, Any], where: str) -> None:
    """The rules of `check_search_space` for any `space` over the settings `defaults` ({name: default value});
    also used for a search space read from a file (`carebench tune --space`)."""
    if not isinstance(space, dict):
        raise ValueError(f"{where} must be a dict {{hyper-parameter: spec}}")
    for key, spec in space.items():
        if key not in defaults:
            raise ValueError(f"{where} names unknown hyper-parameter {key!r}")
        at = f"{where}[{key!r}]"
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in SPACE_TYPES:
            raise ValueError(f"{at}: 'type' must be one of {SPACE_TYPES}, got {kind!r}")
        default = defaults[key]
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"{at}: unknown keys {unknown}; a {kind} space has {sorted(allowed)}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list | tuple) or not choices:
                raise ValueError(f"{at}: 'choices' must be a non-empty list")
            if len({repr(c) for c in choices}) != len(choices):
                raise ValueError(f"{at}: 'choices' repeat a value: {list(choices)}")
            bad = [c for c in choices if not fits_default_type(default, c)]
            if bad:
                raise ValueError(
                    f"{at}: choice {bad[0]!r} is not a {type(default).__name__} like the default"
                )
            continue
        low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
        want_int = kind == "int"
        if want_int != (isinstance(default, int) and not isinstance(default, bool)) or not _number(default):
            raise ValueError(
                f"{at}: {'an int' if want_int else 'a float'} space for a hyper-parameter whose default is {default!r}"
            )
        if not (_number(low) and _number(high)) or (
            want_int and not (isinstance(low, int) and isinstance(high, int))
        ):
            raise ValueError(f"{at}: 'low' and 'high' must be {'integers' if want_int else 'numbers'}")
        if not low < high:
            raise ValueError(f"{at}: needs low < high, got {low} and {high}")
        if not isinstance(log, bool) or (log and low <= 0):
            raise ValueError(f"{at}: 'log' must be true or false, and a log scale needs low > 0")


def _ensure_loaded() -> None:
    # Importing the package registers every built-in method; done lazily so `registry` has no import cycle.
    import carebench.models  # noqa: F401


def list_models() -> list[str]:
    """Names of all registered methods, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[BaseModel]:
    """The class registered under ``name``; ``ModelConfigError`` listing the available names otherwise."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelConfigError(
            f"unknown model {name!r}; available models: {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_model(
    name: str, task: str, n_features: int, image_size: int, *, preset: str | None = None, **overrides: Any
) -> BaseModel:
    """Build a registered method: defaults, then ``preset`` ("quick", "full", "test") if given, then overrides."""
    cls = get_model_class(name)
    hparams = cls.resolve_hparams(overrides, preset=preset)
    return cls(task, n_features, image_size, **hparams)
