"""``mmtm``: Multimodal Transfer Module (Joze, Shaban, Iuzzolino & Koishida, CVPR 2020) between a CXR ResNet and an
EHR LSTM stack.

Mechanism (paper, and the authors' code haamoon/mmtm; the EHR adaptation follows MedFuse's ``fusion_mmtm``, both
read for reference only):
  * Two unimodal streams run side by side: a ResNet over the X-ray (stages stem, layer1..layer4) and a stack of
    single-layer LSTMs over the hourly EHR inputs (the per-hour hidden states are the EHR "feature map": channels =
    hidden units, the time axis plays the role of the spatial axes).
  * An MMTM sits after each of the last ``mmtm_stages`` CNN stages (the paper: the last three ResNet stages), paired
    with the EHR layer at the corresponding depth counted from the top (the last MMTM follows both streams' last
    layers). At each MMTM:
      squeeze  S_A = global average of the CNN map over H, W; S_B = average of the EHR hidden states over (valid) time
      joint    Z = ReLU(W [S_A, S_B] + b), ``dim Z = (C_A + C_B) / mmtm_ratio``
      excite   E_A = W_A Z + b_A, E_B = W_B Z + b_B
      gate     A <- 2 sigma(E_A) * A (per channel, broadcast over H, W); B <- 2 sigma(E_B) * B (broadcast over time)
    The gated CNN map is the input of the next ResNet stage and the gated EHR sequence the input of the next LSTM
    layer: the exchange happens *inside* both networks (slow fusion), which the reference toolkit lost by running
    its ResNet to the end first.
  * Heads: as in the paper's networks, each stream keeps its own classifier (CNN: global pool -> linear; EHR: last
    valid step of the top gated sequence -> dropout -> linear) and the prediction is the average of the two logits.
  * Losses: the task loss of the averaged logits (framework) plus, weighted by ``lambda_stream``, each stream's own
    head's task loss (``stream_ehr`` on all stays, ``stream_cxr`` on stays with an X-ray), as the authors train each
    stream on its own classifier and MedFuse's MMTM trainer trains the EHR-only, CXR-only and joint outputs.

Missing X-ray, per stay (``has_cxr`` False): the CNN runs only on the stays that have an image, so a missing image
never enters the network. For an imageless stay every MMTM exchange is skipped (its EHR gates are exactly 1, i.e.
its EHR stream is the plain LSTM stack) and its prediction is the EHR head alone. The prediction therefore cannot
depend on the zero-filled pixels the framework sends.

Deviations (docs/methods.md): the EHR stream is an LSTM stack, as MedFuse adapted MMTM to EHR (the paper fuses two
CNNs); training is end-to-end with the framework's single optimiser (the reference toolkit's four optimisers and
four forward passes per batch are not in the paper); the joint layer keeps the ReLU of the authors' code.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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
    batchnorm_safe,
    ehr_input,
    padding_mask,
    pool_steps,
)
from carebench.models.registry import register

N_CNN_STAGES = 5  # stem, layer1..layer4 (ResNetEncoder.stages())


class MMTMUnit(nn.Module):
    """One multimodal transfer module between a CNN map ``[N,C_A,H,W]`` and an EHR sequence ``[N,T,C_B]``."""

    def __init__(self, cnn_channels: int, ehr_channels: int, ratio: float) -> None:
        super().__init__()
        joint = max(1, int((cnn_channels + ehr_channels) / ratio))
        self.squeeze = nn.Linear(cnn_channels + ehr_channels, joint)
        self.excite_cnn = nn.Linear(joint, cnn_channels)
        self.excite_ehr = nn.Linear(joint, ehr_channels)

    def forward(self, fmap: Tensor, seq: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """Gates ``(g_cnn [N,C_A], g_ehr [N,C_B])`` in (0, 2); ``pad`` marks padded EHR steps (excluded)."""
        s = torch.cat([fmap.mean(dim=(2, 3)), pool_steps(seq, pad).to(fmap.dtype)], dim=1)
        z = torch.relu(self.squeeze(s))
        return 2.0 * torch.sigmoid(self.excite_cnn(z)), 2.0 * torch.sigmoid(self.excite_ehr(z))


def mmtm_schedule(n_stages: int, n_ehr_layers: int) -> list[tuple[int, int]]:
    """``[(cnn_stage, ehr_layer), ...]`` (0-based) after which each MMTM sits, bottom to top.

    The MMTMs follow the last ``n_stages`` of the 5 CNN stages and are aligned with the EHR layers from the top, so
    the last MMTM follows both streams' last layers, as in the paper. With fewer EHR layers than MMTMs the lowest
    MMTMs share the first EHR layer and gate its output one after the other (as MedFuse's variant with an MMTM
    after every ResNet stage does).
    """
    return [(N_CNN_STAGES - n_stages + k, max(0, n_ehr_layers - n_stages + k)) for k in range(n_stages)]


@register("mmtm")
class MMTM(BaseModel):
    """ResNet and LSTM stack exchanging channel gates through MMTMs; the average of the two streams' logits."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    default_hparams: ClassVar[dict[str, Any]] = {
        "ehr_hidden": 256,
        "ehr_layers": 3,
        "ehr_dropout": 0.3,
        "cxr_backbone": "resnet50",
        "cxr_pretrained": "imagenet",
        "mmtm_stages": 3,
        "mmtm_ratio": 4.0,
        "lambda_stream": 1.0,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "ehr_hidden": {"type": "categorical", "choices": [64, 128, 256]},
        "ehr_layers": {"type": "int", "low": 1, "high": 3},
        "ehr_dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "mmtm_stages": {"type": "int", "low": 1, "high": 5},
        "mmtm_ratio": {"type": "categorical", "choices": [2.0, 4.0, 8.0]},
        "lambda_stream": {"type": "float", "low": 0.0, "high": 2.0},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # one EHR layer in the 20-epoch quick budget: chosen on validation (docs/methods.md, MMTM)
        "quick": {"ehr_hidden": 64, "ehr_layers": 1, **CXR_QUICK},
        "full": {},
        "test": {"ehr_hidden": 8, **CXR_TEST},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        for key, low, high in (
            ("ehr_layers", 1, None),
            ("mmtm_stages", 1, N_CNN_STAGES),
            ("ehr_hidden", 1, None),
        ):
            if h[key] < low or (high is not None and h[key] > high):
                expected = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ModelConfigError(
                    f"{self._label()}: hyper-parameter {key!r} must be {expected}, got {h[key]}"
                )
        if h["lambda_stream"] < 0:
            raise ModelConfigError(
                f"{self._label()}: hyper-parameter 'lambda_stream' must be >= 0, got {h['lambda_stream']}"
            )
        if h["mmtm_ratio"] <= 0:
            raise ModelConfigError(
                f"{self._label()}: hyper-parameter 'mmtm_ratio' must be > 0, got {h['mmtm_ratio']}"
            )
        d = h["ehr_hidden"]
        # One nn.LSTM per layer so the sequence can be gated between layers; EHRLSTMEncoder gives MedFuse's init.
        self.ehr_layers = nn.ModuleList(
            EHRLSTMEncoder(2 * n_features if i == 0 else d, d, project_input=False).lstm
            for i in range(h["ehr_layers"])
        )
        self.ehr_dropout = nn.Dropout(h["ehr_dropout"])
        self.cxr_encoder = ResNetEncoder(self.choice("cxr_backbone", RESNET_ARCHS), h["cxr_pretrained"])
        self.schedule = mmtm_schedule(h["mmtm_stages"], h["ehr_layers"])
        channels = self.cxr_encoder.stage_channels
        self.mmtm = nn.ModuleList(MMTMUnit(channels[s], d, h["mmtm_ratio"]) for s, _ in self.schedule)
        self.ehr_head = nn.Linear(d, self.num_outputs)
        self.cxr_head = nn.Linear(self.cxr_encoder.out_dim, self.num_outputs)

    def _ehr_layer(self, i: int, seq: Tensor, lengths: Tensor | None) -> Tensor:
        """Hidden states ``[B,T,d]`` of EHR layer ``i`` (zeros at padded steps); dropout between layers."""
        if i > 0:
            seq = self.ehr_dropout(seq)
        lstm = self.ehr_layers[i]
        if lengths is None:
            return lstm(seq)[0]
        packed = pack_padded_sequence(seq, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=seq.size(1))[0]

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """Both streams with their MMTM exchanges; the features, head logits and the gates of every MMTM.

        ``cnn_gates[k]`` is ``[P,C]`` for the P stays with an image, ``ehr_gates[k]`` is ``[B,d]`` (exactly 1 for
        stays without an image).
        """
        present = cxr_present(batch)
        rows = present.nonzero().squeeze(1)
        any_image = rows.numel() > 0
        seq = ehr_input(batch)
        b, t = seq.shape[:2]
        lengths = batch.get("ehr_lengths")
        pad = padding_mask(lengths, t)
        fmap = batch["cxr"][present]
        stages = self.cxr_encoder.stages()
        cnn_done = ehr_done = 0
        cnn_gates: list[Tensor] = []
        ehr_gates: list[Tensor] = []
        with batchnorm_safe(self.cxr_encoder, fmap):
            for unit, (stage, layer) in zip(self.mmtm, self.schedule, strict=True):
                for _, module in stages[cnn_done : stage + 1]:
                    fmap = module(fmap) if any_image else fmap
                cnn_done = stage + 1
                for i in range(ehr_done, layer + 1):
                    seq = self._ehr_layer(i, seq, lengths)
                ehr_done = max(ehr_done, layer + 1)
                gate = seq.new_ones(b, seq.size(2))
                if any_image:
                    g_cnn, g_ehr = unit(fmap, seq[rows], None if pad is None else pad[rows])
                    fmap = fmap * g_cnn[:, :, None, None]
                    gate = gate.index_put((rows,), g_ehr.to(gate.dtype))
                    cnn_gates.append(g_cnn)
                seq = seq * gate[:, None, :]
                ehr_gates.append(gate)
            for _, module in stages[cnn_done:]:
                fmap = module(fmap) if any_image else fmap
        for i in range(ehr_done, len(self.ehr_layers)):
            seq = self._ehr_layer(i, seq, lengths)
        last = (
            seq[:, -1]
            if lengths is None
            else seq[torch.arange(b, device=seq.device), lengths.to(seq.device) - 1]
        )
        ehr_feat = self.ehr_dropout(last)
        cnn_feat = seq.new_zeros(b, self.cxr_encoder.out_dim)
        if any_image:
            pooled = self.cxr_encoder.pool(fmap)
            cnn_feat = cnn_feat.to(pooled.dtype).index_put((rows,), pooled)
        ehr_logits = self.ehr_head(ehr_feat)
        cxr_logits = self.cxr_head(cnn_feat.to(ehr_feat.dtype))
        logits = torch.where(present[:, None], (ehr_logits + cxr_logits) / 2, ehr_logits)
        return {
            "present": present,
            "ehr_feat": ehr_feat,
            "cnn_feat": cnn_feat,
            "ehr": ehr_logits,
            "cxr": cxr_logits,
            "logits": logits,
            "cnn_gates": cnn_gates,
            "ehr_gates": ehr_gates,
        }

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        out = self.encode(batch)
        aux: dict[str, Tensor] = {}
        if "y" in batch:
            weight, y = self.hparams["lambda_stream"], batch["y"]
            aux = {
                "stream_ehr": weight * per_sample_task_loss(self.task, out["ehr"], y).mean(),
                "stream_cxr": weight
                * masked_mean(per_sample_task_loss(self.task, out["cxr"], y), out["present"]),
            }
        return ModelOutput(out["logits"], aux_losses=aux, extra_logits={"ehr": out["ehr"], "cxr": out["cxr"]})
