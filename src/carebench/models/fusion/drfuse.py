"""``drfuse``: DrFuse (Yao et al., AAAI 2024), disentangled representations with disease-wise attention fusion.

Mechanism (paper, and the authors' code dorothy-yao/drfuse, read for reference only):
  * Per modality a *shared* and a *distinct* (modality-specific) representation. EHR: ``Linear`` + learned
    positions -> one common Transformer layer -> two Transformer branches (shared, distinct) -> mean over time.
    CXR: a ResNet stem shared by two ResNet bodies (shared, distinct), each followed by ``Linear(-> d)``.
  * Both shared representations pass through the same projection MLP (d -> 2d -> d -> d). Where the X-ray exists
    they are fused by *logit averaging*: ``s = logit((sigmoid(h_ehr) + sigmoid(h_cxr)) / 2)`` element-wise (computed
    with logsumexp); without an X-ray ``s = h_ehr``.
  * Disease-wise attention: the tokens ``[ehr_distinct, s, cxr_distinct]`` are projected to a query, a value and one
    key per class; the query is averaged over the available tokens; per class, softmax attention over the tokens
    (the CXR token masked out when the image is missing) weights the values, and class c's logit is read from its
    own attended feature (``diag(Linear(feat_c))``).
  * Losses (all in ``aux_losses``, weighted by the lambdas; the framework adds the final-prediction loss):
    prediction losses of three auxiliary heads (``shared`` from s, ``ehr`` from ehr_distinct, ``cxr`` from
    cxr_distinct, the last on stays with an X-ray only); disentanglement = lambda_ds * JSD(sigmoid(h_ehr_shared),
    sigmoid(h_cxr_shared)) + lambda_de * |cos(ehr shared, ehr distinct)| + lambda_dc * |cos(cxr shared, cxr
    distinct)|; attention ranking = mean over the pairs (cxr vs ehr, shared vs ehr, shared vs cxr) of a zero-margin
    ranking loss asking the attention of the modality with the lower (detached) per-class prediction loss to be
    the higher one.

Deviations from the authors' code, all to fix defects (docs/methods.md): every paired-only term (JSD, CXR
orthogonality, CXR prediction loss, ranking) is masked to stays that have an X-ray (the original sums the JSD over
all stays, imageless ones included); the auxiliary heads return logits and use the task's own loss (cross-entropy
for LOS; the reference fed sigmoid outputs to cross-entropy); a missing image is never encoded.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carebench.models.base import (
    BaseModel,
    ModelConfigError,
    ModelOutput,
    TaskSpec,
    cxr_present,
    hide_xrays,
    masked_mean,
    per_sample_task_loss,
)
from carebench.models.encoders import (
    CXR_QUICK,
    CXR_TEST,
    RESNET_ARCHS,
    LearnedPositions,
    ResNetEncoder,
    batchnorm_safe,
    ehr_input,
    padding_mask,
    pool_steps,
    transformer_stack,
)
from carebench.models.registry import register

_LAMBDA = {"type": "float", "low": 0.01, "high": 2.0}


def logit_average(h_a: Tensor, h_b: Tensor) -> Tensor:
    """``logit((sigmoid(h_a) + sigmoid(h_b)) / 2)`` element-wise, in a numerically stable logsumexp form."""
    both = h_a + h_b
    num = torch.logsumexp(torch.stack([both, both, h_a, h_b]), dim=0)
    zeros = torch.zeros_like(h_a)
    den = torch.logsumexp(torch.stack([zeros, zeros, h_a, h_b]), dim=0)
    return num - den


def sigmoid_jsd(h_a: Tensor, h_b: Tensor, paired: Tensor) -> Tensor:
    """DrFuse's Jensen-Shannon term between ``sigmoid`` of two representations, mean over paired stays.

    As in the authors' code each feature's sigmoid is one probability mass ``p``, and the divergence is
    ``0.5 * sum(p log(p/m) + q log(q/m))`` with ``m = (p+q)/2``, summed over features; here only paired stays count.
    """
    log_p, log_q = F.logsigmoid(h_a.float()), F.logsigmoid(h_b.float())
    p, q = log_p.exp(), log_q.exp()
    log_m = (0.5 * (p + q)).clamp_min(1e-12).log()
    per_sample = 0.5 * (p * (log_p - log_m) + q * (log_q - log_m)).sum(dim=1)
    return masked_mean(per_sample, paired)


def attention_ranking_loss(
    attn: Tensor, loss_ehr: Tensor, loss_shared: Tensor, loss_cxr: Tensor, paired: Tensor
) -> Tensor:
    """DrFuse's attention-ranking loss.

    attn: ``[B,C,3]`` attention over (ehr_distinct, shared, cxr_distinct) per class; ``loss_*``: ``[B,C]`` detached
    per-class prediction losses of the three auxiliary heads; paired: ``[B]`` bool. For each pair (cxr vs ehr,
    shared vs ehr, shared vs cxr) the head with the lower loss should receive more attention: per element
    ``max(0, -sign * (attn_a - attn_b))`` with ``sign = +1`` if a's loss is lower else -1, kept on paired stays,
    summed and divided by the number of positive (violating) elements; the three terms are averaged.
    """
    a_ehr, a_shared, a_cxr = attn[..., 0], attn[..., 1], attn[..., 2]
    keep = paired.to(attn.dtype)[:, None]
    terms = []
    for a_first, a_second, l_first, l_second in (
        (a_cxr, a_ehr, loss_cxr, loss_ehr),
        (a_shared, a_ehr, loss_shared, loss_ehr),
        (a_shared, a_cxr, loss_shared, loss_cxr),
    ):
        sign = 2.0 * (l_first < l_second).to(attn.dtype) - 1.0
        violation = keep * F.margin_ranking_loss(a_first, a_second, sign, margin=0.0, reduction="none")
        terms.append(violation.sum() / (violation > 0).sum().clamp_min(1).to(attn.dtype))
    return sum(terms) / 3.0


def per_class_loss(task: TaskSpec, logits: Tensor, y: Tensor) -> Tensor:
    """``[B,C]`` prediction loss per class: BCE per label, or the sample's cross-entropy repeated over classes."""
    if task.kind == "multiclass":
        return per_sample_task_loss(task, logits, y)[:, None].expand(-1, logits.size(1))
    return F.binary_cross_entropy_with_logits(
        logits.float(), y.reshape(logits.shape).float(), reduction="none"
    )


class DrFuseEHREncoder(nn.Module):
    """``Linear`` + learned positions -> common Transformer layer -> (shared, distinct) branches -> masked mean."""

    def __init__(self, n_inputs: int, d: int, heads: int, layers: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(n_inputs, d)
        self.pos = LearnedPositions(d, max_len=512)
        self.common = transformer_stack(d, heads, 1, ff_dim, dropout)
        self.shared = transformer_stack(d, heads, layers, ff_dim, dropout)
        self.distinct = transformer_stack(d, heads, layers, ff_dim, dropout)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pad = padding_mask(lengths, x.size(1))
        h = self.common(self.pos(self.proj(x)), src_key_padding_mask=pad)
        shared = pool_steps(self.shared(h, src_key_padding_mask=pad), pad)
        distinct = pool_steps(self.distinct(h, src_key_padding_mask=pad), pad)
        return shared, distinct


@register("drfuse")
class DrFuse(BaseModel):
    """Shared/distinct encoders per modality, logit-averaged shared feature, disease-wise attention fusion."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    missing_aware: ClassVar[bool] = True
    default_hparams: ClassVar[dict[str, Any]] = {
        "hidden": 256,
        "ehr_heads": 4,
        "ehr_layers": 1,
        "ehr_ff_dim": 2048,
        "ehr_dropout": 0.3,
        "cxr_backbone": "resnet50",
        "cxr_pretrained": "imagenet",
        "lambda_disentangle_shared": 1.0,
        "lambda_disentangle_ehr": 1.0,
        "lambda_disentangle_cxr": 1.0,
        "lambda_pred_ehr": 1.0,
        "lambda_pred_cxr": 1.0,
        "lambda_pred_shared": 1.0,
        "lambda_attn_aux": 1.0,
        "aug_missing_ratio": 0.0,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lambda_disentangle_shared": _LAMBDA,
        "lambda_disentangle_ehr": _LAMBDA,
        "lambda_disentangle_cxr": _LAMBDA,
        "lambda_pred_ehr": _LAMBDA,
        "lambda_pred_cxr": _LAMBDA,
        "lambda_pred_shared": _LAMBDA,
        "lambda_attn_aux": _LAMBDA,
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"hidden": 64, "ehr_ff_dim": 128, **CXR_QUICK},
        "full": {},
        "test": {"hidden": 8, "ehr_heads": 2, "ehr_ff_dim": 16, **CXR_TEST},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        d, c = h["hidden"], self.num_outputs
        if not 0.0 <= h["aug_missing_ratio"] < 1.0:
            raise ModelConfigError(
                f"{self._label()}: hyper-parameter 'aug_missing_ratio' must be in [0, 1), got {h['aug_missing_ratio']}"
            )
        self.ehr_encoder = DrFuseEHREncoder(
            2 * n_features, d, h["ehr_heads"], h["ehr_layers"], h["ehr_ff_dim"], h["ehr_dropout"]
        )
        arch = self.choice("cxr_backbone", RESNET_ARCHS)
        shared_cnn = ResNetEncoder(arch, h["cxr_pretrained"])
        distinct_cnn = ResNetEncoder(arch, h["cxr_pretrained"])
        self.cxr_stem = shared_cnn.stem()  # one stem feeds both bodies, as in the authors' code
        self.cxr_shared_body = shared_cnn.body()
        self.cxr_distinct_body = distinct_cnn.body()
        self.cxr_shared_fc = nn.Linear(shared_cnn.out_dim, d)
        self.cxr_distinct_fc = nn.Linear(distinct_cnn.out_dim, d)
        self.shared_project = nn.Sequential(
            nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d)
        )
        self.ehr_head = nn.Linear(d, c)
        self.cxr_head = nn.Linear(d, c)
        self.shared_head = nn.Linear(d, c)
        self.attn_proj = nn.Linear(d, (2 + c) * d)
        self.final_fc = nn.Linear(d, c)

    def _encode_cxr(self, images: Tensor, present: Tensor, d: int) -> tuple[Tensor, Tensor]:
        """(shared, distinct) ``[B,d]`` features of the present images; exact zeros for missing ones."""
        shared = images.new_zeros(images.size(0), d)
        distinct = images.new_zeros(images.size(0), d)
        if bool(present.any()):
            kept = images[present]
            with batchnorm_safe(self, kept):
                stem = self.cxr_stem(kept)
                s = self.cxr_shared_fc(self.cxr_shared_body(stem))
                t = self.cxr_distinct_fc(self.cxr_distinct_body(stem))
            shared, distinct = shared.to(s.dtype), distinct.to(t.dtype)
            shared[present], distinct[present] = s, t
        return shared, distinct

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """All intermediate quantities (features, attention ``[B,C,3]``, head logits); ``forward`` uses this."""
        present = cxr_present(batch)
        if self.training:  # the paper's training-time augmentation: hide some present images
            present = hide_xrays(present, self.hparams["aug_missing_ratio"])
        d = self.hparams["hidden"]
        ehr_shared, ehr_distinct = self.ehr_encoder(ehr_input(batch), batch.get("ehr_lengths"))
        cxr_shared, cxr_distinct = self._encode_cxr(batch["cxr"], present, d)
        ehr_shared = self.shared_project(ehr_shared)
        cxr_shared = self.shared_project(cxr_shared.to(ehr_shared.dtype))
        cxr_distinct = cxr_distinct.to(ehr_distinct.dtype)
        col = present[:, None]
        shared = torch.where(col, logit_average(ehr_shared, cxr_shared), ehr_shared)

        tokens = torch.stack([ehr_distinct, shared, cxr_distinct], dim=1)  # [B,3,d]
        q, v, *keys = self.attn_proj(tokens).chunk(2 + self.num_outputs, dim=-1)
        q_mean = torch.where(col, q.mean(dim=1), q[:, :2].mean(dim=1))
        scores = torch.einsum("bd,bctd->bct", q_mean, torch.stack(keys, dim=1)) / math.sqrt(d)
        hide_cxr = (~present)[:, None, None] & (torch.arange(3, device=scores.device) == 2)[None, None, :]
        attn = scores.masked_fill(hide_cxr, float("-inf")).softmax(dim=-1)  # [B,C,3]
        feat = attn @ v  # [B,C,d]: one attended feature per class
        logits = torch.einsum("bcd,cd->bc", feat, self.final_fc.weight) + self.final_fc.bias
        return {
            "present": present,
            "ehr_shared": ehr_shared,
            "ehr_distinct": ehr_distinct,
            "cxr_shared": cxr_shared,
            "cxr_distinct": cxr_distinct,
            "shared": shared,
            "attn": attn,
            "logits": logits,
            "ehr": self.ehr_head(ehr_distinct),
            "cxr": self.cxr_head(cxr_distinct),
            "shared_logits": self.shared_head(shared),
        }

    def aux_losses(self, out: dict[str, Tensor], y: Tensor) -> dict[str, Tensor]:
        """The weighted auxiliary losses of DrFuse (see module docstring)."""
        h, task, present = self.hparams, self.task, out["present"]
        everyone = torch.ones_like(present)
        pred_ehr = per_sample_task_loss(task, out["ehr"], y)
        pred_cxr = per_sample_task_loss(task, out["cxr"], y)
        pred_shared = per_sample_task_loss(task, out["shared_logits"], y)
        orth_ehr = F.cosine_similarity(out["ehr_shared"].float(), out["ehr_distinct"].float(), dim=1).abs()
        orth_cxr = F.cosine_similarity(out["cxr_shared"].float(), out["cxr_distinct"].float(), dim=1).abs()
        with torch.no_grad():
            raw = {k: per_class_loss(task, out[k], y) for k in ("ehr", "cxr", "shared_logits")}
        ranking = attention_ranking_loss(
            out["attn"].float(), raw["ehr"], raw["shared_logits"], raw["cxr"], present
        )
        return {
            "pred_shared": h["lambda_pred_shared"] * masked_mean(pred_shared, everyone),
            "pred_ehr": h["lambda_pred_ehr"] * masked_mean(pred_ehr, everyone),
            "pred_cxr": h["lambda_pred_cxr"] * masked_mean(pred_cxr, present),
            "disentangle_shared_jsd": h["lambda_disentangle_shared"]
            * sigmoid_jsd(out["ehr_shared"], out["cxr_shared"], present),
            "disentangle_ehr_orth": h["lambda_disentangle_ehr"] * masked_mean(orth_ehr, everyone),
            "disentangle_cxr_orth": h["lambda_disentangle_cxr"] * masked_mean(orth_cxr, present),
            "attn_ranking": h["lambda_attn_aux"] * ranking,
        }

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        out = self.encode(batch)
        aux = self.aux_losses(out, batch["y"]) if "y" in batch else {}
        extra = {"ehr": out["ehr"], "cxr": out["cxr"], "shared": out["shared_logits"]}
        return ModelOutput(out["logits"], aux_losses=aux, extra_logits=extra)
