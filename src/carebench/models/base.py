"""The model contract shared by every method and by the training framework.

Why a contract: the reference toolkit let each model return probabilities or logits as it pleased, read the number
of classes from a config instead of the task, and handled a missing X-ray per batch. Here a model is a plain
``nn.Module`` that turns a batch dict into *logits* (``ModelOutput``); the framework alone turns logits into
probabilities and computes the task loss, so every metric sees probabilities and every method is trained the same.

Batch (dict of tensors), produced by ``carebench.data.loading``:

=============  ==========================  ==================================================================
key            shape / dtype               meaning
=============  ==========================  ==================================================================
``ehr``        ``[B,T,F]`` float           normalised, imputed hourly values
``ehr_mask``   ``[B,T,F]`` float           1 = observed in that hour, 0 = imputed
``cxr``        ``[B,1,S,S]`` float         normalised grayscale image; zeros where missing
``has_cxr``    ``[B]`` bool                per sample: the image is real
``cxr_hours``  ``[B]`` float               hours from ICU admission to the image; 0 where missing
``static``     ``[B,2]`` float             age z-scored (training split's mean, std), gender_male 0/1
``y``          task shape                  mortality float ``[B,1]``; phenotype float ``[B,25]``; LOS int64 ``[B]``
``stay_id``    ``[B]`` int64               ICU stay id (for predictions on disk)
=============  ==========================  ==================================================================

A missing X-ray is per sample: a model must give the same prediction for a sample whatever pixel values its
missing image holds (``tests/models/test_registry_contract.py`` checks this for every registered model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.errors import UserError
from carebench.tasks import TASKS as TASKS  # re-exported: the task registry seen from the models
from carebench.tasks import TaskError, get_task
from carebench.tasks import TaskSpec as TaskSpec

Modality = Literal["ehr", "cxr"]


class ModelConfigError(UserError):
    """Unknown model or hyper-parameter, or a hyper-parameter value of the wrong type or range."""


def task_spec(task: str) -> TaskSpec:
    """The registered task called `task`, as `carebench.tasks.get_task`, but a `ModelConfigError` when unknown."""
    try:
        return get_task(task)
    except TaskError as err:
        raise ModelConfigError(str(err)) from None


def num_outputs(task: str) -> int:
    """Width of the logits for a task (mortality 1, phenotype 25, LOS 7), always derived from the task."""
    return task_spec(task).num_outputs


@dataclass
class ModelOutput:
    """What ``forward`` returns.

    logits: ``[B,1]`` mortality, ``[B,25]`` phenotype, ``[B,7]`` LOS; never probabilities.
    aux_losses: extra scalar losses of the method, already multiplied by their weights; the framework adds their
        sum to the task loss during training (and logs each by name). Empty for most methods.
    extra_logits: optional per-modality heads (e.g. ``"ehr"``, ``"cxr"``, ``"shared"``) with the same shape as
        ``logits``; saved as extra prediction columns and used by modality-contribution analyses. They are not
        trained by the framework: a method that wants them trained adds their losses to ``aux_losses``.
    """

    logits: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    extra_logits: dict[str, Tensor] = field(default_factory=dict)


def fits_default_type(default: Any, value: Any) -> bool:
    """A hyper-parameter value must have the type of its default (an int is accepted for a float)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, type(default))


class BaseModel(nn.Module):
    """Base class of every registered method.

    Class attributes a method sets:
      name: the registry name (set by ``@register``).
      modalities: ``("ehr",)``, ``("cxr",)`` or ``("ehr", "cxr")``: which batch keys the method reads.
      default_hparams: every hyper-parameter with its default (the paper's value); the only keys accepted.
      search_space: for hyper-parameter search (Optuna). ``{key: {"type": "float", "low": a, "high": b,
        "log": bool}}``, ``{"type": "int", "low": a, "high": b}`` or ``{"type": "categorical", "choices": [...]}``;
        keys must be hyper-parameters.
      presets: named overrides of ``default_hparams``: ``"quick"`` (small, CPU-friendly, no downloads),
        ``"full"`` (the paper's setting) and ``"test"`` (the smallest dims, used by the contract tests).

      train_task_loss: True (default) if the framework back-propagates the task loss of ``logits``. A method whose
        ``aux_losses`` are its whole objective (AUG trains each modality's classifier on its own loss, never the
        fused prediction) sets False; the task loss is then still computed and logged, but not trained.
      missing_aware: True if the method was designed for incomplete inputs (its paper models a missing modality
        explicitly: MedFuse, DrFuse, Flex-MoE, HEALNet, UMSE, ShaSpec, M3Care); False (default) otherwise. Only
        the analysis reads it: the "Findings" section compares how such methods degrade under missing X-rays
        with the other fusion methods (docs/findings.md).

    Constructor: ``(task, n_features, image_size, **hparams)``; the hyper-parameters are validated against
    ``default_hparams`` (unknown key or wrong type -> ``ModelConfigError``) and stored as ``self.hparams``.

    Training hooks (the framework owns the loop; a hook never calls ``backward`` or steps an optimiser). Order in
    one epoch of ``carebench.training.module.CareBenchModule``::

        on_train_epoch_start(module)
        for each batch:  forward -> loss -> training_hook(module, batch, output, loss) -> backward
                         -> before_optimizer_step(module, optimizer) -> optimizer.step()
        (validation)
        on_train_epoch_end(module)

    A staged method sets ``selection_start_epoch`` so that selection and early stopping see its last stage only.

    ``before_optimizer_step`` sees the gradients of the whole step (unscaled under mixed precision, already
    averaged across processes under DDP) and may modify them in place (InfoReg's regulation). A method that creates
    parameters during training (AUG's boosting layers) registers them with the running optimiser through
    ``module.add_trainable_parameters(params)``, and rebuilds them when a checkpoint holding them is loaded.
    ``module`` exposes ``current_epoch`` and ``trainer`` (``trainer.world_size``, ``trainer.strategy``).
    """

    name: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ()
    default_hparams: ClassVar[dict[str, Any]] = {}
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"quick": {}, "full": {}, "test": {}}
    train_task_loss: ClassVar[bool] = True
    missing_aware: ClassVar[bool] = False

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__()
        self.task = task_spec(task)
        if not isinstance(n_features, int) or n_features < 1:
            raise ModelConfigError(f"{self._label()}: n_features must be a positive int, got {n_features!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ModelConfigError(f"{self._label()}: image_size must be a positive int, got {image_size!r}")
        self.n_features = n_features
        self.image_size = image_size
        self.hparams: dict[str, Any] = self.resolve_hparams(hparams)

    @property
    def num_outputs(self) -> int:
        return self.task.num_outputs

    @classmethod
    def _label(cls) -> str:
        return f"model {cls.name or cls.__name__!r}"

    @classmethod
    def resolve_hparams(cls, overrides: dict[str, Any], preset: str | None = None) -> dict[str, Any]:
        """Defaults, then the preset, then the overrides; unknown keys and wrong types are errors."""
        if preset is not None and preset not in cls.presets:
            raise ModelConfigError(
                f"{cls._label()}: unknown preset {preset!r}; expected one of {sorted(cls.presets)}"
            )
        merged = dict(cls.default_hparams)
        for source in ([cls.presets[preset]] if preset else []) + [overrides]:
            for key, value in source.items():
                if key not in cls.default_hparams:
                    raise ModelConfigError(
                        f"{cls._label()}: unknown hyper-parameter {key!r}; valid keys: "
                        f"{', '.join(sorted(cls.default_hparams))}"
                    )
                if not fits_default_type(cls.default_hparams[key], value):
                    raise ModelConfigError(
                        f"{cls._label()}: hyper-parameter {key!r} must be "
                        f"{type(cls.default_hparams[key]).__name__}, got {value!r}"
                    )
                merged[key] = float(value) if isinstance(cls.default_hparams[key], float) else value
        return merged

    def choice(self, key: str, choices: tuple[str, ...] | list[str]) -> Any:
        """The value of a categorical hyper-parameter, checked against its allowed values."""
        value = self.hparams[key]
        if value not in choices:
            raise ModelConfigError(
                f"{self._label()}: hyper-parameter {key!r} must be one of {list(choices)}, got {value!r}"
            )
        return value

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_hook(
        self, trainer_module: Any, batch: dict[str, Tensor], output: ModelOutput, loss: Tensor
    ) -> None:
        """Called by the training module after the loss of a training step is computed, before backward.

        Default: nothing. Methods with a special procedure (gradient modulation such as AUG or InfoReg, sustained
        boosting) use it to read per-modality outputs and adjust state, e.g. register gradient scales for the
        coming backward or update running statistics. It must not call ``backward`` or step an optimiser: the
        framework owns the loop so that devices, precision and checkpointing work for every method.
        """
        return None

    @property
    def selection_start_epoch(self) -> int:
        """The first epoch whose validation may select the checkpoint or count toward early stopping.

        Default 0. A staged method (MedFuse: unimodal pretraining, then the fusion stage) returns the epoch its last
        stage starts, so a checkpoint of an earlier stage is never the run's result. At that epoch the framework
        also restarts the learning-rate schedule (plateau state and each group's initial lr), as a new training
        stage would. Must be smaller than the run's ``max_epochs``.
        """
        return 0

    @property
    def last_stage_lr_scale(self) -> float:
        """The lr of the last training stage relative to each group's initial lr (1.0: the same). Used only when
        ``selection_start_epoch`` > 0 (MedFuse fine-tunes its fusion stage at a lower lr than its pretraining)."""
        return 1.0

    def configure_param_groups(self) -> list[dict[str, Any]] | None:
        """Optimiser parameter groups, or None to optimise ``self.parameters()`` with the framework's settings.

        A method that needs per-part learning rates (e.g. a pretrained image encoder at a lower lr) returns
        ``[{"params": [...], "lr": ...}, ...]`` in the form ``torch.optim`` accepts; the framework fills the
        keys a group leaves out (lr, weight decay) from the run config. Every trainable parameter must appear
        in exactly one group.
        """
        return None

    def on_train_epoch_start(self, trainer_module: Any) -> None:
        """Called at the start of every training epoch (e.g. reset per-epoch statistics). Default: nothing."""
        return None

    def on_train_epoch_end(self, trainer_module: Any) -> None:
        """Called after every training epoch and its validation (e.g. decide on new layers). Default: nothing."""
        return None

    def before_optimizer_step(self, trainer_module: Any, optimizer: Any) -> None:
        """Called after backward, before each optimiser step; may modify ``p.grad`` in place. Default: nothing."""
        return None


def cxr_present(batch: dict[str, Tensor]) -> Tensor:
    """``has_cxr`` as a bool vector on the batch's device (accepts 0/1 floats too)."""
    has = batch["has_cxr"]
    return has if has.dtype == torch.bool else has > 0.5


def hide_xrays(present: Tensor, rate: float) -> Tensor:
    """``present`` with each True entry set False with probability ``rate`` (one draw per stay): the training-time
    X-ray dropout of DrFuse and ShaSpec. A hidden X-ray is then treated exactly like a missing one."""
    if rate <= 0:
        return present
    return present & (torch.rand(present.shape, device=present.device) >= rate)


def per_sample_task_loss(task: TaskSpec, logits: Tensor, y: Tensor) -> Tensor:
    """Task loss per sample ``[B]`` from logits: BCE (mean over labels) or cross-entropy.

    The framework's task loss is the mean of this; methods with auxiliary prediction heads (e.g. DrFuse) use it
    to weigh or mask per-sample losses, so every head is trained with the same loss as the final prediction.
    """
    if task.kind == "multiclass":
        return F.cross_entropy(logits.float(), y.reshape(-1).long(), reduction="none")
    target = y.reshape(logits.shape).to(torch.float32)
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(dim=1)


def masked_mean(values: Tensor, keep: Tensor | None, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the entries where ``keep`` is True (``keep`` None: every entry).

    ``keep`` has the leading shape of ``values`` (``[B]`` for per-sample losses, ``[B,T]`` for a sequence
    ``[B,T,D]``) and is broadcast over the trailing dimensions. ``dim`` None averages everything into a scalar
    (e.g. a loss over the stays that have an X-ray); ``dim=1`` pools a sequence over its kept steps. Entries with
    ``keep`` False get weight exactly 0, and an empty selection gives 0 (never NaN). The one masked mean of the
    models, so "1 = included" means the same everywhere.
    """
    if keep is None:
        return values.mean() if dim is None else values.mean(dim=dim)
    w = keep.to(values.dtype)
    while w.dim() < values.dim():
        w = w.unsqueeze(-1)
    w = w.expand_as(values)
    if dim is None:
        return (values * w).sum() / w.sum().clamp_min(1.0)
    return (values * w).sum(dim=dim) / w.sum(dim=dim).clamp_min(1.0)
