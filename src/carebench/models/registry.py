"""Registry of methods by name: ``@register("name")``, ``create_model``, ``list_models``, ``get_model_class``.

One registry and one constructor signature (as in timm) so the CLI, the experiment planner and the tests can
reach every method by its name, and a new method is covered by the contract tests the moment it is registered.
Methods live in ``carebench.models.baselines`` and ``carebench.models.fusion.*``; importing
``carebench.models`` registers them all (no optional heavy dependencies are imported on the way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from carebench.models.base import BaseModel, ModelConfigError

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
        for key in cls.search_space:
            if key not in cls.default_hparams:
                raise ValueError(f"{cls.__qualname__}.search_space names unknown hyper-parameter {key!r}")
        for preset, values in cls.presets.items():
            for key in values:
                if key not in cls.default_hparams:
                    raise ValueError(f"{cls.__qualname__}.presets[{preset!r}] names unknown key {key!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


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
