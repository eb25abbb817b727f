"""``smil``: SMIL (Ma et al., AAAI 2021, "SMIL: Multimodal Learning with Severely Missing Modality"; authors'
code mengmenm/SMIL, read for reference only).

SMIL treats the X-ray as the (often) missing modality and the EHR as the one always available. A stay without an
X-ray gets a *reconstructed* X-ray feature, a weighted average of modality priors, and the fusion network is
trained by Bayesian meta-learning so that its prediction from a reconstruction generalises to stays where the
real X-ray exists.

Mechanism:
  * **Encoders and head.** EHR Transformer (the reference toolkit's setting) -> ``f_ehr``; ResNet -> ``Linear`` ->
    ``f_cxr`` (``cxr_dim``). Head as the authors' fusion net: ``concat(f_ehr, f_cxr) -> fc1 -> ReLU -> Dropout ->
    fc2`` -> logits.
  * **Modality priors.** ``priors`` ``[n_priors, cxr_dim]`` (a buffer, so checkpoints carry it) are the k-means
    centres of the X-ray features of the *trained* encoder over the training stays that have an X-ray. They are
    computed in the run (``fit_priors``): during the last pretraining epoch every training forward stores the
    detached ``f_cxr`` of its stays with an X-ray (never of a stay without one); at the end of that epoch
    ``kmeans`` (scikit-learn's ``KMeans(n_priors, random_state=0)``, as the authors) replaces the buffer.
  * **Reconstruction.** ``w = softplus(fc0(f_ehr))`` ``[n_priors]`` and ``recon = sum_k w_k c_k / sum_k w_k``
    (the authors' normalised weighted sum).
  * **Regularisation network** (the authors' "inference net"). On the reconstruction path the fused vector and
    the hidden layer are shifted: ``f = concat(f_ehr, recon) + softplus(fc_feat(f_ehr) + eps)`` and
    ``h = ReLU(fc1(f)) + softplus(fc_hidden(f) + eps)``, ``eps ~ N(0, 1)`` in meta-training and ``eps = 0``
    elsewhere (meta-validation and inference), as the authors' code. The real-X-ray path has no shift.
  * **Bayesian meta-learning (stage 2).** Each training batch is split into *meta-train* stays (without an X-ray;
    if the batch has none, the first half of its stays with an X-ray, with the X-ray hidden, since the authors
    meta-train on modality-missing samples) and *meta-validation* stays (with an X-ray). Inner step:
    ``theta* = theta - inner_lr * grad_theta CE(meta-train | reconstruction, eps)`` with ``create_graph`` (second
    order), where ``theta`` is the EHR encoder and the fusion head; the X-ray encoder (the missing modality's
    extractor) and the regularisation network are not inner-updated, as in the authors' code. The meta-validation
    loss is evaluated *with* ``theta*`` through ``torch.func.functional_call``:
    ``CE(pred from reconstruction) + mse_weight * MSE(f real, f recon) + mse_weight * MSE(h real, h recon)``
    ``+ clean_weight * CE(pred from the real X-ray)``. The objective is meta-train + meta-val loss
    (``aux_losses["meta_train"]``, ``aux_losses["meta_val"]``; ``train_task_loss`` False).
  * **Stage 1 (pretraining, ``pretrain_epochs``).** The authors first train the full multimodal model on complete
    data; here the model is trained on the task over the stays with an X-ray (``aux_losses["pretrain"]``), which
    are exactly the stays whose features give the priors. ``selection_start_epoch = pretrain_epochs``: the
    framework selects the checkpoint and early-stops on meta-stage epochs only and restarts the lr schedule there.
  * **Inference.** A stay with an X-ray: head on the real feature. A stay without one: head on the deterministic
    reconstruction (no noise), never a zero image. No batch statistics in eval.
  * Before the priors are fitted (a fresh model, outside the trainer) they are a fixed standard-normal draw from
    the model's seed, so the reconstruction is defined and trainable; a fresh model is in the meta stage (its
    final stage). A training split without any X-ray (the MIMIC-IV demo) leaves them so, with a warning.

Deviations (docs/methods.md): the priors come from the features of the last pretraining epoch's training forwards
(train mode, augmented images, the encoder as it learns during that epoch) instead of a separate eval pass of
the finished model, because the framework owns the loop; the meta-validation loss adds the CE of the real-X-ray
prediction (``clean_weight``; the authors compute it but do not train it, since their test stays all miss the
modality, while ours mostly have an X-ray) and the X-ray encoder stays trainable in the meta stage (the authors
freeze it); meta-train and meta-val stays come from one batch instead of two loaders; the unused variance layers
of the authors' inference net are left out; AdamW with the framework's settings instead of Adam(1e-3, wd 1e-4)
with StepLR.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

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
from carebench.models.registry import register

KMEANS_SEED = 0  # the authors' KMeans(random_state=0)


def kmeans(x: Tensor, k: int, seed: int = KMEANS_SEED) -> Tensor:
    """``[k, D]`` k-means centres of the rows of ``x [N, D]``: scikit-learn's ``KMeans(k, random_state=seed)``, as
    the authors (k-means++ initialisation, Lloyd iterations; deterministic for a seed).

    With fewer points than ``k`` every point is a centre and the extra centres repeat points in order.
    """
    from sklearn.cluster import KMeans  # imported here: only the end of SMIL's pretraining needs it

    if x.dim() != 2 or x.size(0) == 0:
        raise ValueError(f"kmeans needs a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    points = x.detach().double().cpu().numpy()
    if len(points) <= k:
        return x.detach().float()[torch.arange(k) % len(points)].to(x.device)
    centres = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(points).cluster_centers_
    return torch.from_numpy(centres).float().to(x.device)


def reconstruct(weights_logits: Tensor, priors: Tensor) -> Tensor:
    """``sum_k w_k c_k / sum_k w_k`` with ``w = softplus(weights_logits)`` ``[B, K]`` and priors ``[K, D]``."""
    w = F.softplus(weights_logits)
    return (w @ priors.to(w.dtype)) / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


class Regulariser(nn.Module):
    """The authors' inference net: reconstruction weights (``fc0``) and the feature / hidden-layer shifts."""

    def __init__(self, d_ehr: int, d_fused: int, hidden: int, n_priors: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(d_ehr, n_priors)
        self.fc_feat = nn.Linear(d_ehr, d_fused)
        self.fc_hidden = nn.Linear(d_fused, hidden)

    @staticmethod
    def shift(mu: Tensor, noise: bool) -> Tensor:
        return F.softplus(mu + torch.randn_like(mu) if noise else mu)


class FusionHead(nn.Module):
    """``concat(f_ehr, f_cxr) (+ shift) -> fc1 -> ReLU (+ shift) -> Dropout -> fc2``; returns logits, f, h."""

    def __init__(self, d_ehr: int, d_cxr: int, hidden: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_ehr + d_cxr, hidden)
        self.fc2 = nn.Linear(hidden, n_out)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, ehr: Tensor, cxr: Tensor, regulariser: Regulariser | None = None, noise: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        f = torch.cat([ehr, cxr.to(ehr.dtype)], dim=-1)
        if regulariser is not None:  # the reconstruction path
            f = f + regulariser.shift(regulariser.fc_feat(ehr), noise)
        h = F.relu(self.fc1(f))
        if regulariser is not None:
            h = h + regulariser.shift(regulariser.fc_hidden(f), noise)
        return self.fc2(self.dropout(h)), f, h


@register("smil")
class SMIL(BaseModel):
    """EHR Transformer + ResNet; missing X-ray = weighted k-means priors; Bayesian meta-learning (2nd order)."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    missing_aware: ClassVar[bool] = True
    train_task_loss: ClassVar[bool] = False
    default_hparams: ClassVar[dict[str, Any]] = {
        **TRANSFORMER_RESNET_DEFAULTS,
        "cxr_dim": 256,
        "fusion_hidden": 64,
        "dropout": 0.5,
        "n_priors": 10,
        "inner_lr": 1e-3,
        "second_order": True,
        "mse_weight": 0.01,
        "clean_weight": 1.0,
        "pretrain_epochs": 10,
    }
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "inner_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "n_priors": {"type": "categorical", "choices": [5, 10, 20]},
        "mse_weight": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "pretrain_epochs": {"type": "int", "low": 1, "high": 10},
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"ehr_hidden": 64, **CXR_QUICK, "cxr_dim": 64, "pretrain_epochs": 5},
        "full": {},
        "test": {
            "ehr_hidden": 8,
            "ehr_heads": 2,
            **CXR_TEST,
            "cxr_dim": 8,
            "fusion_hidden": 8,
            "dropout": 0.2,  # 0.5 on 8 hidden units keeps a 4-stay batch from being overfitted in 200 steps
            "n_priors": 3,
            "pretrain_epochs": 1,
        },
    }

    def __init__(self, task: str, n_features: int, image_size: int, **hparams: Any) -> None:
        super().__init__(task, n_features, image_size, **hparams)
        h = self.hparams
        if h["pretrain_epochs"] < 1:
            raise ModelConfigError(
                f"{self._label()}: pretrain_epochs must be >= 1 (the priors come from the pretrained encoder), "
                f"got {h['pretrain_epochs']}"
            )
        if h["n_priors"] < 1 or h["cxr_dim"] < 1 or h["fusion_hidden"] < 1:
            raise ModelConfigError(f"{self._label()}: n_priors, cxr_dim and fusion_hidden must be >= 1")
        self.ehr_encoder, self.cxr_encoder = transformer_resnet_encoders(self)
        self.cxr_proj = nn.Linear(self.cxr_encoder.out_dim, h["cxr_dim"])
        d_ehr = self.ehr_encoder.out_dim
        self.head = FusionHead(d_ehr, h["cxr_dim"], h["fusion_hidden"], self.num_outputs, h["dropout"])
        self.regulariser = Regulariser(d_ehr, d_ehr + h["cxr_dim"], h["fusion_hidden"], h["n_priors"])
        self.register_buffer("priors", torch.randn(h["n_priors"], h["cxr_dim"]))
        self.register_buffer("priors_fitted", torch.tensor(False))
        self.stage = "meta"
        self.collecting = False
        self._collected: list[Tensor] = []

    # ----------------------------------------------------------------------------------------- stages
    @property
    def selection_start_epoch(self) -> int:
        return int(self.hparams["pretrain_epochs"])

    def on_train_epoch_start(self, trainer_module: Any) -> None:
        epoch = int(trainer_module.current_epoch)
        self.stage = "pretrain" if epoch < self.selection_start_epoch else "meta"
        self.collecting = epoch == self.selection_start_epoch - 1
        self._collected = []

    def on_train_epoch_end(self, trainer_module: Any) -> None:
        if self.collecting:
            self.fit_priors()
        self.collecting = False

    def fit_priors(self) -> None:
        """Replace the priors by the k-means centres of the collected X-ray features.

        A training split without any X-ray gives no features: the priors keep their initial draw (with a warning),
        the reconstruction is then a learned mixture of fixed random vectors.
        """
        if self._collected:
            feats = torch.cat(self._collected)
            self.priors.copy_(kmeans(feats, int(self.hparams["n_priors"])).to(self.priors))
            self.priors_fitted.fill_(True)
        else:
            warnings.warn(
                f"{self._label()}: no training stay with an X-ray in the last pretraining epoch; the modality "
                "priors keep their random initialisation",
                stacklevel=2,
            )
        self._collected = []

    # ----------------------------------------------------------------------------------------- pieces
    def inner_names(self) -> list[str]:
        """Parameters of the inner step: the EHR encoder and the fusion head (not the X-ray encoder, not the
        regularisation network), as the authors' code."""
        return [n for n, _ in self.named_parameters() if n.startswith(("ehr_encoder.", "head."))]

    def cxr_features(self, batch: dict[str, Tensor], keep: Tensor) -> Tensor:
        """``[B, cxr_dim]`` projected X-ray features of the stays in ``keep`` (zeros elsewhere, never computed)."""
        feats = encode_present(self.cxr_encoder, batch["cxr"], keep, self.cxr_encoder.out_dim)
        return torch.where(keep[:, None], self.cxr_proj(feats), torch.zeros(()).to(feats))

    def reconstruction(self, ehr: Tensor) -> Tensor:
        """The deterministic reconstructed X-ray feature ``[B, cxr_dim]`` from EHR features ``[B, d_ehr]``."""
        return reconstruct(self.regulariser.fc0(ehr), self.priors)

    def _ehr(self, batch: dict[str, Tensor], rows: Tensor, params: dict[str, Tensor] | None) -> Tensor:
        x = ehr_input(batch)[rows]
        lengths = batch.get("ehr_lengths")
        lengths = None if lengths is None else lengths[rows]
        if params is None:
            return self.ehr_encoder(x, lengths)
        sub = {k.removeprefix("ehr_encoder."): v for k, v in params.items() if k.startswith("ehr_encoder.")}
        return functional_call(self.ehr_encoder, sub, (x, lengths))

    def _head(
        self, ehr: Tensor, cxr: Tensor, params: dict[str, Tensor] | None, recon: bool, noise: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        reg = self.regulariser if recon else None
        if params is None:
            return self.head(ehr, cxr, reg, noise)
        sub = {k.removeprefix("head."): v for k, v in params.items() if k.startswith("head.")}
        return functional_call(self.head, sub, (ehr, cxr), {"regulariser": reg, "noise": noise})

    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Deployment prediction: real X-ray feature where present, deterministic reconstruction elsewhere."""
        present = cxr_present(batch)
        every = torch.ones_like(present)
        ehr = self._ehr(batch, every, None)
        cxr = self.cxr_features(batch, present)
        if self.training and self.collecting and bool(present.any()):
            self._collected.append(cxr[present].detach().float().cpu())
        real, _, _ = self._head(ehr, cxr, None, recon=False)
        rec, _, _ = self._head(ehr, self.reconstruction(ehr), None, recon=True)
        return torch.where(present[:, None], real, rec)

    def meta_split(self, present: Tensor) -> tuple[Tensor, Tensor]:
        """(meta-train, meta-val) masks: stays without / with an X-ray; a batch where every stay has one hides the
        X-ray of the first half of them (the authors meta-train on modality-missing samples)."""
        meta_train, meta_val = ~present, present.clone()
        if not bool(meta_train.any()) and int(present.sum()) >= 2:
            first = present.nonzero().squeeze(1)[: int(present.sum()) // 2]
            meta_train = torch.zeros_like(present)
            meta_train[first] = True
            meta_val = present & ~meta_train
        return meta_train, meta_val

    def inner_step(self, batch: dict[str, Tensor], rows: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Meta-train loss on ``rows`` (reconstruction, noise), its logits and ``theta*`` (one SGD step on it)."""
        theta = {n: p for n, p in self.named_parameters() if n in set(self.inner_names())}
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():  # the inner step needs a gradient even when the caller does not
            ehr = self._ehr(batch, rows, None)
            logits, _, _ = self._head(ehr, self.reconstruction(ehr), None, recon=True, noise=True)
            loss = per_sample_task_loss(self.task, logits, batch["y"][rows]).mean()
            create = outer_grad and bool(self.hparams["second_order"])
            grads = torch.autograd.grad(
                loss, list(theta.values()), create_graph=create, retain_graph=outer_grad, allow_unused=True
            )
            lr = float(self.hparams["inner_lr"])
            theta_star = {
                n: p if g is None else p - lr * (g if create else g.detach())
                for (n, p), g in zip(theta.items(), grads, strict=True)
            }
        return loss, logits, theta_star

    def meta_val_loss(
        self, batch: dict[str, Tensor], rows: Tensor, params: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """Meta-validation loss on ``rows`` (stays with an X-ray) with weights ``params`` (``theta*``), and the
        real-X-ray logits."""
        h = self.hparams
        ehr = self._ehr(batch, rows, params)
        cxr = self.cxr_features(batch, rows)[rows]
        y = batch["y"][rows]
        real, f_real, h_real = self._head(ehr, cxr, params, recon=False)
        rec, f_rec, h_rec = self._head(ehr, self.reconstruction(ehr), params, recon=True, noise=False)
        loss = (
            per_sample_task_loss(self.task, rec, y).mean()
            + h["mse_weight"] * F.mse_loss(f_rec, f_real)
            + h["mse_weight"] * F.mse_loss(h_rec, h_real)
            + h["clean_weight"] * per_sample_task_loss(self.task, real, y).mean()
        )
        return loss, real

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        present = cxr_present(batch)
        if not self.training:
            return ModelOutput(self.predict(batch))
        if self.stage == "pretrain":
            logits = self.predict(batch)
            loss = masked_mean(per_sample_task_loss(self.task, logits, batch["y"]), present)
            return ModelOutput(logits, aux_losses={"pretrain": loss})
        # The fused attention kernels (flash / memory-efficient) have no double backward; the math one does.
        with sdpa_kernel([SDPBackend.MATH]):
            return self.meta_forward(batch, present)

    def meta_forward(self, batch: dict[str, Tensor], present: Tensor) -> ModelOutput:
        """A meta-stage training step: inner step on the meta-train stays, outer loss on the meta-val stays."""
        meta_train, meta_val = self.meta_split(present)
        logits = None
        aux: dict[str, Tensor] = {}
        theta_star = None
        if bool(meta_train.any()):
            aux["meta_train"], mt_logits, theta_star = self.inner_step(batch, meta_train)
            logits = mt_logits.new_zeros(present.size(0), mt_logits.size(1))
            logits[meta_train] = mt_logits
        if bool(meta_val.any()):
            aux["meta_val"], mv_logits = self.meta_val_loss(batch, meta_val, theta_star)
            if logits is None:
                logits = mv_logits.new_zeros(present.size(0), mv_logits.size(1))
            logits[meta_val] = mv_logits.to(logits.dtype)
        assert logits is not None  # every stay is in meta-train or meta-val
        return ModelOutput(logits, aux_losses=aux)
