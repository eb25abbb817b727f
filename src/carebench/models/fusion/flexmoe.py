"""``flexmoe``: Flex-MoE (Yun et al., NeurIPS 2024, "Flex-MoE: Modeling Arbitrary Modality Combination via the
Flexible Mixture-of-Experts"; authors' code UNITES-Lab/flex-moe, read for reference only).

Mechanism:
  * **Patch tokens per modality.** EHR: the hourly grid ``concat(ehr, mask)`` is cut into ``num_patches`` equal
    chunks of hours; each hour is projected ``Linear(2F -> hidden)``, averaged within its chunk, then GELU and
    ``Linear(hidden -> hidden)``. X-ray: ResNet feature ->
    ``Linear(-> hidden)`` -> zero-padded to a multiple of ``num_patches`` and split into ``num_patches`` chunks, each
    projected ``Linear(chunk -> hidden)``.
  * **Missing-modality bank.** ``missing_embeds[mc, m]`` (``[2^M - 1, M, P, d]``, randn init) indexed by the stay's
    modality combination ``mc`` (combinations ordered largest first, 0 = all present; for (EHR, CXR):
    {EHR+CXR: 0, EHR: 1, CXR: 2}). A missing modality's tokens are replaced by the bank entry of the stay's
    combination, so a stay without an X-ray never reads its image.
  * **Fusion.** Learned positions (zero init) over all ``M * P`` tokens, then ``layers`` blocks of pre-LN multi-head
    self-attention over all tokens (no qkv bias) *with the residual* ``x + drop(attn(LN(x)))``, then per modality
    ``x_m + drop(FFN(LN(x_m)))``, where FFN is a sparse mixture of experts on even layers and a dense GELU MLP on
    odd ones (alternating sparse/dense).
  * **Sparse MoE (plain PyTorch).** ``num_experts`` GELU experts (d -> 2d -> d); one noisy top-k gate per modality
    (Shazeer et al. 2017): logits ``x W_g`` plus, in training only, ``N(0,1) * softplus(x W_noise)``; the k largest
    are softmax-normalised and each token is sent to exactly those k experts (dispatch by index, no capacity limit,
    so no token is dropped and no stay depends on its batch-mates). In eval the gate is deterministic.
  * **Gate loss.** Cross-entropy of the (clean) gate logits toward expert ``mc`` for the tokens of stays with a
    missing modality, plus cv^2(importance) + cv^2(load) over the tokens of full stays and cv^2 over experts 1..E-1
    for the tokens of the other stays (load: Shazeer's smooth estimate in training, the hard count in eval).
    ``aux_losses["gate"] = gate_weight * gate loss``.
  * **Head.** Mean of each modality's tokens, concatenated, ``Linear(M*d -> C)``.
  * **Warm-up by number of observed modalities.** The official code iterates the stays sorted by how many
    modalities they have (unshuffled) during the first ``warmup_epochs`` epochs. The framework owns a shuffled
    loader, so here the order becomes an epoch curriculum (``warmup_keep``): in warm-up epoch ``e`` only stays
    with at least ``M - e`` observed modalities contribute to the task loss (epoch 0: full stays; then all). The task
    loss is therefore computed by the method (``train_task_loss = False``, ``aux_losses["task"]``); outside the
    warm-up it is exactly the framework's task loss.

Deviations (docs/methods.md): the attention residual is kept (the official code writes ``x = x + dropout(x)``,
dropping the input); routing in plain PyTorch instead of fastmoe; the warm-up ordering as an epoch curriculum; EHR
patches are chunks of hours of the imputed grid (the paper's tabular modalities are flat vectors).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.models.base import (
    BaseModel,
    ModelConfigError,
    ModelOutput,
    cxr_present,
    masked_mean,
    per_sample_task_loss,
)
from carebench.models.encoders import CXR_QUICK, CXR_TEST, RESNET_ARCHS, ResNetEncoder, encode_present
from carebench.models.registry import register

MODALITIES = ("ehr", "cxr")


def modality_combinations(n_modalities: int) -> list[tuple[bool, ...]]:
    """All non-empty presence patterns, largest first (index 0 = all present); ties in reverse binary order.

    For two modalities (EHR, CXR): ``[(T, T), (T, F), (F, T)]``.
    """
    patterns = [
        tuple(bool(code >> (n_modalities - 1 - i) & 1) for i in range(n_modalities))
        for code in range(2**n_modalities - 1, 0, -1)
    ]
    return sorted(patterns, key=lambda p: -sum(p))


def combination_index(present: Tensor) -> Tensor:
    """``[B]`` long: the index of each stay's presence pattern ``present [B, M]`` in ``modality_combinations``."""
    combos = torch.tensor(modality_combinations(present.size(1)), device=present.device)
    match = (present[:, None, :] == combos[None]).all(dim=-1)
    if not bool(match.any(dim=1).all()):
        raise ModelConfigError("a stay has no modality at all")
    return match.float().argmax(dim=1)


def warmup_keep(n_observed: Tensor, n_modalities: int, epoch: int | None, warmup_epochs: int) -> Tensor:
    """``[B]`` bool: the stays whose task loss counts in this epoch (curriculum by number of observed modalities).

    In warm-up epoch ``e < warmup_epochs`` a stay counts if it has at least ``n_modalities - e`` modalities; after
    the warm-up, or with no epoch known (outside the trainer), every stay counts.
    """
    if epoch is None or epoch >= warmup_epochs:
        return torch.ones_like(n_observed, dtype=torch.bool)
    return n_observed >= n_modalities - epoch


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (unbiased variance; 0 for fewer than 2 values)."""
    x = x.float()
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyTopKGate(nn.Module):
    """Shazeer et al.'s noisy top-k gate: returns (top-k indices, their weights, clean logits, importance, load).

    ``importance[e]`` is the sum of the gate weights of expert e over the given tokens; ``load[e]`` the number of
    tokens routed to e: in training Shazeer's smooth estimate ``sum P(noisy logit_e > k-th best of the others)``,
    in eval (no noise) the exact count.
    """

    def __init__(self, d: int, num_experts: int, k: int) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ModelConfigError(f"top_k must be in [1, num_experts={num_experts}], got {k}")
        self.k, self.num_experts = k, num_experts
        self.w_gate = nn.Linear(d, num_experts, bias=False)
        self.w_noise = nn.Linear(d, num_experts, bias=False)
        nn.init.zeros_(self.w_gate.weight)  # as Shazeer: uniform routing at the start, noise breaks ties
        nn.init.zeros_(self.w_noise.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x ``[N, d]`` -> idx ``[N, k]``, weights ``[N, k]``, clean logits ``[N, E]``, load-per-token ``[N, E]``."""
        clean = self.w_gate(x)
        if self.training:
            std = F.softplus(self.w_noise(x)) + 1e-2
            noisy = clean + torch.randn_like(clean) * std
        else:
            std, noisy = None, clean
        top_vals, top_idx = noisy.topk(min(self.k + 1, self.num_experts), dim=-1)
        idx, weights = top_idx[:, : self.k], torch.softmax(top_vals[:, : self.k], dim=-1)
        if std is not None and self.k < self.num_experts:
            # P(expert e is in the top k) under re-drawn noise: against the k-th value if e is outside, else k+1-th
            in_thr, out_thr = top_vals[:, self.k : self.k + 1], top_vals[:, self.k - 1 : self.k]
            is_in = noisy > in_thr
            normal = torch.distributions.Normal(0.0, 1.0)
            p_in = normal.cdf((clean - in_thr) / std)
            p_out = normal.cdf((clean - out_thr) / std)
            load = torch.where(is_in, p_in, p_out)
        else:
            load = torch.zeros_like(clean).scatter(1, idx, 1.0)
        return idx, weights, clean, load


class SparseMoE(nn.Module):
    """Mixture of ``num_experts`` GELU MLPs, each token processed by exactly its top-k experts (dispatch by index)."""

    def __init__(self, d: int, num_experts: int, k: int, n_gates: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(num_experts)]
        )
        self.gates = nn.ModuleList([NoisyTopKGate(d, num_experts, k) for _ in range(n_gates)])
        self.last_routing: list[
            Tensor
        ] = []  # per gate, the top-k indices [N, k] of the last call (for tests)

    def dispatch(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """``sum_j weights[:, j] * expert_{idx[:, j]}(x)`` for x ``[N, d]``, computing each expert on its tokens only."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                # accumulated in x's dtype (under autocast an expert's output is bfloat16, x float32)
                out.index_add_(0, token, (weights[token, slot, None] * expert(x[token])).to(out.dtype))
        return out

    def forward(self, chunks: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor, Tensor]]]:
        """chunks: per modality ``[B, P, d]`` -> outputs of the same shapes, and per modality (idx, logits, load)."""
        outs, routing = [], []
        self.last_routing = []
        for x, gate in zip(chunks, self.gates, strict=True):
            b, p, d = x.shape
            flat = x.reshape(b * p, d)
            idx, weights, logits, load = gate(flat)
            outs.append(self.dispatch(flat, idx, weights).reshape(b, p, d))
            routing.append((idx.reshape(b, p, -1), logits.reshape(b, p, -1), load.reshape(b, p, -1)))
            self.last_routing.append(idx)
        return outs, routing


def gate_loss(logits: Tensor, load: Tensor, mc: Tensor, k: int) -> Tensor:
    """Flex-MoE's gate loss for tokens of one modality: logits, load ``[B, P, E]``, mc ``[B]``.

    Stays with a missing modality (``mc > 0``): cross-entropy of their tokens' gate logits toward expert ``mc``, and
    cv^2 of importance and load over experts 1..E-1. Full stays: cv^2(importance) + cv^2(load) over all experts.
    Importance uses the softmax of the top-k clean logits per token (zeros elsewhere).
    """
    b, p, e = logits.shape
    flat_logits, flat_load = logits.reshape(b * p, e), load.reshape(b * p, e)
    token_mc = mc[:, None].expand(b, p).reshape(-1)
    vals, idx = flat_logits.topk(k, dim=-1)
    gates = torch.zeros_like(flat_logits).scatter(1, idx, torch.softmax(vals, dim=-1))
    loss = flat_logits.new_zeros(())
    full, partial = token_mc == 0, token_mc > 0
    if bool(full.any()):
        loss = loss + cv_squared(gates[full].sum(0)) + cv_squared(flat_load[full].sum(0))
    if bool(partial.any()):
        target = token_mc[partial].clamp_max(e - 1)
        loss = loss + F.cross_entropy(flat_logits[partial].float(), target)
        loss = loss + cv_squared(gates[partial][:, 1:].sum(0)) + cv_squared(flat_load[partial][:, 1:].sum(0))
    return loss


class FlexMoELayer(nn.Module):
    """Pre-LN attention over all tokens (with residual), then per-modality sparse-MoE or dense FFN (with residual)."""

    def __init__(self, d: int, heads: int, dropout: float, sparse: bool, num_experts: int, k: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, bias=False, batch_first=True)
        self.ffn_norm = nn.LayerNorm(d)
        self.sparse = sparse
        if sparse:
            self.moe = SparseMoE(d, num_experts, k, len(MODALITIES))
        else:
            self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)
        self.residual = True  # the paper's residual; tests switch it off to show it matters

    def forward(self, x: Tensor, n_patches: int) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        h = self.attn_norm(x)
        a = self.drop(self.attn(h, h, h, need_weights=False)[0])
        x = x + a if self.residual else a
        chunks = list(x.split(n_patches, dim=1))
        normed = [self.ffn_norm(c) for c in chunks]
        if self.sparse:
            outs, routing = self.moe(normed)
        else:
            outs, routing = [self.ffn(c) for c in normed], []
        return torch.cat([c + self.drop(o) for c, o in zip(chunks, outs, strict=True)], dim=1), routing


@register("flexmoe")
class FlexMoE(BaseModel):
    """Patch tokens per modality, combination-indexed missing embeddings, attention + alternating sparse/dense
    MoE layers with a noisy top-k gate and the combination-targeted gate loss, warm-up curriculum."""

    modalities: ClassVar[tuple[str, ...]] = MODALITIES
    missing_aware: ClassVar[bool] = True
    train_task_loss: ClassVar[bool] = False  # the method computes the (curriculum-masked) task loss itself
    default_hparams: ClassVar[dict[str, Any]] = {
        "hidden_dim": 128,
        "num_patches": 16,
        "num_layers": 2,
        "num_heads": 4,
        "num_experts": 16,
        "top_k": 4,
        "dropout": 0.5,
        "gate_weight": 0.01,
        "warmup_epochs": 5,
        "cxr_backbone": "resnet50",
        "cxr_pretrained": "imagenet",
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "hidden_dim": {"type": "categorical", "choices": [64, 128, 256]},
        "num_patches": {"type": "categorical", "choices": [4, 8, 16]},
        "num_layers": {"type": "int", "low": 1, "high": 4},
        "num_experts": {"type": "categorical", "choices": [4, 8, 16, 32]},
        "top_k": {"type": "int", "low": 1, "high": 4},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "gate_weight": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        "warmup_epochs": {"type": "int", "low": 0, "high": 5},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {
            "hidden_dim": 32,
            "num_patches": 4,
            "num_layers": 2,
            "num_heads": 2,
            "num_experts": 4,
            "top_k": 2,
            "dropout": 0.2,
            "warmup_epochs": 2,
            **CXR_QUICK,
        },
        "full": {},
        "test": {
            "hidden_dim": 8,
            "num_patches": 4,
            "num_layers": 2,
            "num_heads": 2,
            "num_experts": 4,
            "top_k": 2,
            "dropout": 0.0,
            "warmup_epochs": 2,
            **CXR_TEST,
        },
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        d, p, m = h["hidden_dim"], h["num_patches"], len(MODALITIES)
        if d % h["num_heads"]:
            raise ModelConfigError(f"{self._label()}: hidden_dim={d} must be divisible by num_heads")
        if h["num_experts"] < 2**m - 1:
            raise ModelConfigError(
                f"{self._label()}: num_experts must be >= {2**m - 1} (one per modality combination)"
            )
        if not 1 <= h["top_k"] <= h["num_experts"]:
            raise ModelConfigError(f"{self._label()}: top_k must be in [1, num_experts]")
        if p < 1:
            raise ModelConfigError(f"{self._label()}: num_patches must be >= 1")
        self.n_patches, self.d, self.top_k = p, d, h["top_k"]
        self.current_epoch: int | None = None  # set by on_train_epoch_start; None: no warm-up
        self.ehr_in = 2 * n_features
        self.ehr_patch = nn.Linear(
            self.ehr_in, d
        )  # per hour; averaged within the patch's hours (see ehr_tokens)
        self.ehr_patch_mix = nn.Linear(d, d)
        self.cxr_encoder = ResNetEncoder(self.choice("cxr_backbone", RESNET_ARCHS), h["cxr_pretrained"])
        self.cxr_hidden = nn.Linear(self.cxr_encoder.out_dim, d)
        self.chunk = math.ceil(d / p)
        self.cxr_patch = nn.Linear(self.chunk, d)
        self.missing_embeds = nn.Parameter(torch.randn(2**m - 1, m, p, d))
        self.positions = nn.Parameter(torch.zeros(1, m * p, d))
        self.layers = nn.ModuleList(
            [
                FlexMoELayer(d, h["num_heads"], h["dropout"], i % 2 == 0, h["num_experts"], h["top_k"])
                for i in range(h["num_layers"])
            ]
        )
        self.head = nn.Linear(m * d, self.num_outputs)

    # ------------------------------------------------------------------------------------- tokens
    def ehr_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, P, d]``: the hours split in P equal chunks; each hour projected, averaged within its chunk, mixed."""
        x = torch.cat([batch["ehr"], batch["ehr_mask"].to(batch["ehr"].dtype)], dim=-1)
        t = x.size(1)
        if t < self.n_patches:
            raise ModelConfigError(f"{self._label()}: {t} hours cannot make num_patches={self.n_patches}")
        bounds = torch.linspace(0, t, self.n_patches + 1).round().long().tolist()
        h = self.ehr_patch(x)
        pooled = torch.stack([h[:, a:z].mean(dim=1) for a, z in itertools.pairwise(bounds)], 1)
        return self.ehr_patch_mix(F.gelu(pooled))

    def cxr_tokens(self, batch: dict[str, Tensor], present: Tensor) -> Tensor:
        """``[B, P, d]``: ResNet -> hidden -> padded and split in P chunks -> Linear per chunk (zeros if missing)."""
        feat = encode_present(self.cxr_encoder, batch["cxr"], present, self.cxr_encoder.out_dim)
        hidden = self.cxr_hidden(feat)
        padded = F.pad(hidden, (0, self.chunk * self.n_patches - hidden.size(1)))
        return self.cxr_patch(padded.reshape(-1, self.n_patches, self.chunk))

    def tokens(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """All tokens ``[B, M*P, d]`` with missing modalities replaced from the bank, the presence ``[B, M]``, mc."""
        has_cxr = cxr_present(batch)
        present = torch.stack([torch.ones_like(has_cxr), has_cxr], dim=1)
        mc = combination_index(present)
        per_mod = [self.ehr_tokens(batch), self.cxr_tokens(batch, has_cxr)]
        bank = self.missing_embeds[mc]  # [B, M, P, d]
        filled = [
            torch.where(present[:, i, None, None], tok.to(bank.dtype), bank[:, i])
            for i, tok in enumerate(per_mod)
        ]
        return torch.cat(filled, dim=1), present, mc

    # --------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        x, present, mc = self.tokens(batch)
        x = x + self.positions
        gate_terms = []
        for layer in self.layers:
            x, routing = layer(x, self.n_patches)
            gate_terms += [gate_loss(logits, load, mc, self.top_k) for _, logits, load in routing]
        pooled = torch.cat([c.mean(dim=1) for c in x.split(self.n_patches, dim=1)], dim=-1)
        logits = self.head(pooled)
        keep = warmup_keep(present.sum(1), present.size(1), self.current_epoch, self.hparams["warmup_epochs"])
        task = masked_mean(per_sample_task_loss(self.task, logits, batch["y"]), keep)
        gate = sum(gate_terms) / max(len(gate_terms), 1) if gate_terms else logits.new_zeros(())
        return ModelOutput(logits, aux_losses={"task": task, "gate": self.hparams["gate_weight"] * gate})

    def on_train_epoch_start(self, trainer_module: Any) -> None:
        self.current_epoch = int(trainer_module.current_epoch)
