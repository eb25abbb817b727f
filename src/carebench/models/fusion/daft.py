"""``daft``: Dynamic Affine Feature-map Transform (Pölsterl, Wolf & Wachinger, MICCAI 2021, arXiv:2107.05990).

DAFT conditions a CNN on tabular data: inside the last residual block of the CNN, the feature map F is squeezed
by global average pooling, concatenated with the tabular vector, and a bottleneck MLP (``Linear -> ReLU -> Linear``,
no biases, bottleneck width ``(C + d_tab) / bottleneck_factor``) outputs a per-channel scale alpha and shift beta;
the block continues with ``alpha * F + beta``. The transform thus depends on both the image and the tabular data,
and it modulates the *image* branch.

Here the "tabular" vector is the EHR encoder's feature (Transformer or LSTM over the 48 hourly inputs), and the CNN
is the benchmark's ResNet whose last residual block (``layer4[-1]``) carries the DAFT. ``daft_location`` selects
where inside that block the transform acts, as in the paper's ablation (authors' code ai-med/DAFT, read for
reference only): 0 the block input (both paths), 1 the skip path only, 2 the main path before its first
convolution (the paper's DAFT; the default), 3 after the first batch norm (whose own affine parameters are then
removed, as in the authors' code), 4 after the first ReLU. ``daft_activation`` optionally squashes the scale
(``linear`` = none, the default; ``tanh``; ``sigmoid``).

Missing X-ray, per stay: the CNN (and so the DAFT) runs only on the stays that have an image. The classifier reads
``[pooled CNN feature, EHR feature]``; for a stay without an image the CNN feature is replaced by a learned
missing-image embedding, so its prediction depends on its EHR alone and never on the zero-filled pixels.

Deviations (docs/methods.md): the classifier also reads the EHR feature (DAFT's own head reads only the pooled CNN
map; without the EHR feature, a stay without an image would get one constant prediction); the tabular input is a
learned EHR representation trained end-to-end rather than fixed clinical variables; the CNN is a 2-D torchvision
ResNet instead of the paper's small 3-D ResNet.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from carebench.models.base import BaseModel, ModelConfigError, ModelOutput, cxr_present
from carebench.models.encoders import (
    CXR_QUICK,
    CXR_TEST,
    TRANSFORMER_RESNET_DEFAULTS,
    batchnorm_safe,
    ehr_input,
    transformer_resnet_encoders,
)
from carebench.models.registry import register

LOCATIONS = (0, 1, 2, 3, 4)
ACTIVATIONS = ("linear", "tanh", "sigmoid")


class DAFTransform(nn.Module):
    """``(F [N,C,H,W], aux [N,d]) -> alpha * F + beta`` with ``(alpha, beta) = MLP([GAP(F), aux])`` per channel."""

    def __init__(self, channels: int, aux_dim: int, bottleneck_factor: float, activation: str) -> None:
        super().__init__()
        width = max(1, int((channels + aux_dim) / bottleneck_factor))
        self.aux = nn.Sequential(
            nn.Linear(channels + aux_dim, width, bias=False),
            nn.ReLU(),
            nn.Linear(width, 2 * channels, bias=False),
        )
        self.activation = activation

    def affine(self, fmap: Tensor, aux: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel ``(alpha, beta)``, each ``[N,C]``."""
        squeeze = fmap.mean(dim=(2, 3))
        alpha, beta = self.aux(torch.cat([squeeze, aux.to(squeeze.dtype)], dim=1)).chunk(2, dim=1)
        if self.activation == "tanh":
            alpha = torch.tanh(alpha)
        elif self.activation == "sigmoid":
            alpha = torch.sigmoid(alpha)
        return alpha, beta

    def forward(self, fmap: Tensor, aux: Tensor) -> Tensor:
        alpha, beta = self.affine(fmap, aux)
        return alpha[:, :, None, None] * fmap + beta[:, :, None, None]


class DAFTBlock(nn.Module):
    """A torchvision residual block (``BasicBlock`` or ``Bottleneck``) with a DAFT at one of the paper's locations.

    The block keeps its (possibly pretrained) convolutions and batch norms; ``forward(x, aux)`` is the block's own
    computation with ``transform`` inserted.
    """

    def __init__(
        self, block: nn.Module, aux_dim: int, location: int, bottleneck_factor: float, activation: str
    ) -> None:
        super().__init__()
        self.block = block
        self.location = location
        channels = block.conv1.in_channels if location in (0, 1, 2) else block.bn1.num_features
        if location == 3:  # DAFT replaces the batch norm's own affine parameters, as in the authors' code
            bn = block.bn1
            plain = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False)
            plain.load_state_dict({k: v for k, v in bn.state_dict().items() if k not in ("weight", "bias")})
            block.bn1 = plain
        self.transform = DAFTransform(channels, aux_dim, bottleneck_factor, activation)

    def forward(self, x: Tensor, aux: Tensor) -> Tensor:
        b, loc = self.block, self.location
        if loc == 0:
            x = self.transform(x, aux)
        identity = self.transform(x, aux) if loc == 1 else x
        if loc == 2:
            x = self.transform(x, aux)
        out = b.bn1(b.conv1(x))
        if loc == 3:
            out = self.transform(out, aux)
        out = b.relu(out)
        if loc == 4:
            out = self.transform(out, aux)
        out = b.bn2(b.conv2(out))
        if hasattr(b, "conv3"):  # Bottleneck (ResNet-50)
            out = b.bn3(b.conv3(b.relu(out)))
        if b.downsample is not None:
            identity = b.downsample(identity)
        return b.relu(out + identity)


@register("daft")
class DAFT(BaseModel):
    """EHR encoder -> DAFT in the ResNet's last residual block -> ``Linear([CNN | missing, EHR])``."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    default_hparams: ClassVar[dict[str, Any]] = {
        **TRANSFORMER_RESNET_DEFAULTS,
        "daft_location": 2,
        "daft_activation": "linear",
        "bottleneck_factor": 7.0,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "ehr_encoder": {"type": "categorical", "choices": ["lstm", "transformer"]},
        "ehr_hidden": {"type": "categorical", "choices": [64, 128, 256]},
        "ehr_dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "daft_location": {"type": "categorical", "choices": [0, 2, 3, 4]},
        "daft_activation": {"type": "categorical", "choices": list(ACTIVATIONS)},
        "bottleneck_factor": {"type": "float", "low": 2.0, "high": 14.0},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"ehr_hidden": 64, **CXR_QUICK},
        "full": {},
        "test": {"ehr_hidden": 8, "ehr_heads": 2, **CXR_TEST},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        if h["daft_location"] not in LOCATIONS:
            raise ModelConfigError(
                f"{self._label()}: hyper-parameter 'daft_location' must be one of {list(LOCATIONS)}, "
                f"got {h['daft_location']!r}"
            )
        if h["bottleneck_factor"] <= 0:
            raise ModelConfigError(
                f"{self._label()}: hyper-parameter 'bottleneck_factor' must be > 0, got {h['bottleneck_factor']}"
            )
        self.ehr_encoder, self.cxr_encoder = transformer_resnet_encoders(self)
        d = self.ehr_encoder.out_dim
        layer4 = list(self.cxr_encoder.net.layer4)
        # The last residual block leaves the plain ResNet and becomes the DAFT block (same weights).
        self.cxr_encoder.net.layer4 = nn.Sequential(*layer4[:-1])
        self.daft = DAFTBlock(
            layer4[-1],
            d,
            h["daft_location"],
            h["bottleneck_factor"],
            self.choice("daft_activation", ACTIVATIONS),
        )
        self.missing_cxr = nn.Parameter(torch.zeros(self.cxr_encoder.out_dim))
        self.head = nn.Linear(self.cxr_encoder.out_dim + d, self.num_outputs)

    def encode_cxr(self, images: Tensor, ehr: Tensor) -> Tensor:
        """Pooled CNN features ``[N,C]`` of images ``[N,1,S,S]`` with the DAFT conditioned on ``ehr [N,d]``."""
        with batchnorm_safe(self, images):
            fmap = images
            for _, stage in self.cxr_encoder.stages():  # stem, layer1..layer3, layer4 without its last block
                fmap = stage(fmap)
            return self.cxr_encoder.pool(self.daft(fmap, ehr))

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        present = cxr_present(batch)
        ehr = self.ehr_encoder(ehr_input(batch), batch.get("ehr_lengths"))
        cxr = self.missing_cxr.to(ehr.dtype)[None, :].expand(ehr.size(0), -1)
        if bool(present.any()):
            rows = present.nonzero().squeeze(1)
            cxr = cxr.index_put((rows,), self.encode_cxr(batch["cxr"][present], ehr[rows]).to(ehr.dtype))
        return ModelOutput(self.head(torch.cat([cxr, ehr], dim=1)))
