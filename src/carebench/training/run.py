"""Fit and test one run and write its record; re-evaluate a finished run from its checkpoint.

Run record (DESIGN.md): `RUNS/<run_id>/` with `config.yaml` (resolved), `metrics.json`, `predictions.parquet`
(one row per test stay), `checkpoint` (Lightning checkpoint of the best validation epoch), `log/metrics.csv`
(per-epoch curves) and `DONE`. Everything is written into `RUNS/.<run_id>.partial/`, `DONE` last, and the
directory is renamed into place, so a killed run leaves no record that looks finished. A directory that exists
without `DONE` is deleted and the run is redone; one with `DONE` is skipped (same config -> same run id).

Protocol (docs/training.md): seed everything, deterministic algorithms; AdamW + ReduceLROnPlateau on the
validation loss; early stopping and checkpoint selection on the validation selection metric
(`metrics.SELECTION_METRIC`); the best checkpoint is tested.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from carebench import __version__
from carebench.data.loading import FoldData, build_fold, make_loader
from carebench.data.store import ProcessedDataset, open_dataset
from carebench.errors import UserError
from carebench.models import create_model, get_model_class
from carebench.training.config import TrainConfig, dataset_fingerprint
from carebench.training.module import CareBenchModule

DONE = "DONE"
CHECKPOINT = "checkpoint"
VAL_PREDICTIONS = "predictions_val.parquet"


class RunError(UserError, RuntimeError):
    """A run directory is incomplete or does not match the dataset it is evaluated on."""


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    skipped: bool
    metrics: dict[str, Any]


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


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
    ):
        warnings.filterwarnings("ignore", pattern)


def _quiet() -> None:
    """Keep Lightning's console to warnings and errors (its info lines are noise without progress bars)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_module(cfg: TrainConfig, n_features: int) -> CareBenchModule:
    model = create_model(cfg.model, cfg.task, n_features, cfg.image_size, **cfg.model_args)
    return CareBenchModule(
        model,
        cfg.task,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        plateau_patience=cfg.plateau_patience,
        plateau_factor=cfg.plateau_factor,
        augment=cfg.augment,
    )


def load_fold(cfg: TrainConfig, data: ProcessedDataset) -> FoldData:
    uses_cxr = "cxr" in get_model_class(cfg.model).modalities
    return build_fold(
        data,
        task=cfg.task,
        fold=cfg.fold,
        cohort=cfg.cohort,
        image_size=cfg.image_size,
        cxr_dropout_rates={
            "train": cfg.cxr_dropout_train,
            "val": cfg.cxr_dropout_val,
            "test": cfg.cxr_dropout_test,
        },
        cxr_dropout_seed=cfg.cxr_dropout_seed,
        load_cxr=uses_cxr,
    )


def _strategy(cfg: TrainConfig) -> str:
    # Fusion models can leave a head unused in a step (e.g. no X-ray in the batch): DDP must tolerate that.
    return "ddp_find_unused_parameters_true" if isinstance(cfg.devices, int) and cfg.devices > 1 else "auto"


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
        benchmark=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, n_batches)),
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=str(root),
    )


def train_run(cfg: TrainConfig, runs_dir: str | Path, *, data: ProcessedDataset | None = None) -> RunResult:
    """Fit on the training split, select on validation, test the best checkpoint; write the run record."""
    runs_dir = Path(runs_dir)
    run_id = cfg.run_id
    final = runs_dir / run_id
    if (final / DONE).is_file():
        with open(final / "metrics.json") as fh:
            return RunResult(run_id, final, True, json.load(fh))
    if data is None:
        data = open_dataset(cfg.data)
    if dataset_fingerprint(data.root) != cfg.data_fingerprint:
        raise RunError(f"{data.root}: the dataset's manifest differs from the configured fingerprint")
    work = runs_dir / f".{run_id}.partial"
    zero = rank_zero_only.rank == 0  # DDP re-launches this function in each process; only rank 0 writes
    if zero:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "config.yaml").write_text(cfg.to_yaml())
    _filter_warnings()
    if not cfg.progress:
        _quiet()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    fold = load_fold(cfg, data)
    module = build_module(cfg, len(fold.features))
    train_loader = make_loader(
        fold.train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed, num_workers=cfg.num_workers
    )
    val_loader = make_loader(fold.val, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    test_loader = make_loader(fold.test, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    monitor = f"val/{module.selection}"
    ckpt = ModelCheckpoint(
        dirpath=work / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    stop = EarlyStopping(monitor=monitor, mode="max", patience=cfg.patience, check_finite=False)
    callbacks: list = [ckpt, stop] + ([RichProgressBar()] if cfg.progress else [])
    logger = CSVLogger(save_dir=str(work), name="log", version="")
    trainer = _trainer(cfg, work, callbacks, logger, len(train_loader))
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    t_fit = time.perf_counter() - t0
    trainer.test(module, dataloaders=test_loader, ckpt_path="best", verbose=False)
    t_test = time.perf_counter() - t0 - t_fit
    if not trainer.is_global_zero:
        return RunResult(run_id, final, False, {})

    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
    shutil.copyfile(ckpt.best_model_path, work / CHECKPOINT)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    preds = module.test_predictions
    preds.to_parquet(work / "predictions.parquet", index=False)
    validation_predictions(module, val_loader, cfg.seed).to_parquet(work / VAL_PREDICTIONS, index=False)
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
        "test": module.test_metrics,
        "splits": fold.summary(),
        "n_parameters": sum(p.numel() for p in module.model.parameters()),
        "timing_s": {"fit": round(t_fit, 3), "test": round(t_test, 3)},
        "normalisation": fold.stats.to_dict(fold.features),
        "carebench_version": __version__,
        "torch_version": torch.__version__,
    }
    _write_json(work / "metrics.json", metrics)
    (work / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    if final.exists():
        shutil.rmtree(final)  # an unfinished earlier attempt (no DONE): replaced cleanly
    os.rename(work, final)
    return RunResult(run_id, final, False, _clean(metrics))


def validation_predictions(module: CareBenchModule, loader: Any, seed: int) -> pd.DataFrame:
    """The selected (best) model's validation predictions, same columns as predictions.parquet.

    Why: decision thresholds for fairness metrics must be chosen on validation, never on test, so the record
    keeps them. Computed as `evaluation.modality.RunPredictor.predict(split="val")` does (eval mode, float32,
    one process, dataset order, torch seeded with the run's seed), so for a 32-bit run both give the same frame.
    """
    from carebench.training.module import predictions_frame, probabilities

    model = module.model.eval()
    device = next(model.parameters()).device
    parts: list[dict[str, torch.Tensor]] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for batch in loader:
            out = model({k: v.to(device) for k, v in batch.items()})
            rec = {
                "stay_id": batch["stay_id"],
                "y": batch["y"],
                "has_cxr": batch["has_cxr"],
                "p": probabilities(module.kind, out.logits).cpu(),
            }
            rec.update(
                {f"p__{h}": probabilities(module.kind, lg).cpu() for h, lg in out.extra_logits.items()}
            )
            parts.append(rec)
    arr = {k: torch.cat([r[k] for r in parts]).numpy() for k in parts[0]}
    return predictions_frame(module.task, module.names, arr)


def evaluate_run(
    run_dir: str | Path, data_root: str | Path | None = None, *, accelerator: str = "cpu"
) -> dict[str, Any]:
    """Recompute the test metrics of a finished run from its checkpoint (and the dataset it was trained on).

    Runs on one device (CPU by default, so a GPU-trained run can be checked anywhere) with the run's precision.
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", CHECKPOINT):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir / name}: missing (expected a finished run directory with DONE)")
    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    root = Path(data_root) if data_root is not None else Path(cfg.data)
    data = open_dataset(root)
    if dataset_fingerprint(root) != cfg.data_fingerprint:
        raise RunError(
            f"{root}: not the dataset run {run_dir.name} was trained on (manifest fingerprint "
            f"{dataset_fingerprint(root)} != {cfg.data_fingerprint})"
        )
    _filter_warnings()
    _quiet()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    fold = load_fold(cfg, data)
    module = build_module(cfg, len(fold.features))
    state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
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
    trainer.test(module, dataloaders=make_loader(fold.test, cfg.batch_size, shuffle=False), verbose=False)
    return _clean(module.test_metrics)
