"""Unimodal baselines: ``lstm`` and ``transformer`` (EHR only) and ``resnet`` (chest X-ray only).

They answer the first benchmark question (does fusion help?) so they use the same encoders as the fusion methods.
The ``resnet`` baseline must still predict for a stay without an X-ray: it outputs a learned per-class "no image"
logit vector for those stays (the best constant prediction for imageless stays, learned from the training data),
rather than running the CNN on a blank image as the reference toolkit did.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from carebench.models.base import BaseModel, ModelOutput, cxr_present
from carebench.models.encoders import (
    RESNET_ARCHS,
    EHRLSTMEncoder,
    EHRTransformerEncoder,
    ResNetEncoder,
    ehr_input,
    encode_present,
)
from carebench.models.registry import register

_DROPOUT = {"type": "float", "low": 0.0, "high": 0.5}


@register("lstm")
class LSTMBaseline(BaseModel):
    """EHR LSTM: ``Linear(2F -> hidden)`` -> (bi)LSTM -> last hidden state -> dropout -> linear head."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr",)
    default_hparams: ClassVar[dict[str, Any]] = {
        "hidden": 256,
        "layers": 1,
        "bidirectional": True,
        "dropout": 0.2,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "hidden": {"type": "categorical", "choices": [64, 128, 256]},
        "layers": {"type": "int", "low": 1, "high": 2},
        "bidirectional": {"type": "categorical", "choices": [True, False]},
        "dropout": _DROPOUT,
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"hidden": 64},
        "full": {},
        "test": {"hidden": 8},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        self.encoder = EHRLSTMEncoder(
            2 * n_features, h["hidden"], h["layers"], bidirectional=h["bidirectional"], dropout=h["dropout"]
        )
        self.head = nn.Sequential(nn.Dropout(h["dropout"]), nn.Linear(self.encoder.out_dim, self.num_outputs))

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        return ModelOutput(self.head(self.encoder(ehr_input(batch), batch.get("ehr_lengths"))))


@register("transformer")
class TransformerBaseline(BaseModel):
    """EHR Transformer: ``Linear(2F -> d)`` + positions -> post-LN encoder -> masked mean -> dropout -> head."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr",)
    default_hparams: ClassVar[dict[str, Any]] = {
        "d_model": 256,
        "heads": 4,
        "layers": 1,
        "ff_mult": 4,
        "dropout": 0.2,
        "positional": "learned",
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "d_model": {"type": "categorical", "choices": [64, 128, 256]},
        "heads": {"type": "categorical", "choices": [2, 4, 8]},
        "layers": {"type": "int", "low": 1, "high": 3},
        "dropout": _DROPOUT,
        "positional": {"type": "categorical", "choices": ["learned", "sinusoidal"]},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"d_model": 64},
        "full": {},
        "test": {"d_model": 8, "heads": 2, "ff_mult": 2},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        self.choice("positional", ("learned", "sinusoidal"))
        self.encoder = EHRTransformerEncoder(
            2 * n_features,
            h["d_model"],
            h["heads"],
            h["layers"],
            h["dropout"],
            h["ff_mult"] * h["d_model"],
            positional=h["positional"],
        )
        self.head = nn.Sequential(nn.Dropout(h["dropout"]), nn.Linear(h["d_model"], self.num_outputs))

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        return ModelOutput(self.head(self.encoder(ehr_input(batch), batch.get("ehr_lengths"))))


@register("resnet")
class ResNetBaseline(BaseModel):
    """CXR ResNet -> dropout -> linear head; stays without an X-ray get the learned ``no_image_logits``."""

    modalities: ClassVar[tuple[str, ...]] = ("cxr",)
    default_hparams: ClassVar[dict[str, Any]] = {
        "backbone": "resnet50",
        "pretrained": "imagenet",
        "dropout": 0.2,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "backbone": {"type": "categorical", "choices": ["resnet18", "resnet34", "resnet50"]},
        "dropout": _DROPOUT,
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"backbone": "resnet_small", "pretrained": "none"},
        "full": {},
        "test": {"backbone": "resnet_tiny", "pretrained": "none"},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        self.encoder = ResNetEncoder(self.choice("backbone", RESNET_ARCHS), h["pretrained"])
        self.head = nn.Sequential(nn.Dropout(h["dropout"]), nn.Linear(self.encoder.out_dim, self.num_outputs))
        self.no_image_logits = nn.Parameter(torch.zeros(self.num_outputs))

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        present = cxr_present(batch)
        feats = encode_present(self.encoder, batch["cxr"], present, self.encoder.out_dim)
        with_image = self.head(feats)
        logits = torch.where(present[:, None], with_image, self.no_image_logits.to(with_image.dtype)[None, :])
        return ModelOutput(logits)
