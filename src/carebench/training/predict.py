"""A trained model's predictions of one split, and a finished run's model loaded back (torch, no Lightning).

Why one place: the validation predictions a run records (for thresholds chosen on validation) and every
re-prediction of the analysis (ablations, test-time X-ray dropout) must be computed by the same code, so the two
agree exactly for a 32-bit run. Predictions are made in eval mode, without gradients, one process, in dataset
order, in float32, with torch's RNG forked and seeded with the run's seed (a model that samples at eval time is
still deterministic), and written in the run record's predictions format (`runs.predictions_frame`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from carebench import runs
from carebench.data.folds import SPLITS
from carebench.data.loading import FoldData, build_fold
from carebench.data.store import ProcessedDataset, dataset_fingerprint, open_dataset
from carebench.models import BaseModel, create_model, get_model_class
from carebench.tasks import get_task
from carebench.training.config import TrainConfig

Batch = dict[str, Tensor]


def probabilities(kind: str, logits: Tensor) -> Tensor:
    """Sigmoid (binary, multilabel) or softmax over classes (multiclass), in float32."""
    return torch.softmax(logits.float(), dim=-1) if kind == "multiclass" else torch.sigmoid(logits.float())


def build_model(cfg: TrainConfig, n_features: int) -> BaseModel:
    """The run's model with its resolved hyper-parameters (freshly initialised).

    With `cfg.channels_last` every 4-d weight (the image encoders' convolutions) is stored channels-last (NHWC),
    so convolutions, batch norm and pooling run in oneDNN's / cuDNN's preferred layout and their activations stay
    in it; loading a checkpoint copies into these tensors and keeps the layout. The X-ray input [B, 1, S, S] has
    one channel, so it is channels-last already. Same arithmetic, other kernels: outputs agree with the default
    layout to float rounding (tests/models/test_precision.py).
    """
    model = create_model(cfg.model, cfg.task, n_features, cfg.image_size, **cfg.model_args)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run_splits(cfg: TrainConfig) -> tuple[str, ...]:
    """The splits a run builds: train, val and test, or train and val for a validation-only run (a trial)."""
    return SPLITS if cfg.evaluate_test else ("train", "val")


def load_fold(cfg: TrainConfig, data: ProcessedDataset, splits: tuple[str, ...] | None = None) -> FoldData:
    """The run's fold: its cohort, training statistics and the train/val/test X-ray dropout it was run with.

    `splits`: the splits to build; default `run_splits(cfg)` (a validation-only run never builds its test split).
    """
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
        splits=run_splits(cfg) if splits is None else splits,
    )


def predict_frame(
    model: nn.Module,
    batches: Iterable[Batch],
    task: str,
    *,
    names: list[str],
    seed: int,
    transform: Callable[[Batch], Batch] | None = None,
) -> pd.DataFrame:
    """The model's predictions of every batch (optionally `transform`ed first), as a predictions frame whose
    output columns are `names` (the dataset's output names of the task, `FoldData.outputs`)."""
    kind = get_task(task).kind
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: list[dict[str, Tensor]] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for batch in batches:
            if transform is not None:
                batch = transform(batch)
            out = model({k: v.to(device) for k, v in batch.items()})
            rec = {
                "stay_id": batch["stay_id"],
                "y": batch["y"],
                "has_cxr": batch["has_cxr"],
                "p": probabilities(kind, out.logits).cpu(),
            }
            rec.update({f"p__{h}": probabilities(kind, lg).cpu() for h, lg in out.extra_logits.items()})
            parts.append(rec)
    model.train(was_training)
    arrays = {k: torch.cat([r[k] for r in parts]).numpy() for k in parts[0]}
    return runs.predictions_frame(task, names, arrays)


class LoadedRun:
    """A finished run's configuration, dataset, fold and model with its best checkpoint's weights (eval mode).

    The dataset is the one in the run's config unless `data_root` is given; it must have the fingerprint the run
    recorded. The fold has the run's training statistics and train/val/test X-ray dropout; `splits` (default: the
    run's own, `run_splits`) lets the analysis test a validation-only trial after its study has finished.
    """

    def __init__(
        self,
        run_dir: str | Path,
        data_root: str | Path | None = None,
        *,
        device: str = "cpu",
        splits: tuple[str, ...] | None = None,
    ) -> None:
        self.record = runs.read_run(run_dir)
        if not self.record.has_checkpoint:
            raise runs.RunsError(
                f"{self.record.path / runs.CHECKPOINT}: missing (the run kept no checkpoint)"
            )
        self.cfg = TrainConfig.from_mapping(self.record.config, self.record.path / runs.CONFIG)
        root = Path(data_root) if data_root is not None else Path(self.cfg.data)
        self.data = open_dataset(root)
        runs.check_dataset(
            self.cfg.data_fingerprint, root, dataset_fingerprint(root), f"run {self.run_id} was"
        )
        self.fold = load_fold(self.cfg, self.data, splits)
        self.model = build_model(self.cfg, len(self.fold.features))
        self.model.load_state_dict(checkpoint_state(self.record.path / runs.CHECKPOINT))
        self.device = torch.device(device)
        self.model.eval().to(self.device)

    @property
    def run_id(self) -> str:
        return self.record.run_id


def checkpoint_state(path: Path) -> dict[str, Tensor]:
    """The model's weights in a run's checkpoint (the LightningModule's state without its ``model.`` prefix).

    Loaded with ``weights_only=True``: a checkpoint is a file anyone could have put in a runs directory, and a
    pickle that is more than tensors and plain containers could run code when unpickled; such a file is refused.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise runs.RunsError(
            f"{path}: not a loadable checkpoint ({type(e).__name__}: {reason}); expected the tensors-only "
            "checkpoint written by `carebench train` (checkpoints are loaded with weights_only, so a file that "
            "needs arbitrary code to unpickle is refused)"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise runs.RunsError(f"{path}: not a carebench checkpoint (expected a mapping with a 'state_dict')")
    state = ckpt["state_dict"]
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
