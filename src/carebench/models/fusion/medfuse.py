"""``medfuse``: MedFuse (Hayat, Geras & Shamout, MLHC 2022), LSTM-based fusion of EHR and chest X-ray features.

Mechanism (paper, and the authors' code nyuad-cai/MedFuse, read for reference only):
  * EHR encoder: a 2-layer unidirectional LSTM (hidden 256) over the hourly inputs (values and masks), last hidden
    state, dropout 0.3.
  * CXR encoder: ResNet-34 (ImageNet-initialised), global-pooled 512-d feature, projected by a linear layer to the
    EHR feature size (256).
  * Fusion: the two feature vectors form a sequence ``[EHR, CXR]`` read by a single-layer LSTM whose hidden size is
    the CXR feature size (512); its last hidden state goes to a linear classifier. A stay without an X-ray gives a
    sequence of length 1, ``[EHR]`` (packed sequences, per sample), so the missing image is never seen: this is
    MedFuse's way of handling partially paired data without imputation.
  * Staged recipe (the paper): the EHR encoder and the image encoder are first trained on their own, each with its
    own linear classifier, then the whole model is fine-tuned through the fusion LSTM. Here the two stages are the
    epochs of one run: for the first ``pretrain_epochs`` epochs the prediction is the EHR classifier's (trained by
    the framework's task loss) and the image classifier is trained on the stays that have an X-ray
    (``aux_losses["pretrain_cxr"]``); the fusion LSTM and its classifier are idle. From epoch ``pretrain_epochs`` on
    the prediction is the fusion's, the pretraining classifiers are frozen, and ``selection_start_epoch`` makes the
    framework select the checkpoint and count early stopping on the fusion stage only, and restart the lr
    schedule at ``fusion_lr_scale`` times the run's lr (0.13: the authors fine-tune the fusion at 7e-5 after
    pretraining the EHR LSTM at 5.4e-4). Outside the trainer (a fresh or loaded model) the model is in the fusion
    stage.
  * Optimiser: Adam with betas (0.9, 0.9), as the authors' trainer.

Deviations (docs/methods.md): the EHR inputs are our normalised values and masks (MedFuse used the 76-channel
mimic3-benchmarks discretiser); the image encoder is pretrained on the task's labels over the stays with an X-ray
(the paper uses the 14 radiology labels of MIMIC-CXR, which a user can supply as ``cxr_pretrained`` = a local
state_dict); the two stages share one optimiser and one run; the CXR encoder is grayscale (summed ImageNet conv1
filters); AdamW with the framework's weight decay instead of plain Adam.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from carebench.models.base import (
    BaseModel,
    ModelConfigError,
    ModelOutput,
    cxr_present,
    masked_mean,
    per_sample_task_loss,
)
from carebench.models.encoders import (
    CXR_QUICK,
    CXR_TEST,
    RESNET_ARCHS,
    EHRLSTMEncoder,
    ResNetEncoder,
    ehr_input,
    encode_present,
)
from carebench.models.registry import register


@register("medfuse")
class MedFuse(BaseModel):
    """EHR LSTM + projected CXR feature -> fusion LSTM over ``[EHR(, CXR)]`` -> linear classifier."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    missing_aware: ClassVar[bool] = True
    default_hparams: ClassVar[dict[str, Any]] = {
        "ehr_hidden": 256,
        "ehr_layers": 2,
        "dropout": 0.3,
        "cxr_backbone": "resnet34",
        "cxr_pretrained": "imagenet",
        "fusion_hidden": 512,
        "pretrain_epochs": 10,
        "fusion_lr_scale": 0.13,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "ehr_hidden": {"type": "categorical", "choices": [128, 256]},
        "ehr_layers": {"type": "int", "low": 1, "high": 2},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "fusion_hidden": {"type": "categorical", "choices": [256, 512]},
        "pretrain_epochs": {"type": "int", "low": 0, "high": 10},
        "fusion_lr_scale": {"type": "float", "low": 0.05, "high": 1.0, "log": True},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {
            # The best trial of an 8-trial `carebench tune` study on validation (synthetic default, phenotype, fold 1;
            # methods.md): one EHR layer (a 2-layer stack learns too slowly in 20 epochs), one pretraining epoch, a
            # fusion stage at nearly the full learning rate (at 0.13 it has not converged in 20 epochs).
            "ehr_layers": 1,
            "dropout": 0.316,
            **CXR_QUICK,
            "fusion_hidden": 256,
            "pretrain_epochs": 1,
            "fusion_lr_scale": 0.986,
        },
        "full": {},
        "test": {"ehr_hidden": 8, **CXR_TEST, "fusion_hidden": 8, "pretrain_epochs": 0},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        self.ehr_encoder = EHRLSTMEncoder(
            2 * n_features, h["ehr_hidden"], num_layers=h["ehr_layers"], project_input=False
        )
        self.ehr_dropout = nn.Dropout(h["dropout"])
        self.cxr_encoder = ResNetEncoder(self.choice("cxr_backbone", RESNET_ARCHS), h["cxr_pretrained"])
        self.cxr_proj = nn.Linear(self.cxr_encoder.out_dim, h["ehr_hidden"])
        self.fusion = nn.LSTM(h["ehr_hidden"], h["fusion_hidden"], batch_first=True)
        self.classifier = nn.Linear(h["fusion_hidden"], self.num_outputs)
        # The unimodal classifiers of the pretraining stage (frozen and unused in the fusion stage).
        self.ehr_head = nn.Linear(h["ehr_hidden"], self.num_outputs)
        self.cxr_head = nn.Linear(h["ehr_hidden"], self.num_outputs)
        if h["pretrain_epochs"] < 0:
            raise ModelConfigError(
                f"{self._label()}: pretrain_epochs must be >= 0, got {h['pretrain_epochs']}"
            )
        self.set_stage("fusion")

    @property
    def selection_start_epoch(self) -> int:
        return int(self.hparams["pretrain_epochs"])

    @property
    def last_stage_lr_scale(self) -> float:
        return float(self.hparams["fusion_lr_scale"])

    def set_stage(self, stage: str) -> None:
        """``"pretrain"`` (unimodal classifiers learn, the prediction is the EHR one) or ``"fusion"``."""
        self.stage = stage
        for head in (self.ehr_head, self.cxr_head):
            head.requires_grad_(stage == "pretrain")
        for part in (self.fusion, self.classifier):
            part.requires_grad_(stage == "fusion")

    def on_train_epoch_start(self, trainer_module: Any) -> None:
        self.set_stage("pretrain" if trainer_module.current_epoch < self.selection_start_epoch else "fusion")

    def configure_param_groups(self) -> list[dict[str, Any]]:
        # Every parameter (frozen ones included: a later stage unfreezes them); the authors' Adam betas.
        return [{"params": list(self.parameters()), "betas": (0.9, 0.9)}]

    def modality_sequence(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``[B,2,d]`` sequence ``[EHR, CXR]`` (CXR slot zero when missing) and its per-sample length (1 or 2)."""
        present = cxr_present(batch)
        ehr = self.ehr_dropout(self.ehr_encoder(ehr_input(batch), batch.get("ehr_lengths")))
        cxr = self.cxr_proj(encode_present(self.cxr_encoder, batch["cxr"], present, self.cxr_encoder.out_dim))
        cxr = torch.where(present[:, None], cxr, torch.zeros_like(cxr))
        return torch.stack([ehr, cxr.to(ehr.dtype)], dim=1), 1 + present.long()

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        seq, lengths = self.modality_sequence(batch)
        if self.stage == "pretrain":
            present = cxr_present(batch)
            ehr_logits, cxr_logits = self.ehr_head(seq[:, 0]), self.cxr_head(seq[:, 1])
            loss_cxr = masked_mean(per_sample_task_loss(self.task, cxr_logits, batch["y"]), present)
            return ModelOutput(
                ehr_logits, aux_losses={"pretrain_cxr": loss_cxr}, extra_logits={"ehr": ehr_logits}
            )
        packed = pack_padded_sequence(seq, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.fusion(packed)
        return ModelOutput(self.classifier(h_n[-1]))
