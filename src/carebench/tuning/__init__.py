"""Tuning: Optuna studies of one model, task and fold on the validation split only (docs/tuning.md).

`space` (the search space: declared by the model or read from a file, checked, sampled), `study` (what defines a
study, its storage, sampler, pruner and the recovery of killed trials), `worker` (the trial loop one worker runs),
`runner` (`carebench tune`: check, open, run workers locally or on Ray, summarise). Names are imported lazily, so
`import carebench.tuning` costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TuningError": "space",
    "study_space": "space",
    "StudySpec": "study",
    "read_spec": "study",
    "TuneSummary": "runner",
    "prepare_study": "runner",
    "print_summary": "runner",
    "tune": "runner",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
