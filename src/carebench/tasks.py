"""The task registry: what each prediction task is, defined once (a torch-free leaf anyone may import).

Why one home: the kind of a task (binary / multilabel / multiclass), the width of its logits, the metric that
selects checkpoints and the few headline metrics of the curves and ablations used to be written in the model
contract, the metrics, the training module, the plan and the analysis, each a little differently. Every one of
them now reads `get_task(name)`.

Which dataset columns hold a task's labels is the dataset's business (data/loading.py), not the task's.

- ``binary``: one logit, sigmoid, BCE. ``multilabel``: one logit per label, sigmoid, BCE per label.
  ``multiclass``: one logit per class, softmax, cross-entropy on int64 targets.
- ``selection_metric``: the validation metric early stopping and checkpoint selection maximise
  (docs/training.md), and the one the report ranks by.
- ``headline``: the overall metrics of the missing-X-ray curves, ablations and subsets (the leaderboard and the
  comparisons carry every metric).
- ``logged``: the overall validation metrics logged every epoch besides the selection metric and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from carebench.errors import UserError

TaskKind = Literal["binary", "multilabel", "multiclass"]
KINDS: tuple[str, ...] = ("binary", "multilabel", "multiclass")


class TaskError(UserError, ValueError):
    """An unknown task name; the message lists the registered tasks."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task asks of a model and how its predictions are scored."""

    name: str
    kind: TaskKind
    num_outputs: int
    selection_metric: str
    headline: tuple[str, ...]
    logged: tuple[str, ...]
    description: str = ""


TASKS: dict[str, TaskSpec] = {
    "mortality": TaskSpec(
        "mortality",
        "binary",
        1,
        selection_metric="auprc",
        headline=("auroc", "auprc"),
        logged=("auroc", "auprc", "brier"),
        description="in-ICU death after the first 48 h",
    ),
    "phenotype": TaskSpec(
        "phenotype",
        "multilabel",
        25,
        selection_metric="auprc_macro",
        headline=("auroc_macro", "auprc_macro"),
        logged=("auroc_macro", "auprc_macro", "auroc_micro"),
        description="25 CCS phenotypes of the hospital admission",
    ),
    "los": TaskSpec(
        "los",
        "multiclass",
        7,
        selection_metric="auroc_ovr_macro",
        headline=("auroc_ovr_macro", "accuracy"),
        logged=("accuracy", "kappa_linear", "auroc_ovr_macro"),
        description="ICU length of stay in 7 classes (2-3 d, ..., 7-14 d, 14+ d)",
    ),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> TaskSpec:
    """The registered task called `name`; a `TaskError` listing the tasks otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise TaskError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}") from None
