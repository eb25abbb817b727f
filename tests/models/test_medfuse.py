"""MedFuse's staged recipe (unimodal pretraining, then the fusion stage) and the authors' Adam betas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from model_batches import F, S, make_batch

from carebench.models import create_model
from carebench.models.base import masked_mean, per_sample_task_loss
from carebench.training.module import CareBenchModule

MIXED = (True, False, True, False)


def build(task: str = "phenotype", **overrides):
    torch.manual_seed(0)
    return create_model("medfuse", task, F, S, preset="test", **overrides)


def epoch(n: int) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=n)


def test_a_fresh_model_is_in_the_fusion_stage_and_selection_starts_after_pretraining():
    model = build(pretrain_epochs=3)
    assert model.stage == "fusion" and model.selection_start_epoch == 3
    # the authors fine-tune the fusion at lr 7e-5 after pretraining the EHR LSTM at 5.4e-4
    assert model.last_stage_lr_scale == pytest.approx(0.13)
    assert not any(p.requires_grad for p in model.ehr_head.parameters())
    assert all(p.requires_grad for p in model.fusion.parameters())


def test_pretraining_predicts_with_the_ehr_classifier_and_trains_the_image_classifier_on_paired_stays():
    model = build(pretrain_epochs=2)
    model.on_train_epoch_start(epoch(1))
    assert model.stage == "pretrain"
    model.eval()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        out = model(batch)
        seq, _ = model.modality_sequence(batch)
    torch.testing.assert_close(out.logits, model.ehr_head(seq[:, 0]))
    cxr_logits = model.cxr_head(seq[:, 1])
    expected = masked_mean(per_sample_task_loss(model.task, cxr_logits, batch["y"]), torch.tensor(MIXED))
    torch.testing.assert_close(out.aux_losses["pretrain_cxr"], expected)
    # the image classifier learns from the paired stays only: a stay without an X-ray gives it no gradient
    model.train()
    model.zero_grad()
    solo = {k: v[1:2] for k, v in batch.items()}  # stay 1 has no X-ray
    model(solo).aux_losses["pretrain_cxr"].backward()
    assert model.cxr_head.weight.grad is None or not model.cxr_head.weight.grad.any()
    # the fusion stage is idle and frozen during pretraining
    assert not any(p.requires_grad for p in model.fusion.parameters())
    assert all(p.requires_grad for p in model.cxr_head.parameters())


def test_the_fusion_stage_starts_at_pretrain_epochs_and_reads_the_image():
    model = build(pretrain_epochs=2)
    model.on_train_epoch_start(epoch(2))
    assert model.stage == "fusion"
    model.eval()
    batch = make_batch("phenotype", has_cxr=(True,) * 4)
    other = dict(batch, cxr=torch.randn_like(batch["cxr"]))
    with torch.no_grad():
        assert not torch.allclose(model(batch).logits, model(other).logits)
        model.set_stage("pretrain")
        torch.testing.assert_close(
            model(batch).logits, model(other).logits
        )  # the EHR classifier ignores images


def test_the_optimiser_uses_the_authors_betas_for_every_parameter():
    model = build()
    module = CareBenchModule(model, "phenotype", lr=1e-3)
    opt = module.configure_optimizers()["optimizer"]
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.9)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
