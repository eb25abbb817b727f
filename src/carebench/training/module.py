"""The LightningModule around any registered model: task loss, probabilities, metrics, optimiser, schedule.

Why one module for every method: the framework, not the model, computes the task loss from logits
(BCE-with-logits for mortality and phenotype, cross-entropy for LOS) plus the sum of the model's `aux_losses`, and
turns logits into probabilities (sigmoid / softmax) before any metric. A method with a special procedure uses
`BaseModel.training_hook` (called after the loss, before backward), the epoch and pre-step hooks and
`configure_param_groups`, never its own loop, so devices, precision, checkpointing and early stopping work the
same for all methods.

Validation and test outputs are gathered across processes (DDP) and de-duplicated by `stay_id` (the distributed
sampler pads splits by repeating stays) before metrics, so every rank sees the metrics of the whole split.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from carebench import runs
from carebench.evaluation.metrics import compute_metrics, epoch_metrics
from carebench.models.base import BaseModel, ModelOutput
from carebench.tasks import default_output_names, get_task
from carebench.training.predict import probabilities


def task_loss(kind: str, logits: Tensor, y: Tensor) -> Tensor:
    """BCE-with-logits (binary, multilabel) or cross-entropy (multiclass), in float32."""
    if kind == "multiclass":
        return F.cross_entropy(logits.float(), y.long())
    return F.binary_cross_entropy_with_logits(logits.float(), y.float())


class CareBenchModule(pl.LightningModule):
    def __init__(
        self,
        model: BaseModel,
        task: str,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        plateau_patience: int = 2,
        plateau_factor: float = 0.5,
        names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.spec = get_task(task)
        self.kind = self.spec.kind
        self.names = list(names) if names is not None else default_output_names(self.spec)
        self.lr, self.weight_decay = lr, weight_decay
        self.plateau_patience, self.plateau_factor = plateau_patience, plateau_factor
        self.selection = self.spec.selection_metric
        self._outputs: list[dict[str, Tensor]] = []
        self.val_metrics: dict[str, float] = {}
        self.test_metrics: dict[str, Any] = {}
        self.test_predictions: pd.DataFrame | None = None

    # ------------------------------------------------------------------------------------------- steps
    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        return self.model(batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(batch)
        loss = task_loss(self.kind, out.logits, batch["y"])
        bs = len(batch["y"])
        self.log("train/task_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=bs)
        if not self.model.train_task_loss:  # the method's aux losses are its whole objective (e.g. AUG)
            loss = loss.detach() * 0.0
        for name, aux in out.aux_losses.items():
            loss = loss + aux
            self.log(f"train/aux_{name}", aux.detach(), on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, batch_size=bs, prog_bar=True)
        self.model.training_hook(self, batch, out, loss)
        return loss

    # Model training hooks (BaseModel docstring): per-epoch state and gradient changes before the step.
    def on_train_epoch_start(self) -> None:
        start = self.model.selection_start_epoch
        if start > 0 and self.current_epoch == start:
            self.restart_schedule()
        self.model.on_train_epoch_start(self)

    def restart_schedule(self) -> None:
        """A new training stage starts (BaseModel.selection_start_epoch): every param group gets back the lr it
        started with times the model's ``last_stage_lr_scale``, and the plateau scheduler forgets its best loss and
        bad epochs (the last stage's validation loss is not comparable with the previous stage's). Adam's moment
        estimates are kept."""
        scale = float(self.model.last_stage_lr_scale)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = group.get("stage_lr", group["lr"]) * scale
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.best, sched.num_bad_epochs, sched.cooldown_counter = sched.mode_worse, 0, 0

    def on_train_epoch_end(self) -> None:
        self.model.on_train_epoch_end(self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after backward (and after unscaling under 16-bit AMP), before `optimizer.step()`.
        self.model.before_optimizer_step(self, optimizer)

    def add_trainable_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Register parameters a model created during training (AUG's boosting layers) with the running optimiser.

        They join as a new param group with the current learning rate and weight decay of the first group (so a
        plateau-reduced lr applies to them too); ReduceLROnPlateau extends its per-group minimum lr itself. Before
        `fit` (no trainer or optimiser yet) there is nothing to do: `configure_optimizers` will see them.
        """
        if self._trainer is None or not self.trainer.optimizers:
            return
        for opt in self.trainer.optimizers:
            ref = opt.param_groups[0]
            opt.add_param_group(
                {"params": list(params), "lr": ref["lr"], "weight_decay": ref["weight_decay"]}
            )

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        out = self.model(batch)
        loss = task_loss(self.kind, out.logits, batch["y"])
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=len(batch["y"]),
            sync_dist=True,
            prog_bar=stage == "val",
        )
        rec = {
            "stay_id": batch["stay_id"],
            "y": batch["y"],
            "has_cxr": batch["has_cxr"].to(torch.uint8),
            "p": probabilities(self.kind, out.logits),
        }
        for head, logits in out.extra_logits.items():
            rec[f"p__{head}"] = probabilities(self.kind, logits)
        self._outputs.append({k: v.detach() for k, v in rec.items()})

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    # -------------------------------------------------------------------------------------- epoch ends
    def _collect(self) -> dict[str, np.ndarray]:
        """Concatenate this epoch's outputs, gather them from all processes, drop padded duplicates."""
        keys = self._outputs[0].keys() if self._outputs else ()
        cat = {k: torch.cat([o[k] for o in self._outputs]) for k in keys}
        self._outputs = []
        if self.trainer.world_size > 1:
            cat = {k: v.reshape(-1, *v.shape[2:]) for k, v in self.all_gather(cat).items()}
        arrays = {
            k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in cat.items()
        }
        if not arrays:
            return arrays
        _, first = np.unique(arrays["stay_id"], return_index=True)
        return {k: v[np.sort(first)] for k, v in arrays.items()}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._outputs = []
            return
        arr = self._collect()
        if not arr:
            return
        self.val_metrics = epoch_metrics(self.task, arr["y"], arr["p"])
        others = [k for k in self.spec.logged if k != self.selection]
        self.log_dict({f"val/{k}": self.val_metrics[k] for k in others}, prog_bar=False)
        self.log(f"val/{self.selection}", self.val_metrics[self.selection], prog_bar=True)

    def on_test_epoch_end(self) -> None:
        """Test metrics and predictions. The thresholded metrics here are at 0.5: a run records them at its
        validation thresholds instead (`runs.frame_metrics`, called by training.run on these predictions)."""
        arr = self._collect()
        if not arr:
            return
        metrics: dict[str, Any] = compute_metrics(self.task, arr["y"], arr["p"], self.names)
        heads = sorted(k[len("p__") :] for k in arr if k.startswith("p__"))
        for head in heads:
            metrics[f"head:{head}"] = compute_metrics(self.task, arr["y"], arr[f"p__{head}"], self.names)
        self.test_metrics = metrics
        self.test_predictions = runs.predictions_frame(self.task, self.names, arr)
        self.log(f"test/{self.selection}", metrics[self.selection])

    # ----------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.model.configure_param_groups()
        params = groups if groups else [p for p in self.model.parameters() if p.requires_grad]
        # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop and equally exact.
        fused = all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
            for p in self.model.parameters()
        )
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused or None)
        for group in opt.param_groups:  # the lr each group starts with, restored when a new stage starts
            group["stage_lr"] = group["lr"]
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=self.plateau_factor, patience=self.plateau_patience
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"},
        }
