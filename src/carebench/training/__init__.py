"""Training: one run = fit + select on validation + test the best checkpoint, for any registered model.

`config` (resolved run configuration, presets, run id), `module` (the LightningModule), `run` (fit/test, run
record, re-evaluation). docs/training.md describes the protocol.
"""

from carebench.training.config import PRESETS, TrainConfig, parse_overrides, resolve_config
from carebench.training.run import RunResult, evaluate_run, train_run

__all__ = [
    "PRESETS",
    "RunResult",
    "TrainConfig",
    "evaluate_run",
    "parse_overrides",
    "resolve_config",
    "train_run",
]
