"""``umse``: UMSE (Lee et al., ICLR 2023, "Learning Missing Modal Electronic Health Records with Unified Multi-modal
Data Embedding and Modality-Aware Attention"; authors' code AITRICS/Medical_Tri_Modal_Pilot, model
``TRI_MBT_VSLTCLS`` with the ``TrimodalTransformerEncoder_MBT`` fusion encoder, read for reference only).

Mechanism:
  * **Unified embedding of observed EHR triplets.** The EHR is not read as an imputed hourly grid: every cell with
    ``ehr_mask == 1`` becomes one event (time = its hour ``t``, value = the normalised ``ehr[t, f]``, feature id
    ``f``); imputed cells never enter. At most ``max_events`` events are kept per stay, the most recent ones
    (``triplets``); shorter stays are padded and the padding is masked out of attention. An event is embedded as
    ``ReLU(LN(Linear(1->d)))(value) + ReLU(LN(Linear(1->d)))(time) + Embedding(F+1, d)(feature)``. There is no
    positional encoding: the time embedding carries the order, so the events form a set.
  * **X-ray tokens.** The cells of the image encoder's last feature map (adaptive-average-pooled to at most
    ``cxr_grid`` x ``cxr_grid``), each projected ``Linear(C -> d)``, plus the time embedding of the image's hour
    (``cxr_hours``, through the same time embedder as the EHR events) and a type embedding (row ``F`` of the feature
    table, as the authors give the image its own feature id). No positional encoding, as in the authors' code.
  * **Modality-aware attention: a Multimodal Bottleneck Transformer** (Nagrani et al. 2021). Each modality's
    sequence is ``[CLS_m, tokens]``, layer-normalised on entry; ``bottlenecks`` shared tokens start from one learned
    set. Every layer runs each modality's own pre-LN Transformer layer over ``[bottleneck, CLS_m, tokens_m]``; the
    bottleneck for the next layer is the mean of the modalities' bottleneck outputs over the modalities the stay
    HAS (``fuse_bottleneck``): a stay without an X-ray continues with the EHR stream's bottleneck, exactly. With
    ``num_layers >= 2`` (every preset) the EHR stream reads what the X-ray stream wrote into the bottleneck.
  * **A missing X-ray leaves no trace.** The X-ray stream runs only on the stays that have an image, so neither its
    pixels nor its time (``cxr_hours``) reach anything for the others; availability is carried only by which
    modalities the bottleneck is averaged over.
  * **Head with demographics.** ``LN(CLS_ehr)`` of the last layer, concatenated with the demographics embedding
    ``ReLU(LN(Linear(2 -> d)))(static)`` (age z-score, gender_male), then ``Linear(2d -> d) -> BatchNorm -> ReLU ->
    Linear(d -> C)``. BatchNorm uses batch statistics in training and its running statistics in eval, so an eval
    prediction never depends on batch-mates.
  * **Transformer layer as the authors'**: pre-LN; multi-head attention with query/key/value projections and no
    output projection or attention dropout; feed-forward ``d -> 4d -> d`` (ReLU, dropout after each linear).

Deviations (docs/methods.md): ResNet feature-map cells instead of a frozen Swin-T pretrained on MIMIC-CXR image-
report pairs (no such weights here; the encoder is fine-tuned; at the quick preset's 64 px the last map is 2 x 2);
the ``max_events`` cap keeps the most recent events (the authors keep the first ones of their prediction window);
event time is the hour since ICU admission (the authors' windows count hours from the window start;
``time_unit_hours`` can rescale it, default 1 = hours as the authors); age is z-scored with the training fold's
statistics; the last layer has no X-ray stream (its outputs would reach nothing: the authors compute and discard
them, so predictions are the same); auxiliary losses (off by default in the authors' code) are not implemented; the
text modality does not exist here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.models.base import BaseModel, ModelConfigError, ModelOutput, cxr_present
from carebench.models.encoders import CXR_QUICK, CXR_TEST, RESNET_ARCHS, ResNetEncoder
from carebench.models.registry import register


def triplets(values: Tensor, mask: Tensor, max_events: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The observed cells of ``values``/``mask`` ``[B, T, F]`` as events, in time order, the most recent
    ``max_events`` per stay.

    Returns ``time [B, E]`` (hour index, float), ``value [B, E]``, ``feature [B, E]`` (long) and ``valid [B, E]``
    (bool, False at padding), with ``E = min(max_events, most observed cells of a stay in the batch)`` (at least 1,
    so a stay with nothing observed still has a well-formed, fully padded sequence). Cells are ordered by hour,
    then feature id.
    """
    b, t, f = values.shape
    observed = mask.reshape(b, t * f) > 0.5
    # events at or after each cell: the most recent `max_events` observed cells are those with rank <= max_events
    rank_from_end = observed.flip(1).long().cumsum(1).flip(1)
    keep = observed & (rank_from_end <= max_events)
    n_events = keep.sum(1)
    width = max(1, min(max_events, int(n_events.max()) if b else 0))
    cell = torch.arange(t * f, device=values.device).expand(b, t * f)
    order = torch.argsort(torch.where(keep, cell, cell + t * f), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=values.device)[None, :] < n_events[:, None]
    time = torch.div(order, f, rounding_mode="floor").to(values.dtype)
    value = values.reshape(b, t * f).gather(1, order)
    feature = order % f
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return (
        torch.where(valid, time, zero),
        torch.where(valid, value, zero),
        torch.where(valid, feature, 0),
        valid,
    )


def scalar_embedder(d: int) -> nn.Sequential:
    """``ReLU(LN(Linear(1 -> d)))``: the authors' embedding of one number (a value or a time)."""
    return nn.Sequential(nn.Linear(1, d), nn.LayerNorm(d), nn.ReLU())


def fuse_bottleneck(ehr_bn: Tensor, cxr_bn: Tensor | None, cxr_rows: Tensor) -> Tensor:
    """The next layer's bottleneck ``[B, K, d]``: the mean over the modalities each stay has.

    ``ehr_bn [B, K, d]`` from the EHR stream of every stay; ``cxr_bn [N, K, d]`` from the X-ray stream of the stays
    ``cxr_rows [N]`` (long) that have an image. A stay without an X-ray keeps its EHR bottleneck unchanged.
    """
    if cxr_bn is None or cxr_rows.numel() == 0:
        return ehr_bn
    return ehr_bn.index_put((cxr_rows,), (ehr_bn[cxr_rows] + cxr_bn) / 2)


class PreLNLayer(nn.Module):
    """The authors' encoder layer: ``x + MHA(LN(x))``, then ``+ FFN(LN(.))``; attention without an output
    projection and without attention dropout; FFN ``Linear(d, ff) -> ReLU -> dropout -> Linear(ff, d) -> dropout``."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise ModelConfigError(f"d_model={d} must be divisible by num_heads={heads}")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """x ``[B, L, d]``; keep ``[B, L]`` bool (False = padding, never attended to) or None."""
        b, n, d = x.shape
        h = self.attn_norm(x)

        def split(z: Tensor) -> Tensor:
            return z.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        mask = None if keep is None else keep[:, None, None, :]
        a = F.scaled_dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h)), attn_mask=mask
        )
        x = x + a.transpose(1, 2).reshape(b, n, d)
        return x + self.ffn(self.ffn_norm(x))


@register("umse")
class UMSE(BaseModel):
    """Observed-triplet EHR embedding, X-ray patch tokens with time and type embeddings, a bottleneck Transformer
    whose bottleneck is averaged over the available modalities only, and a head joining the demographics."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    missing_aware: ClassVar[bool] = True
    default_hparams: ClassVar[dict[str, Any]] = {
        "d_model": 256,
        "num_layers": 6,
        "num_heads": 4,
        "dropout": 0.1,
        "bottlenecks": 4,
        "max_events": 1000,
        "cxr_grid": 7,
        "time_unit_hours": 1.0,
        "cxr_backbone": "resnet50",
        "cxr_pretrained": "imagenet",
    }
    # The authors' repository has no search grid; ranges around their defaults (d 256, 6 layers, 4 heads, 0.1).
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "d_model": {"type": "categorical", "choices": [64, 128, 256]},
        "num_layers": {"type": "int", "low": 2, "high": 6},
        "num_heads": {"type": "categorical", "choices": [2, 4, 8]},
        "dropout": {"type": "float", "low": 0.0, "high": 0.3},
        "max_events": {"type": "categorical", "choices": [256, 512, 1000]},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # CPU budget: the cost is the EHR stream's attention over up to max_events tokens, linear in d_model
        "quick": {
            "d_model": 32,
            "num_layers": 2,
            "num_heads": 2,
            "dropout": 0.1,
            "max_events": 256,
            "cxr_grid": 4,
            **CXR_QUICK,
        },
        "full": {},
        "test": {
            "d_model": 8,
            "num_layers": 2,
            "num_heads": 2,
            "dropout": 0.0,
            "max_events": 64,
            "cxr_grid": 2,
            **CXR_TEST,
        },
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        d = h["d_model"]
        if h["num_layers"] < 2:
            raise ModelConfigError(
                f"{self._label()}: num_layers must be >= 2 (with one layer the bottleneck never reaches the EHR CLS)"
            )
        for key in ("bottlenecks", "max_events", "cxr_grid"):
            if h[key] < 1:
                raise ModelConfigError(f"{self._label()}: {key} must be >= 1, got {h[key]}")
        if not h["time_unit_hours"] > 0:
            raise ModelConfigError(
                f"{self._label()}: time_unit_hours must be > 0, got {h['time_unit_hours']}"
            )
        if d % h["num_heads"]:
            raise ModelConfigError(
                f"{self._label()}: d_model={d} must be divisible by num_heads={h['num_heads']}"
            )
        self.d = d
        # unified embedding: value, time, feature id (row n_features = the X-ray's type)
        self.value_embed = scalar_embedder(d)
        self.time_embed = scalar_embedder(d)
        self.feature_embed = nn.Embedding(n_features + 1, d)
        self.demo_embed = nn.Sequential(nn.Linear(2, d), nn.LayerNorm(d), nn.ReLU())
        self.cxr_encoder = ResNetEncoder(self.choice("cxr_backbone", RESNET_ARCHS), h["cxr_pretrained"])
        self.cxr_proj = nn.Linear(self.cxr_encoder.stage_channels[-1], d)
        # bottleneck transformer
        self.cls = nn.ParameterList([nn.Parameter(torch.randn(1, 1, d)) for _ in range(2)])
        self.bottleneck = nn.Parameter(torch.randn(1, h["bottlenecks"], d))
        self.norm_in = nn.ModuleList([nn.LayerNorm(d) for _ in range(2)])
        self.drop_in = nn.Dropout(h["dropout"])
        # per layer the EHR and the X-ray stream's layer; the last layer has only the EHR one: its X-ray outputs
        # (CLS and bottleneck) would reach nothing, the authors compute and discard them
        n_layers = h["num_layers"]
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        PreLNLayer(d, h["num_heads"], 4 * d, h["dropout"])
                        for _ in range(2 if i + 1 < n_layers else 1)
                    ]
                )
                for i in range(n_layers)
            ]
        )
        # head
        self.cls_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(2 * d, d)
        self.bn = nn.BatchNorm1d(d)
        self.fc2 = nn.Linear(d, self.num_outputs)

    # ------------------------------------------------------------------------------------------ tokens
    def ehr_tokens(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``[B, E, d]`` event embeddings and ``[B, E]`` validity of the observed triplets."""
        time, value, feature, valid = triplets(batch["ehr"], batch["ehr_mask"], self.hparams["max_events"])
        emb = (
            self.value_embed(value.unsqueeze(-1))
            + self.time_embed(time.unsqueeze(-1) / self.hparams["time_unit_hours"])
            + self.feature_embed(feature)
        )
        return emb, valid

    def cxr_tokens(self, images: Tensor, hours: Tensor) -> Tensor:
        """``[N, P, d]`` for the present images only: projected feature-map cells + time + type embeddings."""
        x = self.cxr_encoder.feature_map(images)
        g = self.hparams["cxr_grid"]
        if x.size(-1) > g or x.size(-2) > g:
            x = F.adaptive_avg_pool2d(x, (min(g, x.size(-2)), min(g, x.size(-1))))
        cells = self.cxr_proj(x.flatten(2).transpose(1, 2))
        kind = self.feature_embed.weight[self.n_features]
        when = hours.to(cells.dtype)[:, None, None] / self.hparams["time_unit_hours"]
        return cells + self.time_embed(when) + kind

    def stream_input(self, m: int, tokens: Tensor) -> Tensor:
        """``[CLS_m, tokens]`` layer-normalised on entry (the authors' ``layer_norms_in``), then dropout."""
        cls = self.cls[m].expand(tokens.size(0), 1, self.d)
        return self.drop_in(self.norm_in[m](torch.cat([cls.to(tokens.dtype), tokens], dim=1)))

    # ----------------------------------------------------------------------------------------- forward
    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The EHR CLS output ``[B, d]`` of the last layer, and the bottleneck entering each layer (for tests)."""
        if "static" not in batch:
            raise ModelConfigError(
                f"{self._label()}: the batch has no 'static' (demographics) key; UMSE needs the dataset's "
                "cohort.parquet to have the columns 'age' and 'gender'"
            )
        has = cxr_present(batch)
        rows = has.nonzero(as_tuple=True)[0]
        ehr_tok, valid = self.ehr_tokens(batch)
        b, k = ehr_tok.size(0), self.hparams["bottlenecks"]
        ehr_x = self.stream_input(0, ehr_tok)
        # keys of the EHR stream: bottleneck and CLS always, events where valid
        ehr_keep = torch.cat([valid.new_ones(b, k + 1), valid], dim=1)
        cxr_x = None
        if rows.numel():
            cxr_x = self.stream_input(1, self.cxr_tokens(batch["cxr"][rows], batch["cxr_hours"][rows]))
        bn = self.bottleneck.expand(b, k, self.d).to(ehr_x.dtype)
        entering = [bn]
        for i, streams in enumerate(self.layers):
            out = streams[0](torch.cat([bn, ehr_x], dim=1), ehr_keep)
            ehr_bn, ehr_x = out[:, :k], out[:, k:]
            if i + 1 == len(self.layers):
                break
            cxr_bn = None
            if cxr_x is not None:
                out = streams[1](torch.cat([bn[rows], cxr_x], dim=1), None)
                cxr_bn, cxr_x = out[:, :k], out[:, k:]
            bn = fuse_bottleneck(ehr_bn, cxr_bn, rows)
            entering.append(bn)
        return ehr_x[:, 0], entering

    def head(self, cls_ehr: Tensor, static: Tensor) -> Tensor:
        """``Linear(2d -> d) -> BatchNorm -> ReLU -> Linear`` on ``[LN(CLS_ehr), demographics embedding]``."""
        z = self.fc1(torch.cat([self.cls_norm(cls_ehr), self.demo_embed(static.to(cls_ehr.dtype))], dim=1))
        if (
            self.training and z.size(0) == 1
        ):  # batch statistics of one stay are undefined: use the running ones
            z = F.batch_norm(
                z, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False
            )
        else:
            z = self.bn(z)
        return self.fc2(F.relu(z))

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        cls_ehr, _ = self.encode(batch)
        return ModelOutput(self.head(cls_ehr, batch["static"]))
