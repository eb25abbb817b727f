"""InfoReg: prime-learning-window detection from the Fisher trace, and regulation of the dominant encoder only."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from model_batches import F, S, make_batch

from carebench.data.loading import build_fold, make_loader
from carebench.data.store import open_dataset
from carebench.models import create_model
from carebench.models.base import per_sample_task_loss
from carebench.models.fusion.inforeg import fisher_weights, prime_window_rate
from carebench.training.module import CareBenchModule
from fake_dataset import make_fake_dataset

MIXED = (True, False, True, True)


def stub_module(epoch: int = 3) -> SimpleNamespace:
    """What the hooks read from the training module, for a single-process run."""
    return SimpleNamespace(
        current_epoch=epoch, trainer=SimpleNamespace(world_size=1), log=lambda *a, **k: None
    )


def build(task: str = "mortality", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("inforeg", task, F, S, preset="test", **overrides)


def test_prime_window_rate_known_values():
    assert prime_window_rate([0.0, 0.0], 2) == 1.0  # epoch 0: nothing learned yet, the window is open
    assert prime_window_rate([0.0, 0.0, 1.0], 2) == pytest.approx(1.0)  # (0.5 - 0) / 0.5
    assert prime_window_rate([0.0, 0.0, 1.0, 2.0], 2) == pytest.approx((1.5 - 0.5) / 1.5)
    assert prime_window_rate([0.0, 0.0, 1.0, 2.0, 2.0, 2.0], 2) == pytest.approx(0.0)  # plateau: closed
    assert prime_window_rate([0.0, 0.0, 4.0, 3.0, 2.0], 2) == pytest.approx((2.5 - 3.5) / 2.5)  # falling
    assert prime_window_rate([5.0, 1.0, 2.0, 3.0], 3) == pytest.approx((2.0 - 8.0 / 3.0) / 2.0)


def test_scores_are_true_label_probabilities_on_stays_with_an_xray():
    model = build("phenotype")
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        out = model(batch)
    model.training_hook(stub_module(), batch, out, torch.tensor(0.0))
    keep = torch.tensor(MIXED)
    y = batch["y"]
    expected = []
    for head in ("ehr", "cxr"):
        p = torch.sigmoid(out.extra_logits[head])
        expected.append((y * p + (1 - y) * (1 - p)).mean(dim=1)[keep].sum())
    torch.testing.assert_close(model._scores, torch.stack(expected))


def backward_step(model, batch):
    out = model(batch)
    loss = per_sample_task_loss(model.task, out.logits, batch["y"]).mean() + sum(out.aux_losses.values())
    model.zero_grad()
    loss.backward()
    return out


def grads(module):
    return [p.grad.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize(
    ("scores", "dominant", "other"), [((3.0, 1.0), "ehr", "cxr"), ((0.5, 2.5), "cxr", "ehr")]
)
def test_a_rising_fisher_trace_regulates_only_the_dominant_encoder(scores, dominant, other):
    model = build("los")
    encoders = {"ehr": model.ehr_encoder, "cxr": model.cxr_encoder}
    tm = stub_module()
    # a rising information amount for both modalities: the prime learning window is open (k = 2/3 > 0.05)
    model.trace_history = {"ehr": [0.0, 0.0, 1.0, 2.0], "cxr": [0.0, 0.0, 1.0, 2.0]}
    model.on_train_epoch_start(tm)
    assert model.window_rate == {"ehr": pytest.approx(2 / 3), "cxr": pytest.approx(2 / 3)}
    anchor = {m: [p.detach().clone() for p in enc.parameters()] for m, enc in encoders.items()}
    with torch.no_grad():  # the epoch has moved the parameters away from the epoch-start anchor
        for enc in encoders.values():
            for p in enc.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    batch = make_batch("los", has_cxr=(True,) * 4)
    out = backward_step(model, batch)
    model.training_hook(tm, batch, out, torch.tensor(0.0))
    model._scores = torch.tensor(scores)  # controlled: which modality's unimodal head is better
    before = {m: grads(enc) for m, enc in encoders.items()}
    expected_trace = {
        m: sum(float((p.grad**2).mean()) for p in fisher_weights(enc)) for m, enc in encoders.items()
    }
    model.before_optimizer_step(tm, None)

    beta = model.hparams[f"beta_{dominant}"] * math.exp(math.tanh(abs(scores[0] - scores[1])))
    assert model.last_regulation == (dominant, pytest.approx(beta))
    params = list(encoders[dominant].parameters())
    for p, g0, a in zip(params, before[dominant], anchor[dominant], strict=True):
        torch.testing.assert_close(p.grad, g0 + beta * (p.detach() - a))
    assert any(not torch.equal(p.grad, g0) for p, g0 in zip(params, before[dominant], strict=True))
    for p, g0 in zip(encoders[other].parameters(), before[other], strict=True):
        assert torch.equal(p.grad, g0)  # the other modality's update is untouched
    # the information amount is the squared gradient before regulation, appended at the end of the epoch
    model.on_train_epoch_end(tm)
    for m in ("ehr", "cxr"):
        assert model.trace_history[m][-1] == pytest.approx(expected_trace[m], rel=1e-5)
        assert model.trace_history[m][-1] > 0


def test_no_regulation_once_the_trace_has_plateaued():
    model = build("mortality")
    tm = stub_module()
    model.trace_history = {"ehr": [0.0, 0.0, 1.0, 2.0, 2.0, 2.0], "cxr": [0.0, 0.0, 1.0, 2.0, 2.0, 2.0]}
    model.on_train_epoch_start(tm)
    assert model.window_rate == {"ehr": 0.0, "cxr": 0.0}
    with torch.no_grad():
        for p in model.ehr_encoder.parameters():
            p.add_(0.05)
    model.train()
    batch = make_batch("mortality", has_cxr=(True,) * 4)
    out = backward_step(model, batch)
    model.training_hook(tm, batch, out, torch.tensor(0.0))
    model._scores = torch.tensor([3.0, 1.0])
    before = grads(model)
    model.before_optimizer_step(tm, None)
    assert model.last_regulation is None
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before, strict=True))


def ehr_features_and_head_block(model, batch):
    """The EHR features of a batch and the EHR block of the joint head's weight (its first d_ehr columns)."""
    f_ehr = model.ehr_encoder(torch.cat([batch["ehr"], batch["ehr_mask"]], -1))
    return f_ehr, model.head_joint.weight[:, : f_ehr.size(1)]


def test_missing_xray_removes_the_xray_term_of_the_joint_head():
    model = build("phenotype").eval()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        out = model(batch)
        f_ehr, w_ehr = ehr_features_and_head_block(model, batch)
        expected = f_ehr[1] @ w_ehr.T + model.head_joint.bias
    torch.testing.assert_close(out.logits[1], expected)
    keep = torch.tensor(MIXED)
    loss_cxr = per_sample_task_loss(model.task, out.extra_logits["cxr"], batch["y"])[keep].mean()
    torch.testing.assert_close(out.aux_losses["head_cxr"], loss_cxr)


def test_unimodal_logits_are_slices_of_the_joint_head():
    """As the authors' current code: out_m = W[:, block m] f_m + b/2, and out_ehr + out_cxr is the prediction.

    Fails with separate unimodal heads (the superseded commit) or a full bias on each slice.
    """
    model = build("phenotype").eval()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        out = model(batch)
        f_ehr, w_ehr = ehr_features_and_head_block(model, batch)
        b = model.head_joint.bias
        torch.testing.assert_close(out.extra_logits["ehr"], f_ehr @ w_ehr.T + b / 2)
        torch.testing.assert_close(out.extra_logits["ehr"] + out.extra_logits["cxr"], out.logits)
        # a stay without an X-ray: its X-ray slice is the half bias alone
        torch.testing.assert_close(out.extra_logits["cxr"][1], b / 2)
    assert not any(name.startswith(("head_ehr", "head_cxr")) for name, _ in model.named_parameters())


@pytest.mark.parametrize(("rate", "regulated"), [(0.045, False), (0.055, True)])
def test_the_window_threshold_is_the_authors_current_k_above_0_05(rate, regulated):
    model = build("mortality")
    assert model.hparams["k_threshold"] == 0.05
    tm = stub_module()
    model.on_train_epoch_start(tm)
    model.window_rate = {"ehr": rate, "cxr": rate}
    model.train()
    batch = make_batch("mortality", has_cxr=(True,) * 4)
    out = backward_step(model, batch)
    model.training_hook(tm, batch, out, torch.tensor(0.0))
    model._scores = torch.tensor([1.0, 3.0])  # the image-dominant branch
    model.before_optimizer_step(tm, None)
    assert (model.last_regulation is not None) == regulated
    if regulated:
        assert model.last_regulation[0] == "cxr"


def test_regulation_runs_inside_a_lightning_fit(tmp_path):
    """The hooks are wired: traces are recorded per epoch and epoch 0 (window open) regulates some steps."""
    root = make_fake_dataset(tmp_path, n=100, image_size=16, n_features=F, seed=7)
    fold = build_fold(open_dataset(root), task="mortality", fold=1, image_size=16)
    pl.seed_everything(0, verbose=False)
    model = create_model("inforeg", "mortality", F, 16, preset="test")
    seen = []
    original = model.before_optimizer_step

    def spy(tm, optimizer):
        original(tm, optimizer)
        seen.append(model.last_regulation)

    model.before_optimizer_step = spy
    module = CareBenchModule(model, "mortality", lr=1e-2)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    train = make_loader(fold.train, 16, shuffle=True, drop_last=True, seed=0)
    trainer.fit(module, train, make_loader(fold.val, 32, shuffle=False))
    window = model.hparams["fim_window"]
    for m in ("ehr", "cxr"):
        assert len(model.trace_history[m]) == window + 2 and all(
            t > 0 for t in model.trace_history[m][window:]
        )
    assert len(seen) == 2 * len(train)
    assert any(r is not None for r in seen[: len(train)])  # k = 1 in epoch 0
