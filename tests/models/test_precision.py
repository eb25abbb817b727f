"""bf16 mixed precision and channels-last memory layout, for every registered method (test preset, CPU).

- bf16-mixed: two optimiser steps through the real training path (CareBenchModule + Lightning's bf16-mixed plugin)
  from the same initial weights as two float32 steps; the resulting predictions of a fixed batch are finite and
  within BF16_TOL of the float32-trained model's, and so is a bf16 autocast forward pass of the same weights.
- channels-last: the same weights stored NHWC give the same outputs as the default layout, to float rounding.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from model_batches import F, S, make_batch
from torch.utils.data import DataLoader

from carebench.models import BaseModel, create_model, get_model_class, list_models
from carebench.training.config import TrainConfig
from carebench.training.module import CareBenchModule
from carebench.training.predict import build_model, probabilities

MODELS = list_models()
CXR_MODELS = [m for m in MODELS if "cxr" in get_model_class(m).modalities]
TASK = "mortality"
# Probabilities after two steps in bf16-mixed vs float32: observed at most 1.4e-2 (resnet), below 6e-3 for the
# other methods (bf16 keeps 8 bits of mantissa in the matrix products; weights and optimiser stay float32).
BF16_TOL = 0.03
# Same weights, NHWC vs NCHW: the same arithmetic in another summation order.
LAYOUT_TOL = 1e-4


def _batches(seed: int) -> list[dict]:
    return [make_batch(TASK, seed=seed + i, has_cxr=(True, False, True, True)) for i in range(2)]


def _train(model: BaseModel, precision: str) -> BaseModel:
    """Two training steps (plus one validation batch the plateau schedule needs) with Lightning at `precision`."""
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = CareBenchModule(model, TASK, lr=1e-3)
    loaders = [DataLoader(b, batch_size=None) for b in (_batches(1), [make_batch(TASK, seed=9)])]
    trainer.fit(module, train_dataloaders=loaders[0], val_dataloaders=loaders[1])
    return module.model


def _predict(model: BaseModel, batch: dict, bf16: bool = False) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(5)
        return probabilities(model.task.kind, model(batch).logits)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_mixed_training_runs_and_stays_close_to_float32(name):
    torch.manual_seed(0)
    fp32 = create_model(name, TASK, F, S, preset="test")
    bf16 = copy.deepcopy(fp32)
    fp32, bf16 = _train(fp32, "32-true"), _train(bf16, "bf16-mixed")
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # mixed: the weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(fp32.parameters(), bf16.parameters(), strict=True))
    batch = make_batch(TASK, seed=42)
    ref = _predict(fp32, batch)
    for p in (_predict(bf16, batch), _predict(bf16, batch, bf16=True)):
        assert torch.isfinite(p).all()
        assert (p - ref).abs().max().item() <= BF16_TOL, (p - ref).abs().max().item()


@pytest.mark.parametrize("name", CXR_MODELS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_channels_last_changes_outputs_by_float_rounding_only(name, mode):
    torch.manual_seed(0)
    nchw = create_model(name, TASK, F, S, preset="test")
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the layout did change
    batch = make_batch(TASK, seed=3, has_cxr=(True, False, True, True))
    outs = []
    for model in (nchw, nhwc):
        model.train(mode == "train")
        torch.manual_seed(11)  # same dropout draws
        out = model(batch)
        loss = out.logits.float().pow(2).mean() + sum(out.aux_losses.values())
        loss.backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(b.logits, a.logits, atol=LAYOUT_TOL, rtol=LAYOUT_TOL)
    assert a.extra_logits.keys() == b.extra_logits.keys()
    for k in a.extra_logits:
        torch.testing.assert_close(b.extra_logits[k], a.extra_logits[k], atol=LAYOUT_TOL, rtol=LAYOUT_TOL)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k].contiguous(), ga[k], atol=LAYOUT_TOL, rtol=1e-3, msg=k)


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_run_builds_its_image_encoder_channels_last_unless_told_not_to(channels_last):
    cls = get_model_class("latefusion")
    cfg = TrainConfig(
        model="latefusion",
        task=TASK,
        data="unused",
        data_fingerprint="unused",
        image_size=S,
        model_args=cls.resolve_hparams({}, preset="test"),
        channels_last=channels_last,
    )
    convs = [p for p in build_model(cfg, F).parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs) == channels_last
