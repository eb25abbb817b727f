"""The resolved configuration of one training run, its presets, `key=value` overrides and its run id.

Why: a run is identified by what determines its result. `resolve_config` turns the CLI choices into one flat,
complete record (every training setting and every model hyper-parameter after preset and overrides), and
`runs.run_id` hashes it, so the same configuration always lands in the same directory and a finished run is
skipped. Settings that cannot change the result (the dataset's path, the number of loader workers, progress bars,
the model's modalities, which follow from its name) or change it by float rounding only (CPU threads, the image
encoders' memory layout, cuDNN autotuning) are recorded but not hashed (`runs.NOT_HASHED`); the dataset enters the
hash through its fingerprint (`data.store.dataset_fingerprint`).

Defaults that depend on the device (`precision: auto`, the loader workers) are resolved here, where the run is
configured, and recorded as concrete values.

This module imports neither torch nor Lightning at import time: the plan, the runner and the analysis read
configurations without paying for them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carebench import runs
from carebench.data.folds import COHORTS, N_FOLDS
from carebench.data.store import DatasetError, dataset_declarations, dataset_fingerprint
from carebench.errors import UserError
from carebench.tasks import TaskSpec

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-friendly: 64 px images, small encoders (model presets: resnet_small, 64-wide EHR encoders), batch 32,
    # <= 20 epochs and no X-ray augmentation. Measured on the synthetic default (docs/training.md "Presets"): with
    # the reference's affine augmentation a from-scratch CNN barely learns in this budget (X-ray-only AUROC on the
    # planted X-ray phenotypes 0.65-0.79 vs 0.85-0.90 without it, on stays with an image).
    "quick": {
        "image_size": 64,
        "batch_size": 32,
        "max_epochs": 20,
        "min_epochs": 1,
        "lr": 1e-3,
        "patience": 5,
        "plateau_patience": 2,
        "augment": False,
        "precision": "32-true",
    },
    # The paper setting (reference toolkit): 224 px, batch 16, <= 50 epochs, lr 1e-4, patience 10; bfloat16 mixed
    # precision where the device has bfloat16 units ("auto", `auto_precision`).
    "full": {
        "image_size": 224,
        "batch_size": 16,
        "max_epochs": 50,
        "min_epochs": 4,
        "lr": 1e-4,
        "patience": 10,
        "plateau_patience": 10,
        "precision": "auto",
    },
    # Smallest settings, for tests of the training loop.
    "test": {
        "image_size": 16,
        "batch_size": 32,
        "max_epochs": 2,
        "min_epochs": 1,
        "lr": 1e-3,
        "patience": 2,
        "plateau_patience": 1,
        "precision": "32-true",
    },
}
DEFAULT_PRESET = "quick"
_DEFAULT = PRESETS[DEFAULT_PRESET]
PRECISIONS = {
    "32": "32-true",
    "32-true": "32-true",
    "64": "64-true",
    "64-true": "64-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16-true": "bf16-true",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "auto": "auto",
}
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")


class ConfigError(UserError, ValueError):
    """A training option or `key=value` override is unknown or has a value of the wrong type."""


@dataclass
class TrainConfig:
    """Everything that defines a run. `model_args` holds the model's resolved hyper-parameters.

    The preset-owned settings default to the default preset's values (`PRESETS`), so each value is written once;
    `resolve_config` always applies a preset. The other defaults are the CLI's defaults too (cli.py reads them).
    """

    model: str
    task: str
    data: str
    data_fingerprint: str
    cohort: str = "base"
    fold: int = 1
    seed: int = 0
    preset: str = DEFAULT_PRESET
    image_size: int = _DEFAULT["image_size"]
    batch_size: int = _DEFAULT["batch_size"]
    max_epochs: int = _DEFAULT["max_epochs"]
    min_epochs: int = _DEFAULT["min_epochs"]
    lr: float = _DEFAULT["lr"]
    weight_decay: float = 0.01
    patience: int = _DEFAULT["patience"]
    plateau_patience: int = _DEFAULT["plateau_patience"]
    plateau_factor: float = 0.5
    augment: bool = True
    cxr_dropout_train: float = 0.0
    cxr_dropout_val: float = 0.0
    cxr_dropout_test: float = 0.0
    cxr_dropout_seed: int = 0
    accelerator: str = "cpu"
    devices: int | str = 1
    precision: str = _DEFAULT["precision"]
    deterministic: bool = True
    # Execution settings that change a result by float rounding at most (not hashed, like `threads`):
    channels_last: bool = True  # image encoders' weights (and so their activations) in NHWC memory layout
    cudnn_benchmark: bool = True  # cuDNN autotuning of convolutions on a GPU (no effect on CPU)
    num_workers: int = 0
    threads: int = 0  # torch CPU threads, 0 = torch's default
    progress: bool = True
    model_args: dict[str, Any] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)  # what the model reads (from its class; not hashed)
    # False: a validation-only run (a tuning trial): its fold is built without the test split, nothing is tested.
    evaluate_test: bool = True
    # Where the hyper-parameters came from: "defaults", or {study, storage, trial, value} (recorded, not hashed).
    hparams_source: Any = "defaults"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_id(self) -> str:
        """`<model>_<task>_f<fold>_s<seed>_<hash>` (`runs.run_id`)."""
        return runs.run_id(self.to_dict())

    def to_yaml(self) -> str:
        return runs.config_yaml(self.to_dict())

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], where: str | Path = "configuration") -> TrainConfig:
        """A configuration mapping (config.yaml without `run_id`) -> TrainConfig; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ConfigError(f"{where}: not a run configuration ({e})") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_mapping(runs.read_config(path), path)

    @classmethod
    def from_yaml_text(cls, text: str, where: str = "configuration") -> TrainConfig:
        return cls.from_mapping(runs.parse_config(text, where), where)


def _scalar(text: str) -> Any:
    """int, else float (YAML 1.1 would read `1e-4` as a string), else a YAML value."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings -> dict; values are read as YAML scalars (3, 1e-4, true, resnet18)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value (e.g. lr=1e-4 or model.hidden=128)")
        try:
            out[key.strip()] = _scalar(value.strip())
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot read the value ({e})") from None
    return out


_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_NOT_OVERRIDABLE = {
    "model",
    "task",
    "data",
    "data_fingerprint",
    "model_args",
    "preset",
    "modalities",
    "evaluate_test",
    "hparams_source",
}


def _coerce(key: str, value: Any) -> Any:
    default = TrainConfig.__dataclass_fields__[key].default
    if key == "devices":
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"option {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"option {key!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"option {key!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"option {key!r} must be a string, got {value!r}")
    return value


def resolve_config(
    *,
    data: str | Path,
    model: str,
    task: str,
    preset: str = "quick",
    options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults <- preset <- options (CLI flags) <- overrides (`key=value`), then validated.

    An override key is a training option (`lr`, `max_epochs`, ...) or a model hyper-parameter, either as
    `model.<name>` or bare when the name is not a training option.
    """
    from carebench.models import get_model_class  # torch import only when a run is configured

    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    fingerprint = data_fingerprint(data)
    dataset_task(data, task)
    try:
        cls = get_model_class(model)
    except UserError as e:
        raise ConfigError(f"--model {model}: {e}") from None
    values: dict[str, Any] = dict(PRESETS[preset])
    model_over: dict[str, Any] = {}
    for source in (options or {}, overrides or {}):
        for key, value in source.items():
            if value is None:
                continue
            if key.startswith("model."):
                model_over[key[len("model.") :]] = value
            elif key in _TRAIN_FIELDS and key not in _NOT_OVERRIDABLE:
                values[key] = _coerce(key, value)
            elif key in cls.default_hparams:
                model_over[key] = value
            else:
                raise ConfigError(
                    f"unknown option {key!r}; training options: "
                    f"{', '.join(sorted(set(_TRAIN_FIELDS) - _NOT_OVERRIDABLE))}; hyper-parameters of model "
                    f"{model!r}: {', '.join(sorted(cls.default_hparams))} (or model.<name>=value)"
                )
    values.setdefault("cxr_dropout_seed", values.get("seed", 0))
    if values.get("precision") == "auto":
        values["precision"] = auto_precision(str(values.get("accelerator", TrainConfig.accelerator)))
    if values.get("num_workers") is None:
        values["num_workers"] = auto_num_workers(str(values.get("accelerator", TrainConfig.accelerator)))
    cfg = TrainConfig(
        model=model,
        task=task,
        data=str(Path(data).absolute()),
        data_fingerprint=fingerprint,
        preset=preset,
        model_args=cls.resolve_hparams(model_over, preset=preset),
        modalities=list(cls.modalities),
        **values,
    )
    _validate(cfg)
    return cfg


def dataset_task(data: str | Path, task: str) -> TaskSpec:
    """The spec of `task` as the dataset at `--data` declares it (its own tasks registered for this process); an
    error naming --task when the dataset does not declare it."""
    try:
        declared = dataset_declarations(data).tasks
    except DatasetError as e:
        raise ConfigError(f"--data {data}: {e}") from None
    if task not in declared:
        raise ConfigError(
            f"--task {task!r}: the dataset {data} declares no such task; it declares {', '.join(declared)}"
        )
    return declared[task].spec


def data_fingerprint(data: str | Path) -> str:
    """The fingerprint of the dataset at `--data`; a path that is not a dataset is an error naming the option."""
    root = Path(data)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise ConfigError(
            f"--data {data}: {what} (expected a dataset directory written by `carebench prepare`)"
        )
    try:
        return dataset_fingerprint(root)
    except UserError as e:
        raise ConfigError(f"--data {data}: not a dataset ({e})") from None


def _device_kind(accelerator: str) -> str:
    """The device kind `accelerator` runs on here: "cpu", "gpu" or "mps" ("auto": a CUDA GPU if one is visible)."""
    import torch

    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if accelerator in ("gpu", "cuda") else accelerator


def native_bf16(accelerator: str) -> bool:
    """True when the device of `accelerator` computes bfloat16 matrix products in hardware: a CUDA GPU of compute
    capability >= 8.0 (or no GPU visible where the run is configured, e.g. a cluster's head node: every current
    GPU has them), a CPU with AMX or AVX512-BF16 instructions. Emulated bfloat16 is slower than float32."""
    import torch

    kind = _device_kind(accelerator)
    if kind == "gpu":
        return not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence the guards
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def auto_precision(accelerator: str) -> str:
    """`precision: auto`: bf16-mixed on a device with native bfloat16 (`native_bf16`), else 32-true."""
    return "bf16-mixed" if native_bf16(accelerator) else "32-true"


def auto_num_workers(accelerator: str) -> int:
    """DataLoader workers when none are given (docs/performance.md, "Loader"): on a GPU, up to 4 worker processes
    (one core left for the training process) prepare and augment batches while the device computes; on a CPU
    the loader is a few percent of a step and the cores are the step's own, so batches are built in the training
    process. Not part of the run id: batches do not depend on the number of workers (tested)."""
    if _device_kind(accelerator) != "gpu":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def _validate(cfg: TrainConfig) -> None:
    if cfg.cohort not in COHORTS:
        raise ConfigError(f"--cohort must be one of {COHORTS}, got {cfg.cohort!r}")
    if not 1 <= cfg.fold <= N_FOLDS:
        raise ConfigError(f"--fold must be 1..{N_FOLDS}, got {cfg.fold}")
    for split in ("train", "val", "test"):
        r = getattr(cfg, f"cxr_dropout_{split}")
        if not 0.0 <= r <= 1.0:
            raise ConfigError(f"--cxr-dropout-{split} must be in [0, 1], got {r}")
    for key in ("image_size", "batch_size", "max_epochs", "patience", "plateau_patience"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"option {key!r} must be >= 1, got {getattr(cfg, key)}")
    if cfg.num_workers < 0 or cfg.threads < 0:
        raise ConfigError("options 'num_workers' and 'threads' must be >= 0")
    if cfg.min_epochs < 0 or cfg.min_epochs > cfg.max_epochs:
        raise ConfigError(f"option 'min_epochs' must be in [0, max_epochs], got {cfg.min_epochs}")
    if cfg.lr <= 0 or cfg.weight_decay < 0 or not 0 < cfg.plateau_factor < 1:
        raise ConfigError("options need lr > 0, weight_decay >= 0 and 0 < plateau_factor < 1")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {sorted(PRECISIONS)}, got {cfg.precision!r}")
    cfg.precision = PRECISIONS[cfg.precision]
    if cfg.accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator must be one of {ACCELERATORS}, got {cfg.accelerator!r}")
    if isinstance(cfg.devices, str) and cfg.devices.isdigit():
        cfg.devices = int(cfg.devices)
    if not (isinstance(cfg.devices, int) and cfg.devices >= 1) and cfg.devices != "auto":
        raise ConfigError(f"--devices must be a positive integer or 'auto', got {cfg.devices!r}")
