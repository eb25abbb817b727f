"""Fit and test one run and write its record; re-evaluate a finished run from its checkpoint.

The run record (what a finished run folder holds, how it is written atomically with its finish marker last) is
defined by
`carebench.runs`; this module fills it. A run whose record is complete is skipped (same config -> same run id).

Protocol (docs/training.md): seed everything, deterministic algorithms; AdamW + ReduceLROnPlateau on the
validation loss; early stopping and checkpoint selection on the task's validation selection metric
(`tasks.TaskSpec.selection_metric`); the best checkpoint is tested. A validation-only run (`evaluate_test`
false: a tuning trial) builds no test split and tests nothing; `on_validation` lets its study follow (and prune)
it epoch by epoch.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from carebench import __version__, atomic, runs
from carebench.data.folds import SPLITS
from carebench.data.loading import FoldData, StayDataset, make_loader
from carebench.data.store import ProcessedDataset, dataset_fingerprint, open_dataset
from carebench.models import BaseModel, ModelConfigError
from carebench.training.config import TrainConfig
from carebench.training.module import CareBenchModule
from carebench.training.predict import LoadedRun, build_model, load_fold, predict_frame


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    skipped: bool
    metrics: dict[str, Any]


def _filter_warnings() -> None:
    """Silence Lightning hints that do not apply: validation/test outputs are gathered across processes and
    de-duplicated before metrics (so `sync_dist` and the DistributedSampler padding are handled), and a
    single-process loader is the intended CPU setting."""
    for pattern in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*LeafSpec.*",
        ".*sync_dist=True.*",
        ".*all_gather is deprecated.*",
        ".*DistributedSampler.*",
        # cuDNN autotuning with deterministic algorithms on: it picks among the deterministic algorithms only
        # (run to run they may differ by float rounding; `cudnn_benchmark=false` pins one).
        ".*deterministic=True. and .benchmark=True.*",
    ):
        warnings.filterwarnings("ignore", pattern)


def _quiet() -> None:
    """Keep Lightning's console to warnings and errors (its info lines are noise without progress bars)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_module(cfg: TrainConfig, model: BaseModel, names: list[str]) -> CareBenchModule:
    return CareBenchModule(
        model,
        cfg.task,
        names=names,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        plateau_patience=cfg.plateau_patience,
        plateau_factor=cfg.plateau_factor,
    )


def training_split(cfg: TrainConfig, fold: FoldData) -> StayDataset:
    """The training split as the run trains on it: with train-time X-ray augmentation (seeded by the run's seed)
    when the run augments and its model reads the X-ray."""
    if cfg.augment and "cxr" in cfg.modalities:
        return fold.train.augmented(cfg.seed)
    return fold.train


def _selection_start(trainer: pl.Trainer) -> int:
    return int(trainer.lightning_module.model.selection_start_epoch)


class StagedCheckpoint(ModelCheckpoint):
    """Best-on-validation checkpoint that ignores the epochs before the model's last training stage."""

    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer) -> bool:
        return super()._should_skip_saving_checkpoint(trainer) or trainer.current_epoch < _selection_start(
            trainer
        )


class StagedEarlyStopping(EarlyStopping):
    """Early stopping that starts counting at the model's last training stage."""

    def _should_skip_check(self, trainer: pl.Trainer) -> bool:
        return super()._should_skip_check(trainer) or trainer.current_epoch < _selection_start(trainer)


class ValidationReport(Callback):
    """After each validation epoch of the model's last training stage, call `report(epoch, best)` with the best
    value of the selection metric so far, which is what the run would keep if it stopped now (the checkpoint
    rule). Epochs before the last stage (e.g. MedFuse's pretraining) are not reported: their metric is not the
    model's. `report` may raise (a pruned tuning trial) to stop the run; the exception leaves `fit`.

    Only the global-zero process reports (under DDP every rank sees the same gathered metric)."""

    def __init__(self, monitor: str, report: Callable[[int, float], None]) -> None:
        self.monitor = monitor
        self.report = report
        self.best = float("-inf")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch < _selection_start(trainer):
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and torch.isfinite(value):
            self.best = max(self.best, float(value))
        if trainer.is_global_zero and self.best > float("-inf"):
            self.report(int(trainer.current_epoch), self.best)


def _strategy(cfg: TrainConfig) -> str:
    # Fusion models can leave a head unused in a step (e.g. no X-ray in the batch): DDP must tolerate that.
    return "ddp_find_unused_parameters_true" if isinstance(cfg.devices, int) and cfg.devices > 1 else "auto"


def _on_gpu(cfg: TrainConfig) -> bool:
    return cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())


def _trainer(cfg: TrainConfig, root: Path, callbacks: list, logger: Any, n_batches: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=_strategy(cfg),
        precision=cfg.precision,
        max_epochs=cfg.max_epochs,
        min_epochs=cfg.min_epochs,
        callbacks=callbacks,
        logger=logger,
        deterministic="warn" if cfg.deterministic else False,
        benchmark=cfg.cudnn_benchmark and _on_gpu(cfg),
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, n_batches)),
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=str(root),
    )


def train_run(
    cfg: TrainConfig,
    runs_dir: str | Path,
    *,
    data: ProcessedDataset | None = None,
    on_validation: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Fit on the training split, select on validation, test the best checkpoint; write the run record.

    A validation-only run (`cfg.evaluate_test` false) builds its fold without the test split and records the
    best checkpoint's validation predictions and metric only. `on_validation(epoch, best_so_far)` is called
    after each validation epoch of the model's last stage (`ValidationReport`); if it raises, the run stops and
    the exception propagates (the partial run folder is removed, as for any failed run).
    """
    runs_dir = Path(runs_dir)
    run_id = cfg.run_id
    final = runs_dir / run_id
    if runs.is_done(runs_dir, run_id):
        return RunResult(run_id, final, True, runs.read_metrics(final))
    if data is None:
        data = open_dataset(cfg.data)
    runs.check_dataset(cfg.data_fingerprint, data.root, dataset_fingerprint(data.root), f"run {run_id} was")
    work = runs.partial_dir(runs_dir, run_id)
    if rank_zero_only.rank == 0:  # DDP re-launches this function in each process; only rank 0 writes
        runs.start_run(runs_dir, cfg.to_dict())
    try:
        return _fit_and_record(cfg, data, work, final, on_validation)
    except BaseException as e:
        if rank_zero_only.rank == 0:
            runs.abandon_run(work)  # a failed run leaves no partial folder behind
        if isinstance(e, OSError) and e.errno in atomic.WRITE_ERRNOS:
            raise atomic.write_failure(e, final, previous=False) from None
        raise


def _fit_and_record(
    cfg: TrainConfig,
    data: ProcessedDataset,
    work: Path,
    final: Path,
    on_validation: Callable[[int, float], None] | None,
) -> RunResult:
    run_id = cfg.run_id
    _filter_warnings()
    if not cfg.progress:
        _quiet()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    fold = load_fold(cfg, data)
    module = build_module(cfg, build_model(cfg, len(fold.features)), fold.outputs)
    if module.model.selection_start_epoch >= cfg.max_epochs:
        raise ModelConfigError(
            f"model {cfg.model!r}: its last training stage starts at epoch {module.model.selection_start_epoch} "
            f"(e.g. pretrain_epochs), but max_epochs is {cfg.max_epochs}; expected max_epochs > that epoch"
        )
    io = {"num_workers": cfg.num_workers, "pin_memory": _on_gpu(cfg)}
    train_loader = make_loader(
        training_split(cfg, fold), cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed, **io
    )
    val_loader = make_loader(fold.val, cfg.batch_size, shuffle=False, **io)
    monitor = f"val/{module.selection}"
    ckpt = StagedCheckpoint(
        dirpath=work / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    stop = StagedEarlyStopping(monitor=monitor, mode="max", patience=cfg.patience, check_finite=False)
    callbacks: list = [ckpt, stop] + ([RichProgressBar()] if cfg.progress else [])
    if on_validation is not None:
        callbacks.append(ValidationReport(monitor, on_validation))
    logger = CSVLogger(save_dir=str(work), name=runs.LOG_DIR, version="")
    trainer = _trainer(cfg, work, callbacks, logger, len(train_loader))
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    t_fit = time.perf_counter() - t0
    if cfg.evaluate_test:
        test_loader = make_loader(fold.test, cfg.batch_size, shuffle=False, **io)
        trainer.test(module, dataloaders=test_loader, ckpt_path="best", verbose=False, weights_only=True)
    t_test = time.perf_counter() - t0 - t_fit
    if not trainer.is_global_zero:
        return RunResult(run_id, final, False, {})

    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
    shutil.copyfile(ckpt.best_model_path, work / runs.CHECKPOINT)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    if cfg.evaluate_test:
        module.test_predictions.to_parquet(work / runs.PREDICTIONS, index=False)
    else:  # nothing was tested: the validation predictions below come from the best checkpoint's weights
        module.load_state_dict(best["state_dict"])
    # Decision thresholds (fairness, thresholded metrics) are chosen on validation, never on test: keep them.
    val = predict_frame(module.model, val_loader, cfg.task, names=fold.outputs, seed=cfg.seed)
    val.to_parquet(work / runs.VAL_PREDICTIONS, index=False)
    thresholds = runs.validation_thresholds(val, cfg.task)
    test_metrics = (
        runs.frame_metrics(module.test_predictions, cfg.task, thresholds) if cfg.evaluate_test else None
    )
    metrics = {
        "run_id": run_id,
        "model": cfg.model,
        "task": cfg.task,
        "cohort": cfg.cohort,
        "fold": cfg.fold,
        "seed": cfg.seed,
        "selection_metric": module.selection,
        "best_epoch": int(best["epoch"]),
        "epochs_trained": int(trainer.current_epoch),  # completed epochs
        "val_best": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "thresholds": runs.thresholds_record(cfg.task, fold.outputs, thresholds),
        "test": test_metrics,
        "splits": fold.summary(),
        "n_parameters": sum(p.numel() for p in module.model.parameters()),
        "timing_s": {"fit": round(t_fit, 3), "test": round(t_test, 3) if cfg.evaluate_test else None},
        "normalisation": fold.stats.to_dict(fold.features),
        "carebench_version": __version__,
        "torch_version": torch.__version__,
    }
    runs.write_json(work / runs.METRICS, metrics)
    return RunResult(run_id, runs.finish_run(work), False, runs.json_safe(metrics))


def evaluate_run(
    run_dir: str | Path, data_root: str | Path | None = None, *, accelerator: str = "cpu"
) -> dict[str, Any]:
    """Recompute the test metrics of a finished run from its checkpoint (and the dataset it was trained on).

    Runs on one device (CPU by default, so a GPU-trained run can be checked anywhere) with the run's precision.
    A validation-only run (a tuning trial) is tested here too: this is how a study's best trial is tested after
    the study, never during it.
    """
    _filter_warnings()
    _quiet()
    run = LoadedRun(run_dir, data_root, splits=SPLITS)
    cfg = run.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, run.model, run.fold.outputs)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=cfg.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic="warn" if cfg.deterministic else False,
    )
    trainer.test(module, dataloaders=make_loader(run.fold.test, cfg.batch_size, shuffle=False), verbose=False)
    # the thresholded metrics at the run's validation thresholds, chosen again by the same code
    val = predict_frame(
        run.model, make_loader(run.fold.val, cfg.batch_size, shuffle=False), cfg.task, names=run.fold.outputs,
        seed=cfg.seed,
    )  # fmt: skip
    thresholds = runs.validation_thresholds(val, cfg.task)
    return runs.json_safe(runs.frame_metrics(module.test_predictions, cfg.task, thresholds))
