"""``healnet``: HEALNet (Hemker et al., NeurIPS 2024, "HEALNet: Multimodal Fusion for Heterogeneous Biomedical
Data"; authors' code konst-int-i/healnet, read for reference only).

HEALNet is a hybrid early-fusion network in the style of the Perceiver: one shared latent array is updated by
attending, in turn, to the raw tokens of each modality, so the modalities meet in the latents from the first layer
on while each keeps its own input structure (its own tokens, positions and attention weights).

Mechanism:
  * **Tokens with Fourier position features.** Each modality is a set of tokens on a grid of ``A`` spatial axes. The
    positions along each axis are ``linspace(-1, 1, n)``; each position ``x`` gets ``sin(pi x f)``, ``cos(pi x f)`` for
    ``f = linspace(1, max_freq / 2, num_freq_bands)`` and ``x`` itself, and these ``A * (2 * num_freq_bands + 1)``
    channels are appended to the token's features. The token features go to the attention unprojected (the
    attention's key/value projection is the only input layer), as in the authors' code.
      - EHR: one token per hour, the step's ``concat(ehr, ehr_mask)`` (``2F`` channels; the mask says which values
        were observed), with 1-D Fourier time features.
      - X-ray: one token per cell of the image encoder's last feature map before pooling (ResNet ``layer4``,
        ``H' x W'`` cells of ``C`` channels), with 2-D Fourier position features. Never raw pixels: the paper's image
        modality is a bag of patch features from a CNN. ``cxr_token_stage="layer3"`` takes layer3's cells instead
        (and drops layer4): the ``test`` preset's 32 px images end layer4 at 1 x 1, and attention over a single
        token is trivial (its weight is 1 whatever the query).
  * **Shared latents.** ``latents`` ``[num_latents, latent_dim]``, randn init, repeated over the batch.
  * **Fusion layers** (``depth``). For each modality in turn (EHR, then X-ray): pre-norm cross-attention (the latents
    query that modality's tokens; LayerNorm on the latents and on the tokens; no bias in q/kv; softmax with
    temperature 0.5, i.e. ``softmax(2 * q k^T / sqrt(d_head))``; ``to_out`` = Linear + LeakyReLU(0.01)) + residual,
    then a pre-norm gated-SELU feed-forward (``Linear(d -> 8d)``, split in halves ``a, g``, ``a * SELU(g)``,
    ``Linear(4d -> d)``, dropout) + residual, then ``self_per_cross_attn`` latent self-attention + feed-forward blocks.
  * **Weight tying** (``weight_tie_layers``). Layer 1 has its own weights; layers 2..depth share one set: per
    modality one cross-attention, one feed-forward that both modalities use (the authors' module cache keys the
    tied cross feed-forward by nothing, so both modalities' calls return the same module), and the self-attention
    blocks.
  * **Missing X-ray, per stay.** A stay without an X-ray skips the X-ray block: its latents after the X-ray
    cross-attention, feed-forward (and self-attention blocks of that step) are exactly those before. Only the
    present images go through the CNN, so a missing image's pixels cannot matter and training-mode batch-norm
    statistics are computed from present images only.
  * **Head.** Mean over the latents -> LayerNorm -> Linear.
  * **L1 term.** ``aux_losses["l1"] = l1 * sum |theta|`` over every parameter of the fusion network (latents,
    attention, feed-forwards, norms, head; shared weights counted once), as the authors' training loop adds it to
    the loss.

Deviations (docs/methods.md):
  * The authors skip a missing modality for the whole batch (a ``None`` input caught by a bare ``try/except``);
    here the update is masked per stay.
  * The authors' image tokens are pre-extracted features of a frozen network and their L1 term covers the whole
    HEALNet model they train; here the X-ray CNN is trained end to end with the fusion network (as for every method
    of the benchmark), and the L1 term covers the fusion network only, the part that corresponds to their model.
  * ``weight_tie_layers`` defaults to True (the paper's weight sharing after the first layer). The authors' tuned
    configurations set it to False, which in their code means untied layers (their config comment says the opposite).
  * With ``self_per_cross_attn > 0`` the authors apply the self-attention blocks after every modality's step, also
    for a missing modality; here they belong to the modality's step and are skipped with it, so a stay without an
    X-ray is unchanged by the whole X-ray step. The tuned setting (0) has no self-attention.
  * Defaults are the medians of the authors' four tuned configurations (one per TCGA cohort), rounded.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.models.base import BaseModel, ModelConfigError, ModelOutput, cxr_present
from carebench.models.encoders import CXR_QUICK, CXR_TEST, RESNET_ARCHS, ResNetEncoder
from carebench.models.registry import register

SOFTMAX_TEMPERATURE = 0.5  # the authors' cross- and self-attention both divide the logits by 0.5
LEAKY_SLOPE = 0.01
FF_MULT = 4
TOKEN_STAGES = ("layer4", "layer3")  # which ResNet feature map's cells are the X-ray tokens


def fourier_encode(pos: Tensor, max_freq: float, num_bands: int) -> Tensor:
    """``pos [..., A]`` -> ``[..., A * (2 * num_bands + 1)]``: per axis sin, cos of ``pi x f`` for the bands, then x.

    ``f = linspace(1, max_freq / 2, num_bands)``. Layout per axis: ``[sin f_1..f_n, cos f_1..f_n, x]``, axes in order.
    """
    x = pos.unsqueeze(-1)
    scales = torch.linspace(1.0, max_freq / 2, num_bands, device=pos.device, dtype=pos.dtype)
    scaled = x * scales * math.pi
    enc = torch.cat([scaled.sin(), scaled.cos(), x], dim=-1)
    return enc.flatten(-2)


def grid_positions(sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[*sizes, A]``: the coordinates of every grid cell, each axis in ``linspace(-1, 1, n)``."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def with_fourier(data: Tensor, max_freq: float, num_bands: int) -> Tensor:
    """``data [B, *grid, C]`` -> tokens ``[B, prod(grid), C + A * (2 * num_bands + 1)]`` (Fourier features appended)."""
    b, *grid, _ = data.shape
    enc = fourier_encode(grid_positions(tuple(grid), data.device, data.dtype), max_freq, num_bands)
    enc = enc.expand(b, *enc.shape)
    return torch.cat([data, enc], dim=-1).flatten(1, -2)


def fourier_channels(n_axes: int, num_bands: int) -> int:
    return n_axes * (2 * num_bands + 1)


class Attention(nn.Module):
    """Multi-head attention of ``x`` onto ``context`` (itself if None) with softmax temperature 0.5.

    ``softmax(q k^T * d_head^-0.5 / temperature)``; q and kv projections without bias; ``to_out`` = Linear +
    LeakyReLU(0.01), the authors' output layer.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.temperature = SOFTMAX_TEMPERATURE
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.LeakyReLU(LEAKY_SLOPE))

    def _qkv(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries ``[B, heads, Nq, d_head]`` from ``x``; keys and values ``[B, heads, Nk, d_head]`` from ``context``."""
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.reshape(b, context.size(1), self.heads, -1).transpose(1, 2)
        v = v.reshape(b, context.size(1), self.heads, -1).transpose(1, 2)
        return q, k, v

    def _softmax(self, q: Tensor, k: Tensor) -> Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) * self.scale / self.temperature, dim=-1)

    def weights(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The attention weights ``[B, heads, Nq, Nk]`` that ``forward`` applies."""
        q, k, _ = self._qkv(x, context)
        return self._softmax(q, k)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q, k, v = self._qkv(x, context)
        attn = self._softmax(q, k)
        out = (self.dropout(attn) @ v).transpose(1, 2).reshape(x.size(0), x.size(1), -1)
        return self.to_out(out)


class GatedSELUFeedForward(nn.Module):
    """``Linear(d -> 2 * 4d)`` -> halves ``a, g`` -> ``a * SELU(g)`` -> ``Linear(4d -> d)`` -> dropout."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * FF_MULT * 2)
        self.proj_out = nn.Linear(dim * FF_MULT, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.dropout(self.proj_out(a * F.selu(gate)))


class PreNorm(nn.Module):
    """LayerNorm on the latents (and on the context, if the wrapped module attends to one) before ``fn``."""

    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.norm_context is not None:
            return self.fn(self.norm(x), self.norm_context(context))
        return self.fn(self.norm(x))


class FusionLayer(nn.Module):
    """One HEALNet layer: per modality a cross-attention and a feed-forward, plus the latent self-attention blocks.

    The modules are passed in, so tied layers can hold the very same module objects.
    """

    def __init__(
        self, cross_attns: list[nn.Module], cross_ffs: list[nn.Module], self_blocks: list[nn.Module]
    ):
        super().__init__()
        self.cross_attns = nn.ModuleList(cross_attns)
        self.cross_ffs = nn.ModuleList(cross_ffs)
        self.self_blocks = nn.ModuleList(self_blocks)  # [attn_1, ff_1, attn_2, ff_2, ...]

    def step(self, m: int, x: Tensor, context: Tensor) -> Tensor:
        """The update of modality ``m`` on latents ``x [n, L, d]`` from its tokens ``context [n, N, c]``."""
        x = self.cross_attns[m](x, context) + x
        x = self.cross_ffs[m](x) + x
        for i in range(0, len(self.self_blocks), 2):
            x = self.self_blocks[i](x) + x
            x = self.self_blocks[i + 1](x) + x
        return x


def masked_step(layer: FusionLayer, m: int, x: Tensor, context: Tensor, present: Tensor | None) -> Tensor:
    """Apply modality ``m``'s step to the stays where ``present`` (``[B]`` bool; None = all) and leave the others'
    latents exactly as they are. ``context`` holds the tokens of the present stays only, in batch order."""
    if present is None:
        return layer.step(m, x, context)
    if not bool(present.any()):
        return x
    idx = present.nonzero(as_tuple=True)[0]
    return x.index_copy(0, idx, layer.step(m, x[idx], context))


@register("healnet")
class HEALNet(BaseModel):
    """Shared latent array updated by per-modality cross-attention over EHR hour tokens and X-ray feature-map cells
    (Fourier position features), gated-SELU feed-forwards, weights tied after the first layer, an L1 term; a stay
    without an X-ray skips the X-ray update."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    missing_aware: ClassVar[bool] = True
    default_hparams: ClassVar[dict[str, Any]] = {
        "depth": 2,
        "num_latents": 17,
        "latent_dim": 92,
        "cross_heads": 1,
        "cross_dim_head": 45,
        "latent_heads": 8,
        "latent_dim_head": 82,
        "self_per_cross_attn": 0,
        "num_freq_bands": 2,
        "max_freq": 2.0,
        "attn_dropout": 0.28,
        "ff_dropout": 0.21,
        "weight_tie_layers": True,
        "l1": 2.9e-5,
        "cxr_token_stage": "layer4",
        "cxr_backbone": "resnet50",
        "cxr_pretrained": "imagenet",
    }
    # The ranges spanned by the authors' four tuned configurations (best_hyperparams.yml); cross_heads 1,
    # self_per_cross_attn 0, max_freq 2 and num_freq_bands 2 are the same in all four.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "depth": {"type": "int", "low": 2, "high": 5},
        "num_latents": {"type": "int", "low": 16, "high": 25},
        "latent_dim": {"type": "int", "low": 62, "high": 126},
        "cross_dim_head": {"type": "int", "low": 16, "high": 103},
        "attn_dropout": {"type": "float", "low": 0.08, "high": 0.46},
        "ff_dropout": {"type": "float", "low": 0.04, "high": 0.48},
        "l1": {"type": "float", "low": 7e-6, "high": 3e-4, "log": True},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {
            "depth": 2,
            "num_latents": 16,
            "latent_dim": 32,
            "cross_dim_head": 16,
            "latent_dim_head": 16,
            "attn_dropout": 0.1,
            "ff_dropout": 0.1,
            **CXR_QUICK,
        },
        "full": {},
        "test": {
            "depth": 3,
            "num_latents": 4,
            "latent_dim": 8,
            "cross_dim_head": 4,
            "latent_heads": 2,
            "latent_dim_head": 4,
            "attn_dropout": 0.0,
            "ff_dropout": 0.0,
            "cxr_token_stage": "layer3",  # 32 px images end layer4 at 1x1: a single token makes attention trivial
            **CXR_TEST,
        },
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        for key in ("depth", "num_latents", "latent_dim", "cross_heads", "cross_dim_head", "num_freq_bands"):
            if h[key] < 1:
                raise ModelConfigError(f"{self._label()}: {key} must be >= 1, got {h[key]}")
        if h["self_per_cross_attn"] < 0:
            raise ModelConfigError(f"{self._label()}: self_per_cross_attn must be >= 0")
        self.cxr_encoder = ResNetEncoder(self.choice("cxr_backbone", RESNET_ARCHS), h["cxr_pretrained"])
        stage = self.choice("cxr_token_stage", TOKEN_STAGES)
        if stage == "layer3":  # the tokens are layer3's cells: layer4 would be dead weight
            self.cxr_encoder.net.layer4 = nn.Identity()
        self.n_stages = 4 if stage == "layer3" else 5
        nfb, d = h["num_freq_bands"], h["latent_dim"]
        self.context_dims = (
            2 * n_features + fourier_channels(1, nfb),
            self.cxr_encoder.stage_channels[self.n_stages - 1] + fourier_channels(2, nfb),
        )
        self.latents = nn.Parameter(torch.randn(h["num_latents"], d))

        def cross_attn(m: int) -> nn.Module:
            c = self.context_dims[m]
            return PreNorm(d, Attention(d, c, h["cross_heads"], h["cross_dim_head"], h["attn_dropout"]), c)

        def ff() -> nn.Module:
            return PreNorm(d, GatedSELUFeedForward(d, h["ff_dropout"]))

        def self_blocks() -> list[nn.Module]:
            blocks: list[nn.Module] = []
            for _ in range(h["self_per_cross_attn"]):
                attn = Attention(d, d, h["latent_heads"], h["latent_dim_head"], h["attn_dropout"])
                blocks += [PreNorm(d, attn), ff()]
            return blocks

        n_mod = len(self.modalities)
        layers = [
            FusionLayer([cross_attn(m) for m in range(n_mod)], [ff() for _ in range(n_mod)], self_blocks())
        ]
        if h["depth"] > 1:
            if h["weight_tie_layers"]:
                shared_ff = ff()
                tied = FusionLayer([cross_attn(m) for m in range(n_mod)], [shared_ff] * n_mod, self_blocks())
                layers += [tied] * (h["depth"] - 1)
            else:
                for _ in range(h["depth"] - 1):
                    layers.append(
                        FusionLayer(
                            [cross_attn(m) for m in range(n_mod)], [ff() for _ in range(n_mod)], self_blocks()
                        )
                    )
        self.layers = nn.ModuleList(layers)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, self.num_outputs))

    # ------------------------------------------------------------------------------------- tokens
    def ehr_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, T, 2F + 2 * nfb + 1]``: each hour's values and mask, with 1-D Fourier time features."""
        x = torch.cat([batch["ehr"], batch["ehr_mask"].to(batch["ehr"].dtype)], dim=-1)
        return with_fourier(x, self.hparams["max_freq"], self.hparams["num_freq_bands"])

    def cxr_tokens(self, batch: dict[str, Tensor], present: Tensor) -> Tensor:
        """``[n_present, H' * W', C + 2 * (2 * nfb + 1)]``: feature-map cells of the present images only."""
        fmap = self.cxr_encoder.feature_map(batch["cxr"][present], self.n_stages)
        return with_fourier(
            fmap.permute(0, 2, 3, 1), self.hparams["max_freq"], self.hparams["num_freq_bands"]
        )

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The parameters of the fusion network (everything but the X-ray CNN), each once: the L1 term's weights."""
        encoder = {id(p) for p in self.cxr_encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in encoder]

    def l1_norm(self) -> Tensor:
        return torch.stack([p.abs().sum() for p in self.fusion_parameters()]).sum()

    # --------------------------------------------------------------------------------------- forward
    def fuse(self, batch: dict[str, Tensor]) -> Tensor:
        """The latents after all layers, ``[B, num_latents, latent_dim]``."""
        has_cxr = cxr_present(batch)
        ehr = self.ehr_tokens(batch)
        cxr = self.cxr_tokens(batch, has_cxr) if bool(has_cxr.any()) else None
        x = self.latents.expand(ehr.size(0), -1, -1)
        for layer in self.layers:
            x = masked_step(layer, 0, x, ehr, None)
            if cxr is not None:
                x = masked_step(layer, 1, x, cxr, has_cxr)
        return x

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        logits = self.head(self.fuse(batch).mean(dim=1))
        return ModelOutput(logits, aux_losses={"l1": self.hparams["l1"] * self.l1_norm()})
