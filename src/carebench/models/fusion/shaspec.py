"""``shaspec``: ShaSpec (Wang et al., CVPR 2023, "Multi-modal Learning with Missing Modality via Shared-Specific
Feature Modelling"; authors' code billhhh/ShaSpec, read for reference only).

Mechanism:
  * **Adapters into a common shape.** The authors' modalities are same-shaped MRI volumes, so one conv net can
    encode each of them. EHR and X-ray are not: each gets a modality-specific adapter to a ``d``-vector first.
    EHR: the carebench EHR encoder (Transformer by default, or LSTM) on ``concat(ehr, mask)``, then
    ``Linear(-> d)``. X-ray: ``ResNetEncoder`` feature, then ``Linear(-> d)``. A missing X-ray is never encoded.
  * **One shared encoder, one specific encoder per modality.** The shared encoder (one set of weights) is applied
    to both adapted vectors and gives ``shared_ehr`` and ``shared_cxr``. Each modality also has its own specific
    encoder, which gives ``specific_m``. Both are MLPs over the common ``d``-vector: ``enc_layers`` blocks of
    ``WSLinear(d -> d)``, ``LayerNorm``, LeakyReLU(0.01). The authors use weight-standardised convolutions (no
    bias), instance norm and LeakyReLU. Here the linear layers are weight-standardised and LayerNorm, which is per
    sample like instance norm, replaces it. So no batch statistics are used and a stay never depends on its
    batch-mates.
  * **Residual composition, one layer shared by the modalities.**
    ``fused_m = shared_m + Proj([shared_m; specific_m])``, with ``Proj = Linear(2d -> d, bias=False)`` (the
    authors' conv also has no bias).
  * **Missing X-ray.** The X-ray's fused feature is replaced by the EHR's *shared* feature. This is the authors'
    ``general_shared_ft``, the shared feature of the first available modality, and EHR is always available. It is
    done per stay with ``torch.where`` on ``has_cxr``.
  * **Fusion.** ``[fused_ehr; fused_cxr]`` are concatenated (width ``2d``, not averaged), then Dropout and
    ``Linear(2d -> C)``.
  * **Losses** (``aux_losses``, already weighted):
    - ``align``: ``alpha`` (0.1) times the mean L1 between ``shared_ehr`` and ``shared_cxr``. It is taken over
      the paired stays only, the stays whose X-ray is used. The authors' ``nn.L1Loss`` averages over all elements.
    - ``domain``: ``beta`` (0.02) times the cross-entropy of a ``Linear(d -> 2)`` domain classifier on the
      **specific** features, predicting the modality id (EHR 0, X-ray 1). The EHR specific features of every stay
      count, and the X-ray specific features only of stays with an X-ray. This loss trains the specific
      features to be modality-specific. The reference toolkit put this classifier on the shared features, which
      works against the alignment term.
  * **Training schedule: full modalities first, then random modality dropout.** The authors' run script trains
    80k iterations with all modalities. It then resumes in ``mode=random`` up to iteration 180k: each
    batch keeps a random number of modalities (uniform 1..M), chosen at random (their batch has one case).
    Here, in training, for the epochs after the first ``full_modality_fraction`` (0.44 = 80k / 180k) of the
    trainer's ``max_epochs``, each stay's X-ray is hidden with probability ``cxr_drop_rate``. A hidden X-ray is
    then treated exactly like a missing one: not encoded, slot replaced, left out of both losses. The default
    0.25 is the rate the authors' scheme gives the X-ray with two modalities: half the draws keep one modality,
    and in half of those it is the EHR. The draws that would keep only the X-ray keep both, because EHR is
    always present in this benchmark. With no trainer (tests, inference) and in eval nothing is hidden.
    The framework's ``--cxr-dropout-train`` cannot express this: it hides a fixed set of stays for the whole run.

Deviations (docs/methods.md):
  * Adapters and MLP shared/specific encoders instead of 3D conv encoders on the raw volumes (modalities of
    different shapes). Each modality's backbone (EHR encoder, ResNet) is shared by its shared and specific
    branches. The authors run separate full encoders from the raw input, which here would mean a second ResNet
    and EHR encoder.
  * Weight standardisation on the shared and specific encoders' linear layers, but not on the composition
    projection. Weight standardisation fixes each output unit's weight norm at ``sqrt(fan_in)``, so an
    unnormalised residual would start ``~sqrt(2d)`` times larger than the shared feature it corrects. The fused
    X-ray slot of a stay without an image (a shared feature) would then live on a different scale from that of a
    stay with one. The authors' decoder renormalises after the composition; our linear head does not.
  * Classification head (Dropout + Linear on the concatenation) in place of the authors' segmentation decoder.
  * Alignment and domain losses only over stays that have the modality. The authors' zeroed-out modalities still
    entered both losses.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.models.base import (
    BaseModel,
    ModelConfigError,
    ModelOutput,
    cxr_present,
    hide_xrays,
    masked_mean,
)
from carebench.models.encoders import (
    CXR_QUICK,
    CXR_TEST,
    TRANSFORMER_RESNET_DEFAULTS,
    ehr_input,
    encode_present,
    transformer_resnet_encoders,
)
from carebench.models.registry import register

EHR_ID, CXR_ID = 0, 1  # modality ids predicted by the domain classifier


class WSLinear(nn.Linear):
    """Linear layer with weight standardisation (Qiao et al. 2019), as the authors' ``Conv3d_wd``.

    Each output unit's weights are centred and divided by their standard deviation (unbiased, ``+1e-12`` inside
    the square root, as the authors) before use. Followed by a normalisation layer, which gives the smoother loss
    landscape the authors rely on with batch size 1.
    """

    def standardised_weight(self) -> Tensor:
        w = self.weight - self.weight.mean(dim=1, keepdim=True)
        std = torch.sqrt(torch.var(w, dim=1, keepdim=True) + 1e-12)
        return w / std

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.standardised_weight(), self.bias)


def feature_encoder(d: int, layers: int, weight_std: bool) -> nn.Sequential:
    """``layers`` blocks of ``(WS)Linear(d -> d, no bias) -> LayerNorm -> LeakyReLU(0.01)`` (the authors'
    conv -> norm -> LeakyReLU unit, with a per-sample norm)."""
    linear = WSLinear if weight_std else nn.Linear
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [linear(d, d, bias=False), nn.LayerNorm(d), nn.LeakyReLU(0.01)]
    return nn.Sequential(*blocks)


class CompositionalLayer(nn.Module):
    """``f = shared + Proj([shared; specific])``: the specific feature enters as a residual on the shared one.

    One instance is shared by the modalities. ``residual`` can be switched off by tests to show it matters.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.residual = True

    def forward(self, shared: Tensor, specific: Tensor) -> Tensor:
        r = self.proj(torch.cat([shared, specific], dim=-1))
        return shared + r if self.residual else r


def alignment_loss(shared_ehr: Tensor, shared_cxr: Tensor, paired: Tensor) -> Tensor:
    """Mean absolute difference of the two shared features over the paired stays (0 without any)."""
    return masked_mean((shared_ehr - shared_cxr).abs().mean(dim=-1), paired)


def domain_loss(classifier: nn.Module, specific_ehr: Tensor, specific_cxr: Tensor, paired: Tensor) -> Tensor:
    """Cross-entropy of ``classifier`` on the specific features: every stay's EHR feature is labelled 0 and the
    X-ray feature of every stay with an X-ray 1, all averaged together (the authors' ``CrossEntropyLoss``)."""
    feats = torch.cat([specific_ehr, specific_cxr[paired]], dim=0)
    labels = torch.cat(
        [
            torch.full((specific_ehr.size(0),), EHR_ID, dtype=torch.long, device=feats.device),
            torch.full((int(paired.sum()),), CXR_ID, dtype=torch.long, device=feats.device),
        ]
    )
    return F.cross_entropy(classifier(feats).float(), labels)


@register("shaspec")
class ShaSpec(BaseModel):
    """Adapters -> shared encoder (both modalities) + specific encoders -> residual composition; a missing X-ray's
    slot is the EHR shared feature; concat -> head; L1 alignment of shared features + domain loss on specific ones;
    full-modality phase then random X-ray dropout in training."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    missing_aware: ClassVar[bool] = True
    default_hparams: ClassVar[dict[str, Any]] = {
        **TRANSFORMER_RESNET_DEFAULTS,
        "hidden_dim": 256,
        "enc_layers": 2,
        "weight_std": True,
        "dropout": 0.2,
        "alpha": 0.1,
        "beta": 0.02,
        "cxr_drop_rate": 0.25,
        "full_modality_fraction": 0.44,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "ehr_encoder": {"type": "categorical", "choices": ["lstm", "transformer"]},
        "hidden_dim": {"type": "categorical", "choices": [64, 128, 256]},
        "enc_layers": {"type": "int", "low": 1, "high": 3},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "alpha": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
        "beta": {"type": "float", "low": 0.002, "high": 0.2, "log": True},
        "cxr_drop_rate": {"type": "float", "low": 0.0, "high": 0.5},
        "full_modality_fraction": {"type": "float", "low": 0.0, "high": 0.6},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"ehr_hidden": 64, **CXR_QUICK, "hidden_dim": 64},
        "full": {},
        "test": {"ehr_hidden": 8, "ehr_heads": 2, **CXR_TEST, "hidden_dim": 8, "dropout": 0.0},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        d = h["hidden_dim"]
        if d < 2 or h["enc_layers"] < 1:
            raise ModelConfigError(f"{self._label()}: hidden_dim must be >= 2 and enc_layers >= 1")
        if not 0.0 <= h["cxr_drop_rate"] <= 1.0 or not 0.0 <= h["full_modality_fraction"] <= 1.0:
            raise ModelConfigError(
                f"{self._label()}: cxr_drop_rate and full_modality_fraction must be in [0, 1]"
            )
        self.d = d
        self.ehr_encoder, self.cxr_encoder = transformer_resnet_encoders(self)
        self.ehr_adapter = nn.Linear(self.ehr_encoder.out_dim, d)
        self.cxr_adapter = nn.Linear(self.cxr_encoder.out_dim, d)
        self.shared_encoder = feature_encoder(d, h["enc_layers"], h["weight_std"])
        self.ehr_specific = feature_encoder(d, h["enc_layers"], h["weight_std"])
        self.cxr_specific = feature_encoder(d, h["enc_layers"], h["weight_std"])
        self.compose = CompositionalLayer(d)
        self.domain_classifier = nn.Linear(d, 2)
        self.head = nn.Sequential(nn.Dropout(h["dropout"]), nn.Linear(2 * d, self.num_outputs))
        # True in the random-dropout phase of training (set by on_train_epoch_start); without a trainer: never.
        self.dropout_active = False

    def used_cxr(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B]`` bool: stays whose X-ray is used. In training during the random-dropout phase each present
        X-ray is hidden with probability ``cxr_drop_rate``; otherwise this is ``has_cxr``."""
        present = cxr_present(batch)
        if self.training and self.dropout_active:
            present = hide_xrays(present, self.hparams["cxr_drop_rate"])
        return present

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Shared, specific and fused features of both modalities ``[B, d]``, and ``paired`` ``[B]``."""
        paired = self.used_cxr(batch)
        ehr = self.ehr_adapter(self.ehr_encoder(ehr_input(batch), batch.get("ehr_lengths")))
        cxr_feat = encode_present(self.cxr_encoder, batch["cxr"], paired, self.cxr_encoder.out_dim)
        cxr = self.cxr_adapter(cxr_feat.to(ehr.dtype))
        shared_ehr, shared_cxr = self.shared_encoder(ehr), self.shared_encoder(cxr)
        specific_ehr, specific_cxr = self.ehr_specific(ehr), self.cxr_specific(cxr)
        fused_ehr = self.compose(shared_ehr, specific_ehr)
        fused_cxr = torch.where(paired[:, None], self.compose(shared_cxr, specific_cxr), shared_ehr)
        return {
            "shared_ehr": shared_ehr,
            "shared_cxr": shared_cxr,
            "specific_ehr": specific_ehr,
            "specific_cxr": specific_cxr,
            "fused_ehr": fused_ehr,
            "fused_cxr": fused_cxr,
            "paired": paired,
        }

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        f = self.features(batch)
        logits = self.head(torch.cat([f["fused_ehr"], f["fused_cxr"]], dim=-1))
        h = self.hparams
        align = alignment_loss(f["shared_ehr"], f["shared_cxr"], f["paired"])
        domain = domain_loss(self.domain_classifier, f["specific_ehr"], f["specific_cxr"], f["paired"])
        return ModelOutput(logits, aux_losses={"align": h["alpha"] * align, "domain": h["beta"] * domain})

    def on_train_epoch_start(self, trainer_module: Any) -> None:
        trainer = getattr(trainer_module, "trainer", None)
        max_epochs = getattr(trainer, "max_epochs", None)
        if max_epochs is None or max_epochs < 0:
            self.dropout_active = False
            return
        start = round(self.hparams["full_modality_fraction"] * max_epochs)
        self.dropout_active = int(trainer_module.current_epoch) >= start
