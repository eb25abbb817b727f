"""``utde``: UTDE + interleaved cross-modal transformer (Zhang et al., ICML 2023, "Improving Medical Predictions by
Irregular Multimodal Electronic Health Records Modeling"; authors' code XZhang97666/MultimodalMIMIC, read for
reference only).

Mechanism:
  * **Time embedding** (Time2Vec, shared by both modalities): ``phi(t) = [w0*t + b0, sin(W t + b)]`` of size
    ``embed_time``; times are hours / ``tt_max`` (the 48-hour window maps to [0, 1]).
  * **Irregular EHR path, mTAND time attention**: every observed cell of the hourly grid is an observation at time
    ``(hour + 0.5) / tt_max`` (the mask of the grid gives the irregular observation pattern). Queries are
    ``phi`` of ``tt_max`` reference times ``linspace(0, 1)``, keys ``phi`` of the observation times, both through
    per-head linear maps. Per feature, a softmax over *that feature's observed times only* weighs the observed
    values (and the mask channel), so each feature is interpolated onto the reference grid by learned, time-dependent
    weights; per head the ``2F`` interpolated channels are concatenated and ``Linear(heads*2F -> d)`` makes a
    ``[tt_max, d]`` sequence.
  * **Regular EHR path**: the imputed hourly grid ``concat(ehr, mask)`` through ``Conv1d(2F -> d, kernel_size)``.
  * **UTDE gate**: ``g = gateMLP([max_t irregular ; max_t regular])`` (Dropout, Linear, ReLU, Linear, sigmoid), per
    stay (``mixup_level="batch"``, the paper's setting), per stay and step (``batch_seq``) or per stay, step and
    channel (``batch_seq_feature``); the EHR sequence is ``g * irregular + (1 - g) * regular``.
  * **X-ray time attention**: the X-ray's ResNet feature, ``Linear(-> d)``, is the value of one key at the image's
    time ``cxr_hours / tt_max``. One key alone makes a softmax constant 1 (the reference toolkit's defect: its time
    attention copied the image to every position and ignored the time), so the attention also holds a learned
    *null* key and value: at reference time q the image receives weight ``sigmoid(s(q, t_img) - s_null(q))`` and the
    null value the rest, which makes the X-ray sequence depend on when the image was taken relative to each step.
  * **Interleaved cross-modal transformer** (the paper's fusion; ``self_cross`` in the authors' code): both
    ``[tt_max, d]`` sequences are scaled by ``sqrt(d)``, get one shared learned position embedding and dropout; each
    of ``cross_layers`` layers applies, per stream, pre-LN self-attention, then pre-LN cross-attention (X-ray queries
    EHR and EHR queries X-ray), then a pre-LN ReLU feed-forward (4d), each with a residual; final LayerNorms.
  * **Head**: the last reference step of both streams, concatenated (2d), plus a residual MLP
    (``Linear, ReLU, Dropout, Linear``), then ``Linear(2d -> C)``.

Missing X-ray: the image key is masked out (``has_cxr``), so its weight is exactly 0 at every step and the X-ray
stream is the learned null sequence whatever the missing image's pixels or ``cxr_hours`` hold.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.models.base import BaseModel, ModelConfigError, ModelOutput, cxr_present
from carebench.models.encoders import CXR_QUICK, CXR_TEST, RESNET_ARCHS, ResNetEncoder, encode_present
from carebench.models.registry import register

MIXUP_LEVELS = ("batch", "batch_seq", "batch_seq_feature")


class TimeEmbedding(nn.Module):
    """Time2Vec: ``[linear(t), sin(periodic(t))]`` -> ``[..., embed_time]`` for times ``[...]``."""

    def __init__(self, embed_time: int) -> None:
        super().__init__()
        if embed_time < 2:
            raise ModelConfigError(f"embed_time must be >= 2, got {embed_time}")
        self.linear = nn.Linear(1, 1)
        self.periodic = nn.Linear(1, embed_time - 1)

    def forward(self, t: Tensor) -> Tensor:
        t = t.unsqueeze(-1)
        return torch.cat([self.linear(t), torch.sin(self.periodic(t))], dim=-1)


class TimeAttention(nn.Module):
    """mTAND multi-time attention: per-head query/key maps of time embeddings, scaled dot-product scores."""

    def __init__(self, embed_time: int, heads: int) -> None:
        super().__init__()
        if embed_time % heads:
            raise ModelConfigError(f"embed_time={embed_time} must be divisible by time_heads={heads}")
        self.heads, self.d_k = heads, embed_time // heads
        self.query = nn.Linear(embed_time, embed_time)
        self.key = nn.Linear(embed_time, embed_time)

    def split(self, x: Tensor, proj: nn.Linear) -> Tensor:
        """``[..., N, embed_time]`` -> ``[..., heads, N, d_k]``."""
        h = proj(x)
        return h.reshape(*h.shape[:-1], self.heads, self.d_k).transpose(-3, -2)

    def scores(self, q_emb: Tensor, k_emb: Tensor) -> Tensor:
        """``[..., heads, Q, K]`` scores between query and key time embeddings."""
        q, k = self.split(q_emb, self.query), self.split(k_emb, self.key)
        return q @ k.transpose(-1, -2) / math.sqrt(self.d_k)


def masked_time_interpolation(scores: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Per-channel softmax attention over the observed keys only (mTAND's per-feature masked softmax).

    scores ``[H, Q, K]`` (shared by the batch: the keys are the grid's hour times), values and mask ``[B, K, D]``.
    Returns ``[B, H, Q, D]``: for channel j, ``sum_k w_qk m_kj v_kj / sum_k w_qk m_kj`` with ``w = exp(scores)``
    (computed with the row maximum subtracted); 0 for a channel with no observation. Written as two contractions
    so memory stays ``O(B H Q D)`` instead of materialising ``[B, H, Q, K, D]`` weights.
    """
    w = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    num = torch.einsum("hqk,bkd->bhqd", w, mask * values)
    den = torch.einsum("hqk,bkd->bhqd", w, mask)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


class GateMLP(nn.Module):
    """UTDE's mixing gate: Dropout -> Linear(2d -> d) -> ReLU -> Linear(d -> out) -> sigmoid (Xavier-normal)."""

    def __init__(self, d: int, out: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, out))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.net(x))


class InterleavedLayer(nn.Module):
    """One layer of the interleaved cross-modal transformer on two streams ``[B, T, d]`` (pre-LN, residuals)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()

        def attn() -> nn.MultiheadAttention:
            return nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)

        def pair(make: Any) -> nn.ModuleList:
            return nn.ModuleList([make(), make()])

        self.self_norm, self.self_attn = pair(lambda: nn.LayerNorm(d)), pair(attn)
        self.cross_norm, self.cross_attn = pair(lambda: nn.LayerNorm(d)), pair(attn)
        self.ffn_norm = pair(lambda: nn.LayerNorm(d))
        self.ffn = pair(
            lambda: nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, streams: list[Tensor]) -> list[Tensor]:
        out = []
        for x, norm, att in zip(streams, self.self_norm, self.self_attn, strict=True):
            h = norm(x)
            out.append(x + self.drop(att(h, h, h, need_weights=False)[0]))
        normed = [norm(x) for x, norm in zip(out, self.cross_norm, strict=True)]
        # stream i queries the other stream (X-ray <- EHR, EHR <- X-ray), both from the self-attended states
        out = [
            x + self.drop(att(normed[i], normed[1 - i], normed[1 - i], need_weights=False)[0])
            for i, (x, att) in enumerate(zip(out, self.cross_attn, strict=True))
        ]
        return [
            x + self.drop(ffn(norm(x))) for x, norm, ffn in zip(out, self.ffn_norm, self.ffn, strict=True)
        ]


@register("utde")
class UTDE(BaseModel):
    """Time-attention (mTAND) + imputation embeddings mixed by the UTDE gate; X-ray time attention; interleaved
    cross-modal transformer; last-step head."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    default_hparams: ClassVar[dict[str, Any]] = {
        "embed_dim": 128,
        "heads": 8,
        "cross_layers": 3,
        "embed_time": 64,
        "time_heads": 8,
        "tt_max": 48,
        "kernel_size": 1,
        "mixup_level": "batch",
        "dropout": 0.1,
        "cxr_backbone": "resnet50",
        "cxr_pretrained": "imagenet",
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "embed_dim": {"type": "categorical", "choices": [64, 128, 256]},
        "cross_layers": {"type": "int", "low": 1, "high": 3},
        "embed_time": {"type": "categorical", "choices": [32, 64]},
        "mixup_level": {"type": "categorical", "choices": list(MIXUP_LEVELS)},
        "dropout": {"type": "float", "low": 0.0, "high": 0.3},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {
            "embed_dim": 64,
            "heads": 4,
            "cross_layers": 2,
            "embed_time": 32,
            "time_heads": 4,
            **CXR_QUICK,
        },
        "full": {},
        "test": {"embed_dim": 8, "heads": 2, "cross_layers": 1, "embed_time": 8, "time_heads": 2, **CXR_TEST},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        d, heads, th = h["embed_dim"], h["heads"], h["time_heads"]
        self.mixup_level = self.choice("mixup_level", MIXUP_LEVELS)
        if d % heads:
            raise ModelConfigError(f"{self._label()}: embed_dim={d} must be divisible by heads={heads}")
        if h["kernel_size"] < 1 or h["kernel_size"] % 2 == 0:
            raise ModelConfigError(
                f"{self._label()}: kernel_size must be a positive odd int, got {h['kernel_size']}"
            )
        if h["tt_max"] < 1:
            raise ModelConfigError(f"{self._label()}: tt_max must be >= 1, got {h['tt_max']}")
        self.tt_max = h["tt_max"]
        self.register_buffer("query_times", torch.linspace(0.0, 1.0, self.tt_max), persistent=False)
        self.time_embedding = TimeEmbedding(h["embed_time"])
        # irregular EHR path (mTAND over the observed cells), regular path (imputed grid), UTDE gate
        self.ehr_time_attention = TimeAttention(h["embed_time"], th)
        self.ehr_irregular_out = nn.Linear(th * 2 * n_features, d)
        self.ehr_regular = nn.Conv1d(
            2 * n_features, d, h["kernel_size"], padding=h["kernel_size"] // 2, bias=False
        )
        gate_out = d if self.mixup_level == "batch_seq_feature" else 1
        self.gate = GateMLP(d, gate_out, h["dropout"])
        # X-ray: encoder, projection, time attention with a learned null key/value
        self.cxr_encoder = ResNetEncoder(self.choice("cxr_backbone", RESNET_ARCHS), h["cxr_pretrained"])
        self.cxr_proj = nn.Linear(self.cxr_encoder.out_dim, d)
        self.cxr_time_attention = TimeAttention(h["embed_time"], th)
        self.null_key = nn.Parameter(torch.randn(th, h["embed_time"] // th) * 0.1)
        self.null_value = nn.Parameter(torch.zeros(d))
        self.cxr_out = nn.Linear(th * d, d)
        # interleaved cross-modal transformer and head
        self.positions = nn.Parameter(torch.randn(1, self.tt_max, d) * 0.02)
        self.embed_drop = nn.Dropout(h["dropout"])
        self.layers = nn.ModuleList(
            [InterleavedLayer(d, heads, h["dropout"]) for _ in range(h["cross_layers"])]
        )
        self.final_norm = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        self.proj1, self.proj2 = nn.Linear(2 * d, 2 * d), nn.Linear(2 * d, 2 * d)
        self.head_drop = nn.Dropout(h["dropout"])
        self.out_layer = nn.Linear(2 * d, self.num_outputs)

    # ------------------------------------------------------------------------------------------ EHR
    def observation_times(self, steps: int, device: torch.device) -> Tensor:
        """Normalised time of each hourly cell: its centre ``(hour + 0.5) / tt_max``."""
        return (torch.arange(steps, device=device, dtype=torch.float32) + 0.5) / self.tt_max

    def ehr_attention_scores(self, steps: int, device: torch.device) -> Tensor:
        """``[time_heads, tt_max, steps]`` scores of the reference times against the hourly observation times."""
        q = self.time_embedding(self.query_times.to(device))
        k = self.time_embedding(self.observation_times(steps, device))
        return self.ehr_time_attention.scores(q, k)

    def ehr_irregular(self, batch: dict[str, Tensor]) -> Tensor:
        """mTAND embedding ``[B, tt_max, d]`` of the observed cells (values and mask channels)."""
        x, m = batch["ehr"], batch["ehr_mask"].to(batch["ehr"].dtype)
        values = torch.cat([x * m, m], dim=-1)
        mask = torch.cat([m, m], dim=-1)
        interp = masked_time_interpolation(self.ehr_attention_scores(x.size(1), x.device), values, mask)
        b, heads, q, ch = interp.shape
        return self.ehr_irregular_out(interp.permute(0, 2, 1, 3).reshape(b, q, heads * ch))

    def ehr_sequence(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The gated EHR sequence ``[B, tt_max, d]`` and the gate."""
        x = batch["ehr"]
        if x.size(1) != self.tt_max:
            raise ModelConfigError(
                f"{self._label()}: the EHR grid has {x.size(1)} hourly steps but tt_max is "
                f"{self.tt_max}; set tt_max to the window length in hours"
            )
        irregular = self.ehr_irregular(batch)
        grid = torch.cat([x, batch["ehr_mask"].to(x.dtype)], dim=-1)
        regular = self.ehr_regular(grid.transpose(1, 2)).transpose(1, 2)
        if self.mixup_level == "batch":
            gate = self.gate(torch.cat([irregular.amax(dim=1), regular.amax(dim=1)], dim=-1))[:, None, :]
        else:
            gate = self.gate(torch.cat([irregular, regular], dim=-1))
        return gate * irregular + (1.0 - gate) * regular, gate

    # --------------------------------------------------------------------------------------- X-ray
    def cxr_attention_weights(self, cxr_hours: Tensor, present: Tensor) -> Tensor:
        """``[B, time_heads, tt_max]``: the weight of the image (vs the null value) at each reference time."""
        q = self.cxr_time_attention.split(
            self.time_embedding(self.query_times), self.cxr_time_attention.query
        )
        k = self.cxr_time_attention.split(
            self.time_embedding((cxr_hours.float() / self.tt_max)[:, None]), self.cxr_time_attention.key
        )  # [B, H, 1, d_k]
        scale = math.sqrt(self.cxr_time_attention.d_k)
        s_img = (q[None] * k).sum(-1) / scale  # [B, H, Q]
        s_null = (q * self.null_key[:, None, :]).sum(-1) / scale  # [H, Q]
        return torch.sigmoid(s_img - s_null[None]) * present.to(s_img.dtype)[:, None, None]

    def cxr_sequence(self, batch: dict[str, Tensor], present: Tensor) -> tuple[Tensor, Tensor]:
        """The X-ray sequence ``[B, tt_max, d]`` from the image token and its time, and the attention weights."""
        feat = encode_present(self.cxr_encoder, batch["cxr"], present, self.cxr_encoder.out_dim)
        token = self.cxr_proj(feat) * present.to(feat.dtype)[:, None]  # exact zeros for missing images
        weight = self.cxr_attention_weights(batch["cxr_hours"], present)  # [B, H, Q]
        mixed = weight[..., None] * token[:, None, None, :] + (1.0 - weight[..., None]) * self.null_value
        b, heads, q, d = mixed.shape
        return self.cxr_out(mixed.permute(0, 2, 1, 3).reshape(b, q, heads * d)), weight

    # ---------------------------------------------------------------------------------------- fusion
    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        present = cxr_present(batch)
        ehr, _ = self.ehr_sequence(batch)
        cxr, _ = self.cxr_sequence(batch, present)
        scale = math.sqrt(ehr.size(-1))
        streams = [self.embed_drop(s * scale + self.positions) for s in (cxr, ehr.to(cxr.dtype))]
        for layer in self.layers:
            streams = layer(streams)
        last = torch.cat([norm(s)[:, -1] for norm, s in zip(self.final_norm, streams, strict=True)], dim=-1)
        hidden = last + self.proj2(self.head_drop(F.relu(self.proj1(last))))
        return ModelOutput(self.out_layer(hidden))
