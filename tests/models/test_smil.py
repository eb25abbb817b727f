"""SMIL: k-means priors of the trained encoder, normalised reconstruction, the inner step that is actually used,
the deterministic reconstruction at test time, and selection on the meta stage only."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from model_batches import F as N_FEATURES
from model_batches import S, make_batch
from torch.func import functional_call

from carebench.models import create_model
from carebench.models.base import per_sample_task_loss
from carebench.models.encoders import ehr_input
from carebench.models.fusion.smil import kmeans, reconstruct
from carebench.training import resolve_config, train_run
from fake_dataset import make_fake_dataset

MIXED = (True, False, True, False)


def build(task: str = "phenotype", **overrides):
    torch.manual_seed(0)
    return create_model("smil", task, N_FEATURES, S, preset="test", **overrides)


def epoch(n: int) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=n)


def strip(params: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------- reconstruction
def test_reconstruction_is_the_normalised_softplus_weighted_sum_of_the_priors():
    weights = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    logits = torch.log(torch.expm1(weights))  # softplus(logits) == weights
    priors = torch.tensor([[0.0, 4.0], [8.0, 0.0]])
    torch.testing.assert_close(reconstruct(logits, priors), torch.tensor([[6.0, 1.0], [4.0, 2.0]]))
    # the model's reconstruction is that formula on fc0(EHR feature) and its priors buffer
    model = build().eval()
    ehr = torch.randn(3, model.ehr_encoder.out_dim)
    w = F.softplus(model.regulariser.fc0(ehr))
    expected = (w[:, :, None] * model.priors[None]).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(model.reconstruction(ehr), expected)


# ------------------------------------------------------------------------------------------- k-means priors
def test_kmeans_finds_known_centres_and_is_seeded():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0], [0.0, 2.0]])
    centres = kmeans(x, 2)
    centres = centres[centres[:, 0].argsort()]
    torch.testing.assert_close(centres, torch.tensor([[0.0, 1.0], [10.0, 10.5]]))
    torch.testing.assert_close(kmeans(x, 1), x.mean(0, keepdim=True))
    blobs = torch.cat(
        [torch.randn(30, 3) * 0.1 + c for c in (torch.zeros(3), torch.ones(3) * 5, -torch.ones(3) * 5)]
    )
    a, b = kmeans(blobs, 3), kmeans(blobs, 3)
    assert torch.equal(a, b)  # seeded: the same priors every run
    means = torch.stack([blobs[:30].mean(0), blobs[30:60].mean(0), blobs[60:].mean(0)])
    torch.testing.assert_close(a[a[:, 0].argsort()], means[means[:, 0].argsort()])


def test_priors_are_kmeans_centres_of_the_trained_encoders_features_of_training_stays_with_an_xray():
    model = build(pretrain_epochs=2, n_priors=2)
    initial = model.priors.clone()
    model.train()
    model.on_train_epoch_start(epoch(0))  # first pretraining epoch: nothing is collected
    assert model.stage == "pretrain" and not model.collecting
    model(make_batch("phenotype", seed=1, has_cxr=MIXED))
    model.on_train_epoch_end(epoch(0))
    assert torch.equal(model.priors, initial) and not bool(model.priors_fitted)

    model.on_train_epoch_start(epoch(1))  # the last pretraining epoch collects
    assert model.collecting
    expected = []
    for seed, pattern in [(2, MIXED), (3, (False, True, True, True)), (4, (False,) * 4)]:
        batch = make_batch("phenotype", seed=seed, has_cxr=pattern)
        batch["cxr"][~batch["has_cxr"]] = 1e3  # a stay without an X-ray must never enter the priors
        present = batch["has_cxr"]
        with torch.no_grad():
            model(batch)
            # the encoder being trained, on the stays with an X-ray only (train mode: the same batch statistics)
            expected.append(model.cxr_proj(model.cxr_encoder(batch["cxr"][present])))
    model.eval()
    with torch.no_grad():
        model(make_batch("phenotype", seed=5))  # validation forwards are not training stays
    model.train()
    assert sum(len(c) for c in model._collected) == 2 + 3  # exactly the stays with an X-ray
    feats = torch.cat(expected)
    model.on_train_epoch_end(epoch(1))
    torch.testing.assert_close(model.priors, kmeans(feats, 2))
    assert bool(model.priors_fitted) and model._collected == []
    # a split without X-rays leaves the priors as they are, and says so
    model.on_train_epoch_start(epoch(1))
    with torch.no_grad():
        model(make_batch("phenotype", seed=6, has_cxr=(False,) * 4))
    assert model._collected == []
    fitted = model.priors.clone()
    with pytest.warns(UserWarning, match="no training stay with an X-ray"):
        model.on_train_epoch_end(epoch(1))
    assert torch.equal(model.priors, fitted)
    # the priors are a buffer: checkpoints carry them
    assert "priors" in model.state_dict() and "priors_fitted" in model.state_dict()


# ------------------------------------------------------------------------------------------- inner step
def meta_batch(task: str = "phenotype"):
    return make_batch(task, seed=3, has_cxr=MIXED)


def hand_meta_losses(model, batch, inner_lr: float):
    """Meta-train and meta-val losses computed by hand (dropout 0, so the only draws are the two shifts' noise)."""
    h = model.hparams
    present = batch["has_cxr"]
    mt, mv = ~present, present
    theta = {n: p for n, p in model.named_parameters() if n.startswith(("ehr_encoder.", "head."))}
    x = ehr_input(batch)
    reg = model.regulariser

    def recon(e):
        w = F.softplus(reg.fc0(e))
        return (w @ model.priors) / w.sum(1, keepdim=True)

    e = model.ehr_encoder(x[mt])
    f = torch.cat([e, recon(e)], 1)
    f = f + F.softplus(reg.fc_feat(e) + torch.randn(f.shape))
    hid = F.relu(model.head.fc1(f))
    hid = hid + F.softplus(reg.fc_hidden(f) + torch.randn(hid.shape))
    loss_mt = per_sample_task_loss(model.task, model.head.fc2(hid), batch["y"][mt]).mean()
    grads = torch.autograd.grad(loss_mt, list(theta.values()), create_graph=True)
    star = {n: p - inner_lr * g for (n, p), g in zip(theta.items(), grads, strict=True)}

    e = functional_call(model.ehr_encoder, strip(star, "ehr_encoder."), (x[mv],))
    cxr = model.cxr_proj(model.cxr_encoder(batch["cxr"][mv]))
    head = strip(star, "head.")
    real, f_real, h_real = functional_call(model.head, head, (e, cxr))
    rec, f_rec, h_rec = functional_call(model.head, head, (e, recon(e)), {"regulariser": reg, "noise": False})
    y = batch["y"][mv]
    loss_mv = (
        per_sample_task_loss(model.task, rec, y).mean()
        + h["mse_weight"] * F.mse_loss(f_rec, f_real)
        + h["mse_weight"] * F.mse_loss(h_rec, h_real)
        + h["clean_weight"] * per_sample_task_loss(model.task, real, y).mean()
    )
    return loss_mt, loss_mv


@pytest.mark.parametrize("task", ["phenotype", "los"])
def test_the_outer_loss_is_evaluated_with_the_inner_updated_weights(task):
    model = build(task, dropout=0.0, ehr_dropout=0.0, inner_lr=0.5).train()
    batch = meta_batch(task)
    torch.manual_seed(11)
    out = model(batch)
    assert set(out.aux_losses) == {"meta_train", "meta_val"}
    torch.manual_seed(11)
    loss_mt, loss_mv = hand_meta_losses(model, batch, inner_lr=0.5)
    torch.testing.assert_close(out.aux_losses["meta_train"], loss_mt)
    torch.testing.assert_close(out.aux_losses["meta_val"], loss_mv)
    # with theta* = theta (inner_lr 0) the outer loss is a different number
    torch.manual_seed(11)
    _, loss_theta = hand_meta_losses(model, batch, inner_lr=0.0)
    assert not torch.allclose(out.aux_losses["meta_val"], loss_theta, rtol=1e-4, atol=1e-6)
    flat = build(task, dropout=0.0, ehr_dropout=0.0, inner_lr=0.0).train()
    torch.manual_seed(11)
    assert not torch.allclose(
        flat(batch).aux_losses["meta_val"], out.aux_losses["meta_val"], rtol=1e-4, atol=1e-6
    )


def test_the_inner_step_is_second_order_and_excludes_the_xray_encoder():
    model = build(dropout=0.0, ehr_dropout=0.0, inner_lr=0.5).train()
    assert all(n.startswith(("ehr_encoder.", "head.")) for n in model.inner_names())
    assert not any(n.startswith(("cxr_", "regulariser.")) for n in model.inner_names())
    batch = meta_batch()

    def grad_of_meta_val(m):
        m.zero_grad()
        torch.manual_seed(11)
        m(batch).aux_losses["meta_val"].backward()
        return m.head.fc1.weight.grad.clone()

    first = build(dropout=0.0, ehr_dropout=0.0, inner_lr=0.5, second_order=False).train()
    assert not torch.allclose(grad_of_meta_val(model), grad_of_meta_val(first), rtol=1e-4, atol=1e-7)
    # the first-order variant still trains the meta-train loss in the outer step (its graph is kept)
    first.zero_grad()
    sum(first(batch).aux_losses.values()).backward()
    assert first.regulariser.fc0.weight.grad.abs().sum() > 0


def test_a_batch_where_every_stay_has_an_xray_meta_trains_on_half_of_them_with_the_xray_hidden():
    model = build(dropout=0.0, ehr_dropout=0.0).train()
    batch = make_batch("phenotype", seed=4, has_cxr=(True,) * 4)
    meta_train, meta_val = model.meta_split(batch["has_cxr"])
    assert meta_train.tolist() == [True, True, False, False] and meta_val.tolist() == [
        False,
        False,
        True,
        True,
    ]
    other = dict(batch, cxr=batch["cxr"].clone())
    other["cxr"][:2] = torch.randn_like(other["cxr"][:2]) * 50  # the hidden X-rays are never read
    torch.manual_seed(1)
    a = model(batch)
    torch.manual_seed(1)
    b = model(other)
    for key in ("meta_train", "meta_val"):
        assert torch.equal(a.aux_losses[key], b.aux_losses[key]), key


# ------------------------------------------------------------------------------------------- inference
def test_a_test_stay_without_an_xray_gets_the_deterministic_reconstruction():
    model = build().eval()
    model.priors.copy_(torch.randn_like(model.priors) * 3)
    batch = make_batch("phenotype", seed=6, has_cxr=MIXED)
    missing = ~batch["has_cxr"]
    with torch.no_grad():
        first, second = model(batch).logits, model(batch).logits
        assert torch.equal(first, second)  # no noise at test time
        ehr = model.ehr_encoder(ehr_input(batch))
        expected, _, _ = model.head(ehr, model.reconstruction(ehr), model.regulariser, noise=False)
        zero_image, _, _ = model.head(ehr, torch.zeros_like(model.reconstruction(ehr)))
        zero_recon, _, _ = model.head(ehr, torch.zeros_like(model.reconstruction(ehr)), model.regulariser)
        real, _, _ = model.head(ehr, model.cxr_features(batch, batch["has_cxr"]))
    torch.testing.assert_close(first[missing], expected[missing])
    torch.testing.assert_close(first[~missing], real[~missing])
    assert not torch.allclose(first[missing], zero_image[missing])
    assert not torch.allclose(first[missing], zero_recon[missing])
    # the priors decide the prediction of a stay without an X-ray (and only of such stays)
    model.priors.mul_(-1)
    with torch.no_grad():
        moved = model(batch).logits
    assert not torch.allclose(moved[missing], first[missing])
    assert torch.equal(moved[~missing], first[~missing])


# ------------------------------------------------------------------------------------------- stages
def test_a_fresh_model_is_in_the_meta_stage_and_pretraining_trains_the_stays_with_an_xray():
    model = build(pretrain_epochs=3)
    assert model.stage == "meta" and model.selection_start_epoch == 3
    model.on_train_epoch_start(epoch(2))
    assert model.stage == "pretrain" and model.collecting
    model.on_train_epoch_start(epoch(3))
    assert model.stage == "meta" and not model.collecting
    model.on_train_epoch_start(epoch(0))
    model.train()
    batch = make_batch("phenotype", seed=2, has_cxr=MIXED)
    torch.manual_seed(0)
    out = model(batch)
    assert set(out.aux_losses) == {"pretrain"}
    per_stay = per_sample_task_loss(model.task, out.logits, batch["y"])
    torch.testing.assert_close(out.aux_losses["pretrain"], per_stay[batch["has_cxr"]].mean())
    with pytest.raises(Exception, match="pretrain_epochs must be >= 1"):
        build(pretrain_epochs=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_framework_selects_and_stops_on_meta_stage_epochs_only(tmp_path):
    root = make_fake_dataset(tmp_path / "data", n=120, image_size=16, n_features=4, seed=3)
    cfg = resolve_config(
        data=root,
        model="smil",
        task="mortality",
        preset="test",
        options={"progress": False, "max_epochs": 3},
        overrides={"model.pretrain_epochs": 1},
    )
    run = train_run(cfg, tmp_path / "runs")
    assert run.metrics["best_epoch"] >= 1 and run.metrics["epochs_trained"] == 3
    curves = pd.read_csv(run.run_dir / "log" / "metrics.csv").dropna(subset=["train/loss"])
    by_epoch = curves.groupby("epoch")
    assert by_epoch["train/aux_pretrain"].mean().notna().tolist() == [True, False, False]
    assert by_epoch["train/aux_meta_val"].mean().notna().tolist() == [False, True, True]
    state = torch.load(run.run_dir / "checkpoint", map_location="cpu", weights_only=False)["state_dict"]
    assert bool(state["model.priors_fitted"])  # the selected checkpoint carries the k-means priors
    assert math.isfinite(run.metrics["test"]["auroc"])
