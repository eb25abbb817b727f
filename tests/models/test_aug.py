"""AUG: sustained boosting loss, adaptive classifier assignment, and layers added mid-training being trained."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as tF
from lightning.pytorch.callbacks import ModelCheckpoint
from model_batches import F, S, make_batch

from carebench.data.loading import build_fold, make_loader
from carebench.data.store import open_dataset
from carebench.models import create_model
from carebench.models.base import TASKS
from carebench.models.fusion.aug import boosting_loss
from carebench.training.module import CareBenchModule
from fake_dataset import make_fake_dataset

MIXED = (True, False, True, False)


def build(task: str = "mortality", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("aug", task, F, S, preset="test", **overrides)


def test_boosting_loss_cross_entropy_equals_the_authors_form():
    g = torch.Generator().manual_seed(1)
    out, prev, add = (torch.randn(5, 7, generator=g) for _ in range(3))
    y = torch.tensor([0, 6, 3, 3, 1])
    onehot = tF.one_hot(y, 7).float()
    rho = 0.5
    soft = onehot * torch.softmax(prev, -1)  # the authors' target y * softmax(prev)

    def ce(z, t):
        return -(t * torch.log_softmax(z, -1)).sum(-1)

    expected = ce(out, onehot) + ce(prev, onehot) + ce(add, onehot) - rho * ce(add, soft)
    torch.testing.assert_close(boosting_loss(TASKS["los"], out, prev, add, y, rho), expected)
    torch.testing.assert_close(boosting_loss(TASKS["los"], out, None, None, y, rho), ce(out, onehot))


def test_boosting_loss_bce_weighs_each_label_by_the_residual_of_the_ensemble():
    out = torch.tensor([[0.5, -1.0]])
    prev = torch.tensor([[2.0, 0.0]])
    add = torch.tensor([[-0.3, 0.8]])
    y = torch.tensor([[1.0, 0.0]])
    p_true = torch.tensor([[torch.sigmoid(torch.tensor(2.0)).item(), 0.5]])  # prev's probability of the truth
    bce = tF.binary_cross_entropy_with_logits
    expected = (
        bce(out, y, reduction="none").mean()
        + bce(prev, y, reduction="none").mean()
        + ((1 - 0.5 * p_true) * bce(add, y, reduction="none")).mean()
    )
    got = boosting_loss(TASKS["phenotype"], out, prev, add, y, 0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_added_layers_sum_through_the_shared_output_layer():
    model = build("phenotype").eval()
    first, second = model.add_layer("ehr"), model.add_layer("ehr")
    feat = torch.randn(3, model.feature_dims["ehr"])
    with torch.no_grad():
        out, prev, add = model.classify("ehr", feat)
        base = model.fc_out(model.embed["ehr"](feat))
        l1, l2 = (model.fc_out(torch.relu(layer(feat))) for layer in (first, second))
    torch.testing.assert_close(prev, base + l1)
    torch.testing.assert_close(add, l2)
    torch.testing.assert_close(out, base + l1 + l2)
    assert first.bias.abs().sum() == 0
    assert model.classify("cxr", torch.randn(3, model.feature_dims["cxr"]))[1] is None  # cxr not boosted


def test_adaptive_classifier_assignment_rule():
    model = build(lam=1.0, margin=0.01, check_interval=5)
    assert model.assign(1.2, epoch=0) == "cxr"  # EHR stronger after epoch 0: boost the X-ray classifier
    assert model.assign(0.8, epoch=0) == "ehr"
    assert model.assign(1.005, epoch=0) is None  # inside the margin
    assert model.assign(1.2, epoch=1) is None and model.assign(1.2, epoch=3) is None  # not a check epoch
    assert model.assign(0.5, epoch=4) == "ehr" and model.assign(0.5, epoch=9) == "ehr"


def test_missing_xray_predicts_with_the_ehr_classifier_and_leaves_the_cxr_loss():
    model = build("los").eval()
    batch = make_batch("los", has_cxr=MIXED)
    with torch.no_grad():
        out = model(batch)
        other_y = dict(batch, y=batch["y"].clone())
        other_y["y"][1] = (other_y["y"][1] + 3) % 7  # a stay without an X-ray gets another label
        changed = model(other_y)
    e, c = out.extra_logits["ehr"], out.extra_logits["cxr"]
    torch.testing.assert_close(out.logits[1], e[1])
    torch.testing.assert_close(out.logits[0], 0.6 * e[0] + 0.4 * c[0])
    assert torch.equal(changed.aux_losses["boost_cxr"], out.aux_losses["boost_cxr"])
    assert not torch.equal(changed.aux_losses["boost_ehr"], out.aux_losses["boost_ehr"])
    expected_cxr = tF.cross_entropy(c[[0, 2]], batch["y"][[0, 2]])
    torch.testing.assert_close(out.aux_losses["boost_cxr"], expected_cxr)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_framework_trains_only_the_boosting_losses():
    model = build("mortality")
    module = CareBenchModule(model, "mortality")
    batch = make_batch("mortality", has_cxr=MIXED)
    torch.manual_seed(3)
    loss = module.training_step(batch, 0)
    torch.manual_seed(3)
    out = model(batch)
    torch.testing.assert_close(loss, out.aux_losses["boost_ehr"] + out.aux_losses["boost_cxr"])


@pytest.fixture(scope="module")
def aug_fold(tmp_path_factory):
    root = make_fake_dataset(tmp_path_factory.mktemp("aug"), n=120, image_size=16, n_features=F, seed=5)
    return build_fold(open_dataset(root), task="mortality", fold=1, image_size=16)


def test_a_layer_added_mid_training_is_optimised_and_reloads(aug_fold, tmp_path):
    """lam = 100 makes every ratio 'EHR weaker': after epoch 0 the EHR classifier gets a layer (check_interval 5
    means no second layer after epoch 1). Epoch 1 must train it through the running optimiser, and the checkpoint
    of each epoch must hold the layers that epoch was validated with."""
    pl.seed_everything(0, verbose=False)
    model = create_model("aug", "mortality", F, 16, preset="test", lam=100.0, check_interval=5)
    created = []
    new_layer = model.new_layer

    def spy(modality):
        layer = new_layer(modality)
        created.append((modality, layer.weight.detach().clone(), layer.bias.detach().clone()))
        return layer

    model.new_layer = spy
    module = CareBenchModule(model, "mortality", lr=1e-2)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_weights_only=True)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        callbacks=[every_epoch],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    train = make_loader(aug_fold.train, 16, shuffle=True, drop_last=True, seed=0)
    trainer.fit(module, train, make_loader(aug_fold.val, 32, shuffle=False))
    assert model.assignments == [(0, "ehr")] and model.pending is None
    layers_saved = [
        sum(
            ".extra.ehr." in k
            for k in torch.load(tmp_path / f"epoch={e}.ckpt", weights_only=False)["state_dict"]
        )
        for e in (0, 1)
    ]
    assert layers_saved == [0, 2]  # weight and bias of one layer from epoch 1 on
    assert len(model.extra["ehr"]) == 1 and len(model.extra["cxr"]) == 0
    layer = model.extra["ehr"][0]
    opt = trainer.optimizers[0]
    grouped = [p for group in opt.param_groups for p in group["params"]]
    assert any(p is layer.weight for p in grouped) and any(p is layer.bias for p in grouped)
    assert opt.param_groups[-1]["lr"] == opt.param_groups[0]["lr"]
    steps = len(train)
    assert int(opt.state[layer.weight]["step"]) == steps  # updated at every step of epoch 1
    assert opt.state[layer.weight]["exp_avg"].abs().sum() > 0
    modality, w0, b0 = created[0]
    assert modality == "ehr"
    assert not torch.allclose(layer.weight.detach(), w0) and not torch.allclose(layer.bias.detach(), b0)
    # a fresh model rebuilds the layer from the weights (best checkpoint, `carebench evaluate`)
    fresh = create_model("aug", "mortality", F, 16, preset="test", lam=100.0, check_interval=5)
    fresh.load_state_dict(model.state_dict())
    assert len(fresh.extra["ehr"]) == 1
    batch = aug_fold.test.__getitems__(list(range(8)))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch).logits, model(batch).logits)
    # and a checkpoint from before the layer was added loads into the grown model
    before = create_model("aug", "mortality", F, 16, preset="test").state_dict()
    fresh.load_state_dict(before)
    assert len(fresh.extra["ehr"]) == 0
