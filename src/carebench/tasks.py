"""The task registry: what each prediction task is, defined once (a torch-free leaf anyone may import).

Why one home: the kind of a task (binary / multilabel / multiclass), the width of its logits, the metric that
selects checkpoints, the metrics a report shows and how thresholded metrics get their threshold used to be written
in the model contract, the metrics, the training module, the plan, the analysis and the report, each a little
differently. Every one of them now reads `get_task(name)`.

Which cohort columns hold a task's labels is the dataset's business: its manifest declares them
(`data.store`), never the registry. The built-in tasks (`TASKS`) are entries; a dataset may declare tasks of
its own in its manifest (a `TaskSpec` as a mapping, `task_from_mapping`), which `data.store.open_dataset`
registers for the process (`declare_tasks`), like a model registered on import.

- ``binary``: one logit, sigmoid, BCE. ``multilabel``: one logit per label, sigmoid, BCE per label.
  ``multiclass``: one logit per class, softmax, cross-entropy on int64 targets. (``regression`` is reserved:
  a spec of that kind is refused until the framework has a loss and metrics for it.)
- ``selection_metric``: the validation metric early stopping and checkpoint selection maximise
  (docs/training.md), and the one the report ranks by.
- ``headline``: the overall metrics of the missing-X-ray curves, ablations and subsets (the leaderboard and the
  comparisons carry every metric).
- ``logged``: the overall validation metrics logged every epoch besides the selection metric and the loss.
- ``reported``: the leaderboard columns of the report, in order.
- ``threshold``: how thresholded metrics (F1, sensitivity = recall, specificity, precision, accuracy of a
  binary or multilabel task) get their decision threshold: ``"f1"`` = per output, the validation score that
  maximises F1 on the run's validation split; ``"youden"`` = the one maximising TPR - FPR; ``"argmax"`` = a
  multiclass task's class decision (no threshold). Never a fixed 0.5 on test.
- ``class_names``: a multiclass task's class names (one per class, required); a multilabel task may name its
  labels (otherwise the dataset's label names are used); a binary task has none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from carebench.errors import UserError

TaskKind = Literal["binary", "multilabel", "multiclass"]
KINDS: tuple[str, ...] = ("binary", "multilabel", "multiclass")
RESERVED_KINDS: tuple[str, ...] = ("regression",)
THRESHOLD_RULES: dict[str, tuple[str, ...]] = {
    "binary": ("f1", "youden"),
    "multilabel": ("f1", "youden"),
    "multiclass": ("argmax",),
}
# The overall metrics of each kind (keys of `evaluation.metrics` and of the vectorised statistics); per-label keys
# ("auroc/<name>") come on top. Thresholded ones are computed at the task's validation threshold.
OVERALL_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auroc", "auprc", "accuracy", "f1", "precision", "recall", "specificity", "brier", "ece"),
    "multilabel": (
        "auroc_macro",
        "auprc_macro",
        "auroc_weighted",
        "auprc_weighted",
        "auroc_micro",
        "auprc_micro",
        "f1_macro",
    ),
    "multiclass": ("accuracy", "f1_macro", "f1_weighted", "kappa", "kappa_linear", "auroc_ovr_macro"),
}
THRESHOLDED_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("accuracy", "f1", "precision", "recall", "specificity"),
    "multilabel": ("f1_macro",),
    "multiclass": (),
}
# What a task spec of each kind selects, shows and thresholds by when its declaration leaves it out.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "binary": {
        "selection_metric": "auprc",
        "headline": ("auroc", "auprc"),
        "logged": ("auroc", "auprc", "brier"),
        "reported": ("auroc", "auprc", "f1", "recall", "specificity", "brier", "ece"),
        "threshold": "f1",
    },
    "multilabel": {
        "selection_metric": "auprc_macro",
        "headline": ("auroc_macro", "auprc_macro"),
        "logged": ("auroc_macro", "auprc_macro", "auroc_micro"),
        "reported": ("auroc_macro", "auprc_macro", "auroc_micro", "auprc_micro", "f1_macro"),
        "threshold": "f1",
    },
    "multiclass": {
        "selection_metric": "auroc_ovr_macro",
        "headline": ("auroc_ovr_macro", "accuracy"),
        "logged": ("accuracy", "kappa_linear", "auroc_ovr_macro"),
        "reported": ("auroc_ovr_macro", "accuracy", "kappa_linear", "f1_macro"),
        "threshold": "argmax",
    },
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class TaskError(UserError, ValueError):
    """An unknown task name or a malformed task spec; the message lists the tasks or names the field."""


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
    reported: tuple[str, ...] = ()
    threshold: str = ""
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # Fill what the kind implies, so a spec names only what differs from its kind's defaults.
        if self.kind in KIND_DEFAULTS:
            d = KIND_DEFAULTS[self.kind]
            if not self.reported:
                object.__setattr__(self, "reported", tuple(d["reported"]))
            if not self.threshold:
                object.__setattr__(self, "threshold", d["threshold"])

    @property
    def thresholded(self) -> tuple[str, ...]:
        """The overall metrics of this task computed at the validation threshold."""
        return THRESHOLDED_METRICS[self.kind]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("headline", "logged", "reported", "class_names"):
            out[key] = list(out[key])
        return out


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
        class_names=("2-3d", "3-4d", "4-5d", "5-6d", "6-7d", "7-14d", "14+d"),
    ),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)  # the built-in tasks
# Tasks declared by the datasets opened in this process (name -> spec); the latest declaration of a name wins.
_DECLARED: dict[str, TaskSpec] = {}


def get_task(name: str) -> TaskSpec:
    """The task called `name`: a built-in one or one declared by an opened dataset; a `TaskError` otherwise."""
    try:
        return TASKS[name] if name in TASKS else _DECLARED[name]
    except (KeyError, TypeError):
        known = [*TASK_NAMES, *(n for n in _DECLARED if n not in TASKS)]
        raise TaskError(
            f"unknown task {name!r}; expected one of {', '.join(known)} (or a task the dataset declares)"
        ) from None


def declared_tasks() -> tuple[str, ...]:
    """Names of the tasks declared by datasets in this process (besides the built-in ones)."""
    return tuple(_DECLARED)


def declared_specs() -> list[TaskSpec]:
    """The specs of the tasks declared in this process (to declare them again in a worker process)."""
    return list(_DECLARED.values())


def declare_tasks(specs: Iterable[TaskSpec]) -> None:
    """Register tasks a dataset declares for this process (a built-in name cannot be redefined)."""
    for spec in specs:
        if spec.name in TASKS:
            if spec != TASKS[spec.name]:
                raise TaskError(
                    f"task {spec.name!r}: a built-in task cannot be redefined; choose another name"
                )
            continue
        _DECLARED[spec.name] = spec


def _metric_list(value: Any, key: str, name: str, kind: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise TaskError(f"task {name!r}: '{key}' must be a non-empty list of metric names, got {value!r}")
    bad = [v for v in value if v not in OVERALL_METRICS[kind]]
    if bad:
        raise TaskError(
            f"task {name!r}: '{key}' names {bad}, not a metric of a {kind} task; expected some of "
            f"{', '.join(OVERALL_METRICS[kind])}"
        )
    return tuple(dict.fromkeys(value))


SPEC_KEYS = (
    "kind",
    "num_outputs",
    "class_names",
    "selection_metric",
    "headline",
    "logged",
    "reported",
    "threshold",
    "description",
)


def check_task_name(name: Any) -> str:
    """A task name: lower-case letters, digits and '_', starting with a letter (it names files and columns)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise TaskError(
            f"task name {name!r}: expected lower-case letters, digits and '_', starting with a letter "
            "(e.g. readmission_30d)"
        )
    return name


def task_from_mapping(name: str, raw: Mapping[str, Any], *, n_labels: int | None = None) -> TaskSpec:
    """A new task's spec from a mapping (a manifest's or `write_dataset`'s declaration), validated.

    Keys: `kind` (required: binary, multilabel, multiclass), `num_outputs` (multilabel: defaults to `n_labels`,
    the number of label columns; multiclass: defaults to the number of `class_names`), `class_names`
    (multiclass: required, one per class), `selection_metric`, `headline`, `logged`, `reported`, `threshold`
    (the kind's defaults where left out, `KIND_DEFAULTS`) and `description`.
    """
    check_task_name(name)
    if not isinstance(raw, Mapping):
        raise TaskError(f"task {name!r}: spec must be a mapping with at least 'kind', got {raw!r}")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise TaskError(
            f"task {name!r}: unknown spec key {unknown[0]!r}; expected some of {', '.join(SPEC_KEYS)}"
        )
    kind = raw.get("kind")
    if kind in RESERVED_KINDS:
        raise TaskError(
            f"task {name!r}: kind {kind!r} is not supported yet; expected one of {', '.join(KINDS)}"
        )
    if kind not in KINDS:
        raise TaskError(f"task {name!r}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    names = raw.get("class_names", [])
    if not isinstance(names, list | tuple) or not all(isinstance(c, str) and c for c in names):
        raise TaskError(f"task {name!r}: 'class_names' must be a list of non-empty names, got {names!r}")
    if len(set(names)) != len(names):
        raise TaskError(f"task {name!r}: 'class_names' repeat a name: {list(names)}")
    width = raw.get("num_outputs")
    if kind == "binary":
        if width not in (None, 1) or names:
            raise TaskError(f"task {name!r}: a binary task has one output and no class_names")
        width = 1
    elif kind == "multiclass":
        if len(names) < 2:
            raise TaskError(
                f"task {name!r}: a multiclass task needs 'class_names', one per class (at least 2)"
            )
        if width not in (None, len(names)):
            raise TaskError(f"task {name!r}: num_outputs {width} but {len(names)} class_names")
        width = len(names)
    else:
        width = width if width is not None else (len(names) or n_labels)
        if names and len(names) != width:
            raise TaskError(f"task {name!r}: num_outputs {width} but {len(names)} class_names")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise TaskError(f"task {name!r}: 'num_outputs' must be a positive integer, got {width!r}")
    d = KIND_DEFAULTS[kind]
    selection = raw.get("selection_metric", d["selection_metric"])
    (selection,) = _metric_list([selection] if isinstance(selection, str) else selection, "selection_metric",
                                name, kind)  # fmt: skip
    threshold = raw.get("threshold", d["threshold"])
    if threshold not in THRESHOLD_RULES[kind]:
        raise TaskError(
            f"task {name!r}: 'threshold' must be one of {', '.join(THRESHOLD_RULES[kind])} for a {kind} task, "
            f"got {threshold!r}"
        )
    logged = _metric_list(raw.get("logged", d["logged"]), "logged", name, kind)
    chosen = [m for m in (selection, *logged) if m in THRESHOLDED_METRICS[kind]]
    if chosen:
        raise TaskError(
            f"task {name!r}: {chosen} depend on a decision threshold, which is chosen on the validation split; "
            "the selection metric and the logged validation metrics must be threshold-free (e.g. auroc, auprc)"
        )
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise TaskError(f"task {name!r}: 'description' must be a string")
    return TaskSpec(
        name=name,
        kind=kind,
        num_outputs=width,
        selection_metric=selection,
        headline=_metric_list(raw.get("headline", d["headline"]), "headline", name, kind),
        logged=logged,
        reported=_metric_list(raw.get("reported", d["reported"]), "reported", name, kind),
        threshold=threshold,
        class_names=tuple(names),
        description=description,
    )


def spec_from_record(raw: Mapping[str, Any]) -> TaskSpec:
    """A `TaskSpec` from its `to_dict()` form (as a manifest or an analysis summary records it); a built-in
    task's name gives the built-in spec."""
    if raw.get("name") in TASKS:
        return TASKS[raw["name"]]
    return task_from_mapping(raw.get("name"), {k: v for k, v in raw.items() if k in SPEC_KEYS})


def default_output_names(spec: TaskSpec) -> list[str]:
    """Output names when no dataset names them: the task (binary), `<task>_0` ... (multilabel, multiclass). A
    dataset's multilabel task names its outputs after its label columns (`data.store.TaskDeclaration`)."""
    return [spec.name] if spec.kind == "binary" else [f"{spec.name}_{k}" for k in range(spec.num_outputs)]


def n_label_columns(spec: TaskSpec) -> int:
    """How many cohort columns hold a task's labels: one per output (multilabel), else one."""
    return spec.num_outputs if spec.kind == "multilabel" else 1
