"""Training: one run = fit + select on validation + test the best checkpoint, for any registered model.

`config` (resolved run configuration, presets; torch-free), `module` (the LightningModule), `run` (fit/test, run
record, re-evaluation), `predict` (a trained model's predictions of a split). docs/training.md describes the
protocol. Only this package imports Lightning; its names are imported lazily, so `carebench.training.config`
can be read without paying for torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PRESETS": "config",
    "TrainConfig": "config",
    "parse_overrides": "config",
    "resolve_config": "config",
    "RunResult": "run",
    "evaluate_run": "run",
    "train_run": "run",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
