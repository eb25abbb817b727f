"""``m3care``: M3Care (Zhang et al., KDD 2022, "M3Care: Learning with Missing Modalities in Multimodal Healthcare
Data"; authors' code choczhang/M3Care, notebooks ``OV/`` and ``ODIR/``, read for reference only).

Idea: a missing modality is not generated in input space; its task-related *embedding* is imputed from the stay's
similar patients, where similarity is measured on the modalities both stays have.

Mechanism:
  * **Embeddings.** EHR: the shared EHR encoder, SELU, ``Linear(-> hidden_dim)`` (the authors' sequence modalities);
    X-ray: ResNet features (only of present images, ``encode_present``) -> ``Linear`` -> ReLU (their fundus images).
    A missing X-ray's embedding is exactly zero and is never used as an embedding.
  * **Learned kernel per modality.** ``K_m = (1 - sigmoid(eps_m)) k(BN(phi_m(h))) + sigmoid(eps_m) k(BN(h))``, with
    ``phi_m`` a 3-layer SELU MLP, ``eps_m`` initialised at -0.3, one BatchNorm shared by every modality, and ``k`` a
    Gaussian kernel averaged over 3 bandwidths ``bw * {1/2, 1, 2}`` (multiplier 2), ``bw`` = the mean squared
    distance over the pairs of distinct reference stays (detached, as the authors take it from ``.data``).
  * **Similarity.** ``S = sum_m K_m M_m / sum_m M_m`` (``M_m`` = both stays have modality m), thresholded with a
    learned ``t = sigmoid(theta)`` (theta init 0): ``ReLU(S - t) + 1[S > t] * t.detach()``: edges below t are zero,
    the others keep their value while theta still receives the gradient of ``-t``.
  * **Imputation.** Per modality a 2-layer GCN, ``SELU(A SELU(A h W1 + b1) W2 + b2)`` with the unnormalised
    adjacency ``A_m[i, j] = S'[i, j] * m_j``: columns are masked by availability, so a stay only ever aggregates
    stays that HAVE the modality, and the row of a stay that lacks it is weighted by the similarity of its other
    modalities. Present stays: gated mix ``w h~ + (1 - w) h`` with
    ``w = sigmoid(W1 h~) / (sigmoid(W1 h~) + sigmoid(W2 h))``; missing stays: ``h~``.
  * **Fusion.** The modality tokens plus learned type embeddings go through the authors' two fusion blocks
    (``Linear`` + sinusoidal positions, pre-LN multi-head attention and feed-forward with residuals, SELU; 4 heads,
    then 1 head), then the concatenated tokens through ``Linear -> SELU -> Dropout -> Linear`` (logits).
  * **Loss.** Task loss plus ``aux_losses["stability"] = lambda * sum_m |‖phi_m(H_m)‖ - ‖H_m‖|`` (Frobenius norms
    over the batch's stays that have modality m, as the authors' ``torch.norm`` of the batch matrix), lambda 1e-8.

Inference against a bank of training stays (batch independence). In training the graph is the batch, as the
authors do (batch statistics in the BatchNorm, bandwidth from the batch). Each training forward also writes the
detached embeddings and availability of its stays into a FIFO bank of ``bank_size`` stays (buffers, so the bank is
saved in and restored from checkpoints). In eval a stay's similarity row is computed against the bank only (plus its
own self-loop, never its batch-mates), bandwidths come from the bank, the BatchNorm uses its running statistics, and
the bank stays' first-layer GCN states are computed on the bank graph; so a test prediction depends only on the stay
and on the training bank. With an empty bank (before any training step) a stay has no neighbours: a present modality
goes through the GCN with its self-loop only, a missing one gets ``SELU(b2)`` (nothing to borrow from). The
authors' adjacency is not normalised, so a row's scale grows with the number of candidate neighbours; in eval each of
the N bank stays therefore weighs ``(B - 1) / N`` (B = the size of the last training batch, also a buffer): the bank
stands in for the B - 1 batch-mates a training stay has, whatever ``bank_size`` is (default 128).

Deviations (docs/methods.md): missing stays aggregate over present neighbours (the official ``m m^T`` masking leaves a
missing row empty, so its "imputation" is the GCN bias only); the eval bank; masked stays are left out of the
BatchNorm statistics, the bandwidths and the norm loss; the BatchNorm bias, which cancels in every distance and so
never gets a gradient, is frozen at 0; pre-LN sublayers really normalise (the authors' fusion
encoder passes the un-normalised input to its sublayers).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.models.base import BaseModel, ModelConfigError, ModelOutput, cxr_present
from carebench.models.encoders import (
    CXR_QUICK,
    CXR_TEST,
    TRANSFORMER_RESNET_DEFAULTS,
    SinusoidalPositions,
    ehr_input,
    encode_present,
    transformer_resnet_encoders,
)
from carebench.models.registry import register

MODALITIES = ("ehr", "cxr")
KERNEL_MUL = 2.0
KERNEL_NUM = 3
EPS_INIT = -0.3


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``[N, K]`` squared Euclidean distances, from explicit differences (exactly 0 on identical rows, never < 0)."""
    return (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)


def mean_bandwidth(d2: Tensor) -> Tensor:
    """The authors' bandwidth: the mean squared distance over the ``n^2 - n`` ordered pairs of distinct stays of a
    square distance matrix, detached. Fewer than two stays: 1 (a lone stay only meets itself, at distance 0, where
    every bandwidth gives 1). Floored at 1e-12 so identical embeddings give a kernel of 1, not NaN."""
    n = d2.size(0)
    if n < 2:
        return d2.new_ones(())
    return (d2.detach().sum() / (n * n - n)).clamp_min(1e-12)


def gaussian_kernel(d2: Tensor, bandwidth: Tensor) -> Tensor:
    """Mean of ``exp(-d2 / b)`` over the bandwidths ``b = bandwidth / 2^(3 // 2) * 2^i``, i = 0, 1, 2."""
    base = bandwidth / KERNEL_MUL ** (KERNEL_NUM // 2)
    return sum(torch.exp(-d2 / (base * KERNEL_MUL**i)) for i in range(KERNEL_NUM)) / KERNEL_NUM


def scatter_block(block: Tensor, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """A zero ``[n_rows, n_cols]`` matrix holding ``block`` at ``(rows, cols)`` (differentiable, out of place)."""
    out = block.new_zeros(n_rows, n_cols)
    return out.index_put((rows[:, None], cols[None, :]), block)


def mix_kernels(k_proj: Tensor, k_raw: Tensor, eps: Tensor) -> Tensor:
    """``(1 - sigmoid(eps)) * k_proj + sigmoid(eps) * k_raw``: learned-metric kernel mixed with the raw one."""
    s = torch.sigmoid(eps)
    return (1 - s) * k_proj + s * k_raw


def threshold_similarity(s: Tensor, theta: Tensor) -> Tensor:
    """Edges below ``t = sigmoid(theta)`` become 0; the others keep their value ``s`` (``s - t + t.detach()``)."""
    t = torch.sigmoid(theta)
    cut = F.relu(s - t)
    return cut + (cut > 0).to(s.dtype) * t.detach()


def gated_mix(
    imputed: Tensor, own: Tensor, present: Tensor, w_imp: nn.Linear, w_own: nn.Linear
) -> tuple[Tensor, Tensor]:
    """Present stays: ``w * imputed + (1 - w) * own`` with ``w = s1 / (s1 + s2)``, ``s1 = sigmoid(W1 imputed)``,
    ``s2 = sigmoid(W2 own)``; missing stays: ``imputed``. Returns (mixed ``[B, d]``, w ``[B, 1]``)."""
    s1 = torch.sigmoid(w_imp(imputed))
    s2 = torch.sigmoid(w_own(own))
    w = s1 / (s1 + s2)
    mixed = w * imputed + (1 - w) * own
    return torch.where(present[:, None], mixed, imputed), w


class GraphConvolution(nn.Module):
    """``adj @ (x W) + b`` (Kipf & Welling without normalisation, as the authors); U(+-1/sqrt(out)) init."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_out)
        self.weight = nn.Parameter(torch.empty(d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(d_out).uniform_(-bound, bound))

    def forward(self, adj: Tensor, x: Tensor) -> Tensor:
        return adj @ (x @ self.weight) + self.bias

    def attached(self, self_w: Tensor, x_q: Tensor, adj_qk: Tensor, x_k: Tensor) -> Tensor:
        """Queries attached to a fixed context graph: ``self_w * x_q W + adj_qk @ (x_k W) + b``."""
        return self_w[:, None] * (x_q @ self.weight) + adj_qk @ (x_k @ self.weight) + self.bias


class FusionBlock(nn.Module):
    """One of the authors' multimodal encoder blocks: ``Linear`` + sinusoidal positions, then pre-LN multi-head
    attention and a ReLU feed-forward (4d, dropout 0.1), each with a residual and dropout, then SELU."""

    def __init__(self, d: int, heads: int, dropout: float, n_tokens: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.pos = SinusoidalPositions(d, n_tokens)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos(self.embed(x))
        h = self.attn_norm(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        x = x + self.drop(self.ffn(self.ffn_norm(x)))
        return F.selu(x)


@register("m3care")
class M3Care(BaseModel):
    """Per-modality embeddings, learned kernels -> thresholded similarity graph -> GCN imputation (batch graph in
    training, bank of training stays in eval) -> gated mix -> transformer over modality tokens -> head."""

    modalities: ClassVar[tuple[str, ...]] = MODALITIES
    missing_aware: ClassVar[bool] = True
    default_hparams: ClassVar[dict[str, Any]] = {
        **TRANSFORMER_RESNET_DEFAULTS,
        "hidden_dim": 256,
        "fusion_heads": 4,
        "dropout": 0.5,
        "stability_weight": 1e-8,
        "bank_size": 128,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "hidden_dim": {"type": "categorical", "choices": [128, 256]},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "stability_weight": {"type": "float", "low": 1e-8, "high": 1e-7, "log": True},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"ehr_hidden": 64, "hidden_dim": 64, **CXR_QUICK},
        "full": {},
        "test": {
            "ehr_hidden": 8,
            "ehr_heads": 2,
            "hidden_dim": 8,
            "fusion_heads": 2,
            "dropout": 0.0,
            **CXR_TEST,
        },
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        d, m = h["hidden_dim"], len(MODALITIES)
        if d % h["fusion_heads"]:
            raise ModelConfigError(f"{self._label()}: hidden_dim={d} must be divisible by fusion_heads")
        if h["bank_size"] < 1:
            raise ModelConfigError(f"{self._label()}: bank_size must be >= 1")
        self.d = d
        self.ehr_encoder, self.cxr_encoder = transformer_resnet_encoders(self)
        self.ehr_proj = nn.Linear(self.ehr_encoder.out_dim, d)
        self.cxr_proj = nn.Linear(self.cxr_encoder.out_dim, d)
        self.phi = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(d, d), nn.SELU(), nn.Linear(d, d), nn.SELU(), nn.Linear(d, d))
                for _ in range(m)
            ]
        )
        self.bn = nn.BatchNorm1d(d)  # shared by every modality and by both kernel inputs, as the authors
        # Its shift cancels in every pairwise distance, so the bias never receives a gradient (in the authors' model
        # too): frozen at its initial 0 instead of being a parameter that cannot learn.
        self.bn.bias.requires_grad_(False)
        self.eps = nn.Parameter(torch.full((m,), EPS_INIT))
        self.theta = nn.Parameter(torch.zeros(1))
        self.gcn1 = nn.ModuleList([GraphConvolution(d, d) for _ in range(m)])
        self.gcn2 = nn.ModuleList([GraphConvolution(d, d) for _ in range(m)])
        self.gate_imputed = nn.ModuleList([nn.Linear(d, 1) for _ in range(m)])
        self.gate_own = nn.ModuleList([nn.Linear(d, 1) for _ in range(m)])
        self.type_embed = nn.Embedding(m, d)
        nn.init.normal_(self.type_embed.weight, std=0.02)  # the authors' init_weights
        self.fusion = nn.ModuleList(
            [FusionBlock(d, h["fusion_heads"], h["dropout"], m), FusionBlock(d, 1, h["dropout"], m)]
        )
        self.head = nn.Sequential(
            nn.Linear(m * d, 2 * d), nn.SELU(), nn.Dropout(h["dropout"]), nn.Linear(2 * d, self.num_outputs)
        )
        n = h["bank_size"]
        self.register_buffer("bank_h", torch.zeros(m, n, d))
        self.register_buffer("bank_avail", torch.zeros(m, n, dtype=torch.bool))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_next", torch.zeros((), dtype=torch.long))
        # the size of the last training batch: how many batch-mates the bank stands in for
        self.register_buffer("bank_batch", torch.zeros((), dtype=torch.long))

    # -------------------------------------------------------------------------------------- embeddings
    def embed(self, batch: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per-modality embeddings ``[B, d]`` (zeros where missing) and availability ``[B]`` bool."""
        has_cxr = cxr_present(batch)
        ehr = self.ehr_proj(F.selu(self.ehr_encoder(ehr_input(batch), batch.get("ehr_lengths"))))
        feat = encode_present(self.cxr_encoder, batch["cxr"], has_cxr, self.cxr_encoder.out_dim)
        cxr = torch.where(has_cxr[:, None], F.relu(self.cxr_proj(feat.to(ehr.dtype))), ehr.new_zeros(()))
        return [ehr, cxr], [torch.ones_like(has_cxr), has_cxr]

    def _bn(self, x: Tensor) -> Tensor:
        """The shared BatchNorm; a training step with fewer than two rows normalises with the running statistics
        (batch statistics of one row are undefined)."""
        if self.training and x.size(0) < 2:
            return F.batch_norm(
                x,
                self.bn.running_mean,
                self.bn.running_var,
                self.bn.weight,
                self.bn.bias,
                False,
                0.0,
                self.bn.eps,
            )
        return self.bn(x)

    def kernel_inputs(self, m: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(BN(phi_m(h)), BN(h))``: the inputs of the learned and of the raw kernel."""
        return self._bn(self.phi[m](h)), self._bn(h)

    def modality_kernel(
        self, m: int, q: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Mixed kernel of queries vs reference stays ``[Nq, Nr]`` and within the references ``[Nr, Nr]``, with
        bandwidths from the reference stays. ``q``/``ref`` are ``kernel_inputs`` pairs."""
        out_q, out_r = [], []
        for x_q, x_r in zip(q, ref, strict=True):
            d_rr = squared_distances(x_r, x_r)
            bw = mean_bandwidth(d_rr)
            k_rr = gaussian_kernel(d_rr, bw)
            out_q.append(k_rr if x_q is x_r else gaussian_kernel(squared_distances(x_q, x_r), bw))
            out_r.append(k_rr)
        return mix_kernels(out_q[0], out_q[1], self.eps[m]), mix_kernels(out_r[0], out_r[1], self.eps[m])

    # ------------------------------------------------------------------------------------ training graph
    def batch_graph(self, hs: list[Tensor], avail: list[Tensor]) -> Tensor:
        """Training: thresholded similarity ``[B, B]`` among the batch's stays (the authors' graph)."""
        b = hs[0].size(0)
        num = hs[0].new_zeros(b, b)
        den = hs[0].new_zeros(b, b)
        for m, (h, av) in enumerate(zip(hs, avail, strict=True)):
            idx = av.nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            inputs = self.kernel_inputs(m, h[idx])  # masked stays never enter the BN statistics
            _, k = self.modality_kernel(m, inputs, inputs)
            num = num + scatter_block(k, idx, idx, b, b)
            den = den + (av[:, None] & av[None, :]).to(den.dtype)
        return threshold_similarity(num / den.clamp_min(1.0), self.theta)

    # -------------------------------------------------------------------------------------- eval graph
    def bank_graph(
        self, hs: list[Tensor], avail: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Eval: thresholded similarity of each stay with itself ``[B]``, with the bank ``[B, N]`` and within the
        bank ``[N, N]``, plus the bank's embeddings and availability. Never a batch-mate."""
        n = int(self.bank_count)
        b = hs[0].size(0)
        bank_h = [self.bank_h[m, :n].to(hs[m].dtype) for m in range(len(hs))]
        bank_av = [self.bank_avail[m, :n] for m in range(len(hs))]
        num_q, den_q = hs[0].new_zeros(b, n), hs[0].new_zeros(b, n)
        num_k, den_k = hs[0].new_zeros(n, n), hs[0].new_zeros(n, n)
        for m, (h, av) in enumerate(zip(hs, avail, strict=True)):
            idx = bank_av[m].nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            k_q, k_r = self.modality_kernel(
                m, self.kernel_inputs(m, h), self.kernel_inputs(m, bank_h[m][idx])
            )
            rows = torch.arange(b, device=h.device)
            pair_q = av[:, None].to(h.dtype).expand(-1, idx.numel())
            num_q = num_q + scatter_block(k_q * pair_q, rows, idx, b, n)
            den_q = den_q + scatter_block(pair_q, rows, idx, b, n)
            num_k = num_k + scatter_block(k_r, idx, idx, n, n)
            den_k = den_k + scatter_block(torch.ones_like(k_r), idx, idx, n, n)
        self_s = threshold_similarity(hs[0].new_ones(b), self.theta)  # every kernel is 1 at distance 0
        s_q = threshold_similarity(num_q / den_q.clamp_min(1.0), self.theta)
        s_k = threshold_similarity(num_k / den_k.clamp_min(1.0), self.theta)
        # The adjacency is not normalised, so the bank stands in for the batch-mates of a training step: a training
        # stay has B - 1 of them, so each of the N bank stays weighs (B - 1) / N (and (B - 1) / (N - 1) within the
        # bank, whose self-loops keep weight 1). Row sums then match the training graph whatever the bank size.
        others = max(int(self.bank_batch) - 1, 0)
        s_q = s_q * (others / n if n else 0.0)
        off = ~torch.eye(n, dtype=torch.bool, device=s_k.device)
        s_k = torch.where(off, s_k * (others / (n - 1) if n > 1 else 0.0), s_k)
        return self_s, s_q, s_k, bank_h, bank_av

    # -------------------------------------------------------------------------------------- imputation
    def impute(self, hs: list[Tensor], avail: list[Tensor]) -> tuple[list[Tensor], dict[str, Any]]:
        """GCN imputation and gated mix for every modality, and the detached intermediates (similarity, and per
        modality the adjacency, GCN output, gate and final embedding) for inspection."""
        state: dict[str, Any] = {"gcn": [], "w": [], "adj": [], "final": []}
        finals = []
        if self.training:
            s = self.batch_graph(hs, avail)
            state["similarity"] = s.detach()
        else:
            self_s, s_q, s_k, bank_h, bank_av = self.bank_graph(hs, avail)
            state["similarity"] = s_q.detach()
        for m, (h, av) in enumerate(zip(hs, avail, strict=True)):
            if self.training:
                adj = s * av[None, :].to(s.dtype)  # columns: only stays that have modality m
                g = F.selu(self.gcn2[m](adj, F.selu(self.gcn1[m](adj, h))))
            else:
                col = bank_av[m][None, :].to(s_q.dtype)
                adj, adj_k = s_q * col, s_k * col
                self_w = self_s * av.to(self_s.dtype)
                h1_k = F.selu(self.gcn1[m](adj_k, bank_h[m]))
                h1_q = F.selu(self.gcn1[m].attached(self_w, h, adj, bank_h[m]))
                g = F.selu(self.gcn2[m].attached(self_w, h1_q, adj, h1_k))
            final, w = gated_mix(g, h, av, self.gate_imputed[m], self.gate_own[m])
            finals.append(final)
            for key, value in (("gcn", g), ("w", w), ("adj", adj), ("final", final)):
                state[key].append(value.detach())
        return finals, state

    @torch.no_grad()
    def _push_bank(self, hs: list[Tensor], avail: list[Tensor]) -> None:
        """FIFO: write this training batch's detached embeddings and availability into the bank."""
        n = self.bank_h.size(1)
        b = hs[0].size(0)
        take = min(b, n)
        slots = (int(self.bank_next) + torch.arange(take, device=self.bank_h.device)) % n
        for m, (h, av) in enumerate(zip(hs, avail, strict=True)):
            self.bank_h[m, slots] = h[b - take :].detach().to(self.bank_h.dtype)
            self.bank_avail[m, slots] = av[b - take :]
        self.bank_next.fill_((int(self.bank_next) + take) % n)
        self.bank_batch.fill_(b)
        self.bank_count.fill_(min(int(self.bank_count) + take, n))

    def stability_loss(self, hs: list[Tensor], avail: list[Tensor]) -> Tensor:
        """``sum_m |‖phi_m(H_m)‖_F - ‖H_m‖_F|`` over the stays that have modality m (unweighted)."""
        total = hs[0].new_zeros(())
        for m, (h, av) in enumerate(zip(hs, avail, strict=True)):
            if bool(av.any()):
                hm = h[av]
                total = total + (torch.linalg.norm(self.phi[m](hm)) - torch.linalg.norm(hm)).abs()
        return total

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        return self.forward_with_state(batch)[0]

    def forward_with_state(self, batch: dict[str, Tensor]) -> tuple[ModelOutput, dict[str, Any]]:
        """``forward``, and the imputation's intermediates of this very call (``impute``)."""
        hs, avail = self.embed(batch)
        finals, state = self.impute(hs, avail)
        if self.training:
            self._push_bank(hs, avail)
        types = self.type_embed.weight.to(finals[0].dtype)
        z = torch.stack(finals, dim=1) + types[None]
        for block in self.fusion:
            z = block(z)
        logits = self.head(z.flatten(1))
        aux = {"stability": self.hparams["stability_weight"] * self.stability_loss(hs, avail)}
        return ModelOutput(logits, aux_losses=aux), state
