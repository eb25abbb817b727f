"""``inforeg``: InfoReg, information acquisition regulation (Huang, Wei, Yang & Hu, "Adaptive Unimodal Regulation for
Balanced Multimodal Information Acquisition", CVPR 2025, arXiv 2503.18595; authors' code GeWu-Lab/InfoReg_CVPR2025,
read for reference only).

Idea: early training is a *prime learning window* in which the network acquires most of its information, and the
information-sufficient modality dominates it. InfoReg slows that modality's parameter updates while the window is
open, so the other modality can acquire information.

Mechanism:
  * Model: EHR encoder and X-ray ResNet; ``head_joint = Linear(d_ehr + d_cxr -> C)`` on the concatenated features
    (the prediction). The unimodal logits are *slices of the joint head*, as in the authors' current code:
    ``out_ehr = W[:, :d_ehr] f_ehr + b/2`` and ``out_cxr = W[:, d_ehr:] f_cxr + b/2``, so ``out_ehr + out_cxr`` is the
    joint logit. Loss = task loss of the joint head + task loss of each slice (weights 1, as the authors).
  * Information amount: per epoch, the trace of the (empirical, diagonal) Fisher information of each encoder,
    ``sum over weight tensors of mean(sum over steps of grad^2)``, from the gradients of every training step.
  * Prime learning window: the history of a modality's traces starts with ``fim_window`` zeros;
    at the start of an epoch ``k = (mean(h[-W:]) - mean(h[-W-1:-1])) / mean(h[-W:])`` (``k = 1`` while the history
    is all zeros, i.e. in epoch 0), the relative rise of the windowed information amount.
  * Dominant modality, per step: the one whose unimodal head gives the larger sum over the batch of the true label's
    probability (stays with an X-ray only, both heads on the same stays).
  * Regulation, per step, if the dominant modality's ``k > k_threshold`` (0.05, the authors' current value; either
    modality can be the regulated one): a proximal term pulls its encoder towards
    its parameters at the start of the epoch, ``grad += beta * (theta - theta_epoch_start)`` with
    ``beta = beta_m * exp(tanh(score_dominant - score_other))``; the other encoder's gradients are untouched. The
    term is the gradient of ``beta / 2 * ||theta - theta_epoch_start||^2`` and slows the dominant modality's update.

Missing X-ray (per stay): a stay without an image has no X-ray feature, so its joint logits are
``W_ehr @ f_ehr + b`` (the X-ray term of the linear joint head is removed); the X-ray slice's loss and the scores use
only stays with an image. Missing images are never encoded.

Superseded version: an earlier commit of the authors' code (775bde4) trained separate unimodal heads, used
``k > 0.04`` and tested the same condition twice, so the image-dominant branch could never run; carebench follows
the code after the authors' fix.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

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
    TRANSFORMER_RESNET_DEFAULTS,
    ehr_input,
    encode_present,
    transformer_resnet_encoders,
)
from carebench.models.fusion.aug import sample_score
from carebench.models.registry import register

MODALITIES = ("ehr", "cxr")


def prime_window_rate(history: list[float], window: int) -> float:
    """``k``: relative rise of the mean information amount over the last ``window`` epochs vs one epoch earlier.

    1.0 while the recent history is all zeros (nothing learned yet, the window is open), as in the authors' code.
    """
    recent = sum(history[-window:]) / window
    before = sum(history[-window - 1 : -1]) / window
    return 1.0 if recent <= 0.0 else (recent - before) / recent


def regulation_strength(score_dominant: float, score_other: float, beta: float) -> float:
    """``beta * exp(tanh(gap))``: the proximal coefficient for the dominant modality."""
    return beta * math.exp(math.tanh(score_dominant - score_other))


def fisher_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weight tensors whose squared gradients make the information amount (conv, linear, attention weights)."""
    return [
        p
        for name, p in module.named_parameters()
        if p.requires_grad and p.dim() >= 2 and name.rsplit(".", 1)[-1].endswith("weight")
    ]


@register("inforeg")
class InfoReg(BaseModel):
    """Concat head plus unimodal heads; the dominant encoder's updates are regulated in the prime learning window."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    default_hparams: ClassVar[dict[str, Any]] = {
        **TRANSFORMER_RESNET_DEFAULTS,
        "k_threshold": 0.05,
        "beta_ehr": 0.95,
        "beta_cxr": 0.1,
        "fim_window": 10,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "k_threshold": {"type": "float", "low": 0.01, "high": 0.1},
        "beta_ehr": {"type": "float", "low": 0.5, "high": 1.5},
        "beta_cxr": {"type": "float", "low": 0.05, "high": 0.5},
        "fim_window": {"type": "categorical", "choices": [5, 10, 15]},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"ehr_hidden": 64, **CXR_QUICK, "fim_window": 3},
        "full": {},
        "test": {"ehr_hidden": 8, "ehr_heads": 2, **CXR_TEST, "fim_window": 2},
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        if h["fim_window"] < 1:
            raise ModelConfigError(f"{self._label()}: fim_window must be >= 1, got {h['fim_window']}")
        self.ehr_encoder, self.cxr_encoder = transformer_resnet_encoders(self)
        d_e, d_c = self.ehr_encoder.out_dim, self.cxr_encoder.out_dim
        self.head_joint = nn.Linear(d_e + d_c, self.num_outputs)  # the unimodal logits are slices of it
        self.encoders = {
            "ehr": self.ehr_encoder,
            "cxr": self.cxr_encoder,
        }  # plain dict: no second registration
        # Regulation state (not part of the weights; rebuilt by training).
        self.trace_history: dict[str, list[float]] = {m: [0.0] * h["fim_window"] for m in MODALITIES}
        self.window_rate: dict[str, float] = {m: 1.0 for m in MODALITIES}
        self._trace = {m: 0.0 for m in MODALITIES}
        self._anchor: dict[str, list[Tensor]] = {}
        self._scores: Tensor | None = None
        self.last_regulation: tuple[str, float] | None = None  # (modality, beta) of the latest step, or None
        self.regulated_steps = {m: 0 for m in MODALITIES}

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        present = cxr_present(batch)
        f_ehr = self.ehr_encoder(ehr_input(batch), batch.get("ehr_lengths"))
        f_cxr = encode_present(self.cxr_encoder, batch["cxr"], present, self.cxr_encoder.out_dim).to(
            f_ehr.dtype
        )
        d_e = f_ehr.size(-1)
        w, half_bias = self.head_joint.weight, self.head_joint.bias / 2
        out_e = f_ehr @ w[:, :d_e].T + half_bias
        out_c = f_cxr @ w[:, d_e:].T + half_bias  # f_cxr is exactly 0 without an image
        logits = out_e + out_c  # = head_joint([f_ehr; f_cxr])
        y = batch["y"]
        aux = {
            "head_ehr": per_sample_task_loss(self.task, out_e, y).mean(),
            "head_cxr": masked_mean(per_sample_task_loss(self.task, out_c, y), present),
        }
        return ModelOutput(logits, aux_losses=aux, extra_logits={"ehr": out_e, "cxr": out_c})

    # ----------------------------------------------------------------------------- training hooks
    def on_train_epoch_start(self, trainer_module: Any) -> None:
        """Open/close the window from the trace history; remember the encoders' parameters (the proximal anchor)."""
        window = self.hparams["fim_window"]
        self.window_rate = {m: prime_window_rate(self.trace_history[m], window) for m in MODALITIES}
        self._anchor = {m: [p.detach().clone() for p in self.encoders[m].parameters()] for m in MODALITIES}
        self._trace = {m: 0.0 for m in MODALITIES}
        self.regulated_steps = {m: 0 for m in MODALITIES}

    def training_hook(
        self, trainer_module: Any, batch: dict[str, Tensor], output: ModelOutput, loss: Tensor
    ) -> None:
        """Scores of the unimodal heads on the stays with an X-ray: sum of the true label's probability."""
        present = cxr_present(batch)
        with torch.no_grad():
            self._scores = torch.stack(
                [
                    sample_score(self.task, output.extra_logits[m], batch["y"])[present].sum()
                    for m in MODALITIES
                ]
            )

    def before_optimizer_step(self, trainer_module: Any, optimizer: Any) -> None:
        """Accumulate the information amount, then regulate the dominant encoder inside the prime window."""
        with torch.no_grad():
            for m in MODALITIES:
                self._trace[m] += float(
                    sum(
                        (p.grad.float() ** 2).mean()
                        for p in fisher_weights(self.encoders[m])
                        if p.grad is not None
                    )
                )
            self.last_regulation = None
            if self._scores is None or not self._anchor:
                return
            scores = self._scores
            if trainer_module.trainer.world_size > 1:  # the same decision on every process
                scores = trainer_module.trainer.strategy.reduce(scores.clone(), reduce_op="sum")
            s_ehr, s_cxr = float(scores[0]), float(scores[1])
            self._scores = None
            if s_ehr == s_cxr:
                return
            dominant, other = ("ehr", s_cxr) if s_ehr > s_cxr else ("cxr", s_ehr)
            if self.window_rate[dominant] <= self.hparams["k_threshold"]:
                return
            beta = regulation_strength(max(s_ehr, s_cxr), other, self.hparams[f"beta_{dominant}"])
            for p, anchor in zip(self.encoders[dominant].parameters(), self._anchor[dominant], strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=beta)
            self.last_regulation = (dominant, beta)
            self.regulated_steps[dominant] += 1

    def on_train_epoch_end(self, trainer_module: Any) -> None:
        for m in MODALITIES:
            self.trace_history[m].append(self._trace[m])
            trainer_module.log(f"train/fim_trace_{m}", self._trace[m])
            trainer_module.log(f"train/regulated_steps_{m}", float(self.regulated_steps[m]))
