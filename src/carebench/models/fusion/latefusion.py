"""``latefusion``: concatenate the EHR and CXR feature vectors and classify them with an MLP.

The common "late fusion" baseline of EHR+CXR benchmarks (feature-level concatenation after two independent
encoders, as in the reference toolkit's LateFusion and MedFuse's "joint" baseline). A stay without an X-ray gets a
learned missing-image embedding in place of the projected CXR feature, so the head sees a consistent input and the
missing image's pixels never matter.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from carebench.models.base import BaseModel, ModelOutput, cxr_present
from carebench.models.encoders import (
    CXR_QUICK,
    CXR_TEST,
    TRANSFORMER_RESNET_DEFAULTS,
    ehr_input,
    encode_present,
    transformer_resnet_encoders,
)
from carebench.models.registry import register


@register("latefusion")
class LateFusion(BaseModel):
    """EHR encoder (d) + ``Linear(CXR -> d_fuse)`` (or the missing embedding) -> concat -> MLP -> logits."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    default_hparams: ClassVar[dict[str, Any]] = {
        **TRANSFORMER_RESNET_DEFAULTS,
        "fusion_dim": 256,
        "dropout": 0.2,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "ehr_encoder": {"type": "categorical", "choices": ["lstm", "transformer"]},
        "ehr_hidden": {"type": "categorical", "choices": [64, 128, 256]},
        "ehr_dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "fusion_dim": {"type": "categorical", "choices": [128, 256, 512]},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"ehr_hidden": 64, **CXR_QUICK, "fusion_dim": 64},
        "full": {},
        "test": {"ehr_hidden": 8, "ehr_heads": 2, **CXR_TEST, "fusion_dim": 8},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        self.ehr_encoder, self.cxr_encoder = transformer_resnet_encoders(self)
        self.cxr_proj = nn.Linear(self.cxr_encoder.out_dim, h["fusion_dim"])
        self.missing_cxr = nn.Parameter(torch.zeros(h["fusion_dim"]))
        self.head = nn.Sequential(
            nn.Linear(self.ehr_encoder.out_dim + h["fusion_dim"], h["fusion_dim"]),
            nn.ReLU(),
            nn.Dropout(h["dropout"]),
            nn.Linear(h["fusion_dim"], self.num_outputs),
        )

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        present = cxr_present(batch)
        ehr = self.ehr_encoder(ehr_input(batch), batch.get("ehr_lengths"))
        cxr = self.cxr_proj(encode_present(self.cxr_encoder, batch["cxr"], present, self.cxr_encoder.out_dim))
        cxr = torch.where(present[:, None], cxr, self.missing_cxr.to(cxr.dtype)[None, :])
        return ModelOutput(self.head(torch.cat([ehr, cxr.to(ehr.dtype)], dim=-1)))
