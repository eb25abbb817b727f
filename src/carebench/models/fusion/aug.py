"""``aug``: AUG, sustained boosting with adaptive classifier assignment (Jiang, Huang & Yang, "Rethinking Multimodal
Learning from the Perspective of Mitigating Classification Ability Disproportion", NeurIPS 2025, arXiv 2502.20120;
authors' code njustkmg/NeurIPS25-AUG, read for reference only).

Idea: modality imbalance comes from a disproportion in the *classification ability* of the modalities. Each
modality is trained as its own classifier (never through the fused prediction), and the weaker one receives extra
classifier layers, trained as a sustained boosting ensemble, until the two abilities match.

Mechanism:
  * Encoders: EHR (transformer or LSTM) and X-ray (ResNet). Per modality a base classifier
    ``embed_m = Linear(feature_m -> head_dim) + ReLU`` followed by ``fc_out = Linear(head_dim -> C)``, which is
    **shared** by both modalities and by every added layer.
  * Configurable classifier: an added layer is ``Linear(feature_m -> head_dim) + ReLU`` on the raw encoder feature,
    read out by the shared ``fc_out`` (Xavier-normal weights, zero bias). A modality's logits are the sum of its base
    logits and all its added layers' logits; ``prev`` is that sum without the newest layer, ``add`` the newest
    layer's logits.
  * Sustained boosting loss per modality (classification and residual errors):
    without added layers ``L(out)``; with them ``L(out) + L(prev) + L_res(add)``, where the residual term weighs the
    new layer's loss per stay (and label) by ``1 - rho * p_prev(true label)`` with ``p_prev`` from the detached
    ``prev``: the new layer concentrates on what the ensemble so far gets wrong. For cross-entropy this equals the
    authors' ``CE(add, y) - rho * CE(add, y * softmax(prev))``; for the binary/multi-label BCE tasks the same
    weighting is applied per label.
  * Adaptive classifier assignment (ACA), per epoch: each modality's score is the sum over training stays of the
    probability its logits give the true label (mean over labels for phenotypes). After epoch 0 and every
    ``check_interval`` epochs, ``ratio = score_ehr / score_cxr``: ``ratio > lam + margin`` adds a layer to the
    X-ray classifier, ``ratio < lam - margin`` to the EHR classifier. The layer is created when the next epoch
    starts and its parameters are registered with the running optimiser (``module.add_trainable_parameters``), so it
    is trained from that epoch's first step on.
  * Prediction: ``alpha * logits_ehr + (1 - alpha) * logits_cxr``.

Missing X-ray (per stay): the X-ray classifier's loss and ACA score use only stays with an image (the score ratio
is computed on those stays for both modalities, so the ratio compares the two classifiers on the same stays), and
the prediction of a stay without an image is its EHR logits. Missing images are never encoded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.models.base import BaseModel, ModelConfigError, ModelOutput, TaskSpec, cxr_present, masked_mean
from carebench.models.encoders import (
    CXR_QUICK,
    CXR_TEST,
    TRANSFORMER_RESNET_DEFAULTS,
    ehr_input,
    encode_present,
    transformer_resnet_encoders,
)
from carebench.models.registry import register

MODALITIES = ("ehr", "cxr")


def true_label_probability(task: TaskSpec, logits: Tensor, y: Tensor) -> Tensor:
    """Probability given to the true label: ``[B]`` (softmax of the true class) or ``[B, C]`` per label
    (``y * p + (1 - y) * (1 - p)``) for binary and multi-label tasks."""
    if task.kind == "multiclass":
        return torch.softmax(logits.float(), dim=-1).gather(1, y.reshape(-1, 1).long())[:, 0]
    p = torch.sigmoid(logits.float())
    t = y.reshape(logits.shape).float()
    return t * p + (1.0 - t) * (1.0 - p)


def sample_score(task: TaskSpec, logits: Tensor, y: Tensor) -> Tensor:
    """ACA score of each stay ``[B]``: true-label probability (mean over labels for multi-label tasks)."""
    p = true_label_probability(task, logits, y)
    return p if p.dim() == 1 else p.mean(dim=1)


def boosting_loss(
    task: TaskSpec, out: Tensor, prev: Tensor | None, add: Tensor | None, y: Tensor, rho: float
) -> Tensor:
    """Sustained boosting loss per stay ``[B]``: ``L(out)`` or ``L(out) + L(prev) + L_residual(add)``."""
    if task.kind == "multiclass":

        def loss(z: Tensor, w: Tensor | float = 1.0) -> Tensor:
            return w * F.cross_entropy(z.float(), y.reshape(-1).long(), reduction="none")
    else:
        target = y.reshape(out.shape).float()

        def loss(z: Tensor, w: Tensor | float = 1.0) -> Tensor:
            return (w * F.binary_cross_entropy_with_logits(z.float(), target, reduction="none")).mean(dim=1)

    total = loss(out)
    if add is None or prev is None:
        return total
    residual_weight = 1.0 - rho * true_label_probability(task, prev.detach(), y)
    return total + loss(prev) + loss(add, residual_weight)


@register("aug")
class AUG(BaseModel):
    """Per-modality classifiers with a shared output layer, boosted by layers added to the weaker modality."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    train_task_loss: ClassVar[bool] = False  # each modality is trained on its own boosting loss (aux_losses)
    default_hparams: ClassVar[dict[str, Any]] = {
        **TRANSFORMER_RESNET_DEFAULTS,
        "head_dim": 256,
        "alpha": 0.6,
        "lam": 1.0,
        "margin": 0.01,
        "check_interval": 5,
        "rho": 0.5,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "alpha": {"type": "float", "low": 0.2, "high": 0.8},
        "lam": {"type": "float", "low": 0.8, "high": 1.2},
        "margin": {"type": "float", "low": 0.005, "high": 0.05},
        "check_interval": {"type": "categorical", "choices": [5, 10, 15]},
        "rho": {"type": "float", "low": 0.1, "high": 0.9},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"ehr_hidden": 64, **CXR_QUICK, "head_dim": 64, "check_interval": 1},
        "full": {},
        "test": {"ehr_hidden": 8, "ehr_heads": 2, **CXR_TEST, "head_dim": 8, "check_interval": 1},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        if not 0.0 <= h["alpha"] <= 1.0:
            raise ModelConfigError(f"{self._label()}: alpha must be in [0, 1], got {h['alpha']}")
        if h["check_interval"] < 1:
            raise ModelConfigError(f"{self._label()}: check_interval must be >= 1, got {h['check_interval']}")
        self.ehr_encoder, self.cxr_encoder = transformer_resnet_encoders(self)
        self.feature_dims = {"ehr": self.ehr_encoder.out_dim, "cxr": self.cxr_encoder.out_dim}
        self.embed = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(self.feature_dims[m], h["head_dim"]), nn.ReLU()) for m in MODALITIES}
        )
        self.fc_out = nn.Linear(h["head_dim"], self.num_outputs)
        self.extra = nn.ModuleDict({m: nn.ModuleList() for m in MODALITIES})
        self.scores = {m: 0.0 for m in MODALITIES}  # ACA scores of the current epoch (stays with an X-ray)
        self.assignments: list[tuple[int, str]] = []  # (epoch decided, modality) of every added layer
        self.pending: tuple[int, str] | None = (
            None  # decided after an epoch, created when the next one starts
        )

    # ----------------------------------------------------------------------------------- classifiers
    def new_layer(self, modality: str) -> nn.Linear:
        """A boosting layer for ``modality`` on the device and dtype of the shared output layer."""
        layer = nn.Linear(self.feature_dims[modality], self.hparams["head_dim"])
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer.to(device=self.fc_out.weight.device, dtype=self.fc_out.weight.dtype)

    def add_layer(self, modality: str, trainer_module: Any = None) -> nn.Linear:
        """Append a boosting layer to ``modality``'s classifier; register it with the running optimiser if any."""
        layer = self.new_layer(modality)
        self.extra[modality].append(layer)
        if trainer_module is not None:
            trainer_module.add_trainable_parameters(list(layer.parameters()))
        return layer

    def classify(self, modality: str, feat: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(out, prev, add)``: all layers' logits summed, the sum without the newest layer, the newest layer's."""
        out = self.fc_out(self.embed[modality](feat))
        prev = add = None
        for layer in self.extra[modality]:
            prev, add = out, self.fc_out(F.relu(layer(feat)))
            out = prev + add
        return out, prev, add

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        present = cxr_present(batch)
        f_ehr = self.ehr_encoder(ehr_input(batch), batch.get("ehr_lengths"))
        f_cxr = encode_present(self.cxr_encoder, batch["cxr"], present, self.cxr_encoder.out_dim).to(
            f_ehr.dtype
        )
        out_e, prev_e, add_e = self.classify("ehr", f_ehr)
        out_c, prev_c, add_c = self.classify("cxr", f_cxr)
        alpha = self.hparams["alpha"]
        logits = torch.where(present[:, None], alpha * out_e + (1.0 - alpha) * out_c, out_e)
        y, rho = batch["y"], self.hparams["rho"]
        aux = {
            "boost_ehr": boosting_loss(self.task, out_e, prev_e, add_e, y, rho).mean(),
            "boost_cxr": masked_mean(boosting_loss(self.task, out_c, prev_c, add_c, y, rho), present),
        }
        return ModelOutput(logits, aux_losses=aux, extra_logits={"ehr": out_e, "cxr": out_c})

    # ------------------------------------------------------------------ adaptive classifier assignment
    def assign(self, ratio: float, epoch: int) -> str | None:
        """The modality that receives a new layer after ``epoch`` given ``score_ehr / score_cxr``, or None."""
        interval, lam, margin = self.hparams["check_interval"], self.hparams["lam"], self.hparams["margin"]
        if not (epoch == 0 or (epoch + 1) % interval == 0):
            return None
        if ratio > lam + margin:
            return "cxr"  # the EHR classifier is stronger: boost the X-ray classifier
        if ratio < lam - margin:
            return "ehr"
        return None

    def on_train_epoch_start(self, trainer_module: Any) -> None:
        """Create the layer decided after the previous epoch (so every checkpoint, saved at an epoch's end, holds
        exactly the layers that were validated) and reset the epoch's ACA scores."""
        if trainer_module.trainer.world_size > 1:
            raise ModelConfigError(
                f"{self._label()} adds classifier layers during training, which DistributedDataParallel cannot "
                "synchronise across processes; train it with --devices 1"
            )
        if self.pending is not None:
            epoch, modality = self.pending
            self.add_layer(modality, trainer_module)
            self.assignments.append((epoch, modality))
            self.pending = None
        self.scores = {m: 0.0 for m in MODALITIES}

    def training_hook(
        self, trainer_module: Any, batch: dict[str, Tensor], output: ModelOutput, loss: Tensor
    ) -> None:
        """Accumulate the epoch's ACA scores on the stays with an X-ray (both modalities on the same stays)."""
        present = cxr_present(batch)
        with torch.no_grad():
            for m in MODALITIES:
                self.scores[m] += float(
                    sample_score(self.task, output.extra_logits[m], batch["y"])[present].sum()
                )

    def on_train_epoch_end(self, trainer_module: Any) -> None:
        epoch = trainer_module.current_epoch
        if self.scores["cxr"] <= 0.0:  # no stay with an X-ray this epoch: nothing to compare
            return
        ratio = self.scores["ehr"] / self.scores["cxr"]
        trainer_module.log("train/aug_score_ratio", ratio)
        modality = self.assign(ratio, epoch)
        if modality is not None:
            self.pending = (epoch, modality)
        for m in MODALITIES:
            trainer_module.log(f"train/aug_layers_{m}", float(len(self.extra[m])))

    # ------------------------------------------------------------------------------- checkpoints
    def _load_from_state_dict(
        self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Rebuild as many boosting layers as the checkpoint holds before its tensors are copied in, so the best
        checkpoint (or a finished run, re-evaluated) loads into a model with the layers it was saved with."""
        for m in MODALITIES:
            head = f"{prefix}extra.{m}."
            n = len({key[len(head) :].split(".", 1)[0] for key in state_dict if key.startswith(head)})
            while len(self.extra[m]) < n:
                self.extra[m].append(self.new_layer(m))
            while len(self.extra[m]) > n:
                del self.extra[m][-1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
