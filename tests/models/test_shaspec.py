"""ShaSpec: domain loss on the specific features, paired-only L1 alignment, the EHR shared feature in a missing
X-ray's slot, residual composition, concatenation, one shared encoder, weight standardisation, the
full-then-random X-ray dropout schedule, LOS. Each test names the replacement under which it fails."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F_nn
from model_batches import B, F, S, make_batch

from carebench.models import create_model
from carebench.models.base import per_sample_task_loss
from carebench.models.fusion.shaspec import WSLinear, alignment_loss


def build(task: str = "phenotype", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("shaspec", task, F, S, preset="test", **overrides).eval()


def grads_of(module: torch.nn.Module) -> list[bool]:
    """Per parameter: did it receive a non-zero gradient?"""
    return [p.grad is not None and bool(p.grad.any()) for p in module.parameters()]


def test_domain_loss_is_on_the_specific_features_and_never_reaches_the_shared_encoder():
    """Fails if the domain classifier is applied to the shared features (the reference toolkit): the gradient of
    the domain loss alone reaches both specific encoders and the classifier but not the shared encoder, and its
    value is beta * CE over the 4 EHR specific features (label 0) and the 3 X-ray ones of stays with an image
    (label 1)."""
    model = build()
    batch = make_batch("phenotype")  # stay 3 has no X-ray
    out = model(batch)
    out.aux_losses["domain"].backward()
    assert not any(grads_of(model.shared_encoder))
    assert all(grads_of(model.ehr_specific)) and all(grads_of(model.cxr_specific))
    assert all(grads_of(model.domain_classifier))
    with torch.no_grad():
        f = model.features(batch)
        feats = torch.cat([f["specific_ehr"], f["specific_cxr"][:3]])
        labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
        expected = 0.02 * F_nn.cross_entropy(model.domain_classifier(feats), labels)
    torch.testing.assert_close(out.aux_losses["domain"], expected)


def test_alignment_loss_reaches_the_shared_encoder_and_not_the_specific_ones():
    """Fails if the alignment is computed on the specific or fused features."""
    model = build()
    model(make_batch("phenotype")).aux_losses["align"].backward()
    assert all(grads_of(model.shared_encoder))
    assert not any(grads_of(model.ehr_specific)) and not any(grads_of(model.cxr_specific))


def test_alignment_is_alpha_times_mean_l1_over_paired_stays_only():
    """Fails if stays without an X-ray enter the mean (plain mean instead of ``masked_mean``): known value
    (|0-1| + |0-2|) / 2 = 1.5, the unpaired stay's difference of 100 contributes nothing; and in the model the
    loss is 0.1 * that mean over the three stays with an X-ray."""
    shared_ehr = torch.zeros(3, 2)
    shared_cxr = torch.tensor([[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]])
    got = alignment_loss(shared_ehr, shared_cxr, torch.tensor([True, True, False]))
    assert float(got) == 1.5
    assert float(alignment_loss(shared_ehr, shared_cxr, torch.tensor([False, False, False]))) == 0.0
    model = build()
    batch = make_batch("phenotype")
    with torch.no_grad():
        out = model(batch)
        f = model.features(batch)
        per_stay = (f["shared_ehr"] - f["shared_cxr"]).abs().mean(dim=1)
        assert per_stay[3] > 0  # the stay without an X-ray does have a (meaningless) difference
    torch.testing.assert_close(out.aux_losses["align"], 0.1 * per_stay[:3].mean())


def test_a_missing_xray_slot_is_the_ehr_shared_feature_exactly():
    """Fails if the replacement is removed (the composed feature of a blank image kept) or replaced by zeros."""
    model = build()
    batch = make_batch("phenotype", has_cxr=(True, False, True, False))
    with torch.no_grad():
        f = model.features(batch)
    for i in (1, 3):
        assert torch.equal(f["fused_cxr"][i], f["shared_ehr"][i])
    for i in (0, 2):
        assert not torch.allclose(f["fused_cxr"][i], f["shared_ehr"][i])
        torch.testing.assert_close(f["fused_cxr"][i], model.compose(f["shared_cxr"], f["specific_cxr"])[i])


def test_composition_is_a_residual_on_the_shared_feature():
    """Fails if the residual is dropped (``f = Proj([s; p])``): with the projection zeroed every fused feature
    equals its shared feature exactly; with a non-zero projection it equals ``s + Proj([s; p])``."""
    model = build()
    batch = make_batch("phenotype")
    with torch.no_grad():
        f = model.features(batch)
        r = model.compose.proj(torch.cat([f["shared_ehr"], f["specific_ehr"]], dim=-1))
        assert r.abs().max() > 1e-3
        torch.testing.assert_close(f["fused_ehr"], f["shared_ehr"] + r)
        model.compose.proj.weight.zero_()
        f = model.features(batch)
    assert torch.equal(f["fused_ehr"], f["shared_ehr"])
    assert torch.equal(f["fused_cxr"], f["shared_cxr"].where(f["paired"][:, None], f["shared_ehr"]))


def test_fused_features_are_concatenated_not_averaged():
    """Fails with a mean of the two fused features: the head reads 2d inputs, the logits are the head of
    ``[fused_ehr; fused_cxr]``, and swapping the two slots changes them (a mean is symmetric)."""
    model = build()
    linear = model.head[-1]
    assert linear.in_features == 2 * model.d
    batch = make_batch("phenotype")
    with torch.no_grad():
        f = model.features(batch)
        logits = model(batch).logits
        torch.testing.assert_close(logits, model.head(torch.cat([f["fused_ehr"], f["fused_cxr"]], dim=-1)))
        swapped = model.head(torch.cat([f["fused_cxr"], f["fused_ehr"]], dim=-1))
    assert not torch.allclose(logits[:3], swapped[:3])


def test_one_shared_encoder_serves_both_modalities_and_specific_encoders_differ():
    """Fails if the X-ray gets its own "shared" encoder: with both adapters forced to output the same vector the
    two shared features are identical while the two specific features are not."""
    model = build()
    with torch.no_grad():
        for adapter in (model.ehr_adapter, model.cxr_adapter):
            adapter.weight.zero_()
            adapter.bias.copy_(torch.linspace(-1.0, 1.0, model.d))
        f = model.features(make_batch("phenotype"))
    assert torch.equal(f["shared_ehr"], f["shared_cxr"])
    assert not torch.allclose(f["specific_ehr"], f["specific_cxr"])


def test_weight_standardisation_of_the_encoder_layers():
    """Fails if ``WSLinear`` uses its raw weight: each output unit's standardised weights have mean 0 and
    (unbiased) std 1, and the output is unchanged when the raw weight is shifted and scaled per unit."""
    torch.manual_seed(0)
    layer = WSLinear(6, 4, bias=False)
    w = layer.standardised_weight()
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.std(dim=1), torch.ones(4))
    x = torch.randn(5, 6)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([[3.0], [0.5], [2.0], [7.0]])).add_(
            torch.tensor([[1.0], [-2.0], [0.0], [4.0]])
        )
    torch.testing.assert_close(layer(x), before)
    model = build()
    assert all(isinstance(m, WSLinear) for m in model.shared_encoder if isinstance(m, torch.nn.Linear))
    assert sum(isinstance(m, WSLinear) for m in model.modules()) == 3 * model.hparams["enc_layers"]
    assert not any(isinstance(m, WSLinear) for m in build(weight_std=False).modules())


def trainer_at(epoch: int, max_epochs: int = 10) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, trainer=SimpleNamespace(max_epochs=max_epochs))


def test_full_modalities_first_then_random_xray_dropout_in_training_only():
    """Fails if the dropout is removed or applied from the first epoch or in eval: with max_epochs 10 and
    fraction 0.44 the first 4 epochs keep every X-ray; from epoch 4 on, in training, ``cxr_drop_rate`` 1 hides
    every X-ray (the output is that of the same batch with no X-rays); in eval nothing is hidden; a rate of 0.25
    hides about a quarter of 4000 X-rays."""
    model = build(cxr_drop_rate=1.0).train()
    batch = make_batch("phenotype", has_cxr=(True, True, True, True))
    none = dict(batch, has_cxr=torch.zeros(B, dtype=torch.bool))
    model.on_train_epoch_start(trainer_at(3))
    assert not model.dropout_active
    assert model.used_cxr(batch).all()
    model.on_train_epoch_start(trainer_at(4))
    assert model.dropout_active
    assert not model.used_cxr(batch).any()
    with torch.no_grad():
        torch.manual_seed(1)  # same dropout draws in the EHR encoder for both calls
        hidden = model(batch).logits
        torch.manual_seed(1)
        torch.testing.assert_close(hidden, model(none).logits)
        model.eval()
        assert model.used_cxr(batch).all()
        assert not torch.allclose(model(batch).logits, model(none).logits)
    model.on_train_epoch_start(SimpleNamespace(current_epoch=9))  # no trainer known: no dropout
    assert not model.dropout_active
    quarter = build().train()
    quarter.on_train_epoch_start(trainer_at(9))
    torch.manual_seed(0)
    kept = quarter.used_cxr({"has_cxr": torch.ones(4000, dtype=torch.bool)})
    assert abs(1.0 - kept.float().mean().item() - 0.25) < 0.03
    # a stay that has no X-ray never gains one
    assert not quarter.used_cxr({"has_cxr": torch.zeros(50, dtype=torch.bool)}).any()


@pytest.mark.parametrize("has_cxr", [(True, True, True, False), (False, False, False, False)])
def test_los_trains_with_seven_classes(has_cxr):
    """The reference toolkit's ShaSpec crashed on LOS. Fails if the head width is not the task's: 7-class
    logits, a finite cross-entropy on int64 labels, and a step of the total loss lowers it."""
    model = build("los").train()
    batch = make_batch("los", has_cxr=has_cxr)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = model(batch)
        assert out.logits.shape == (B, 7)
        loss = per_sample_task_loss(model.task, out.logits, batch["y"]).mean() + sum(out.aux_losses.values())
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
