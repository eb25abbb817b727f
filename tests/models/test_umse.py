"""UMSE: observed triplets only, bottleneck averaged over the available modalities, no trace of a missing X-ray,
cross-modal exchange through the bottleneck, demographics at the head. Each test names the replacement under which
it fails (checked by breaking the mechanism)."""

from __future__ import annotations

import pytest
import torch
from model_batches import F, S, make_batch

from carebench.models import ModelConfigError, create_model, get_model_class
from carebench.models.fusion import umse
from carebench.models.fusion.umse import fuse_bottleneck, triplets


def build(task: str = "phenotype", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("umse", task, F, S, preset="test", **overrides).eval()


def layer0_stream_bottlenecks(model, batch):
    """The bottleneck outputs of layer 0's EHR stream ``[B, K, d]`` and X-ray stream (present stays), recomputed
    from the model's parts independently of ``encode``."""
    k = model.hparams["bottlenecks"]
    tok, valid = model.ehr_tokens(batch)
    ehr_x = model.stream_input(0, tok)
    b = ehr_x.size(0)
    bn = model.bottleneck.expand(b, k, model.d)
    keep = torch.cat([valid.new_ones(b, k + 1), valid], dim=1)
    ehr_bn = model.layers[0][0](torch.cat([bn, ehr_x], dim=1), keep)[:, :k]
    rows = batch["has_cxr"].nonzero(as_tuple=True)[0]
    cxr_x = model.stream_input(1, model.cxr_tokens(batch["cxr"][rows], batch["cxr_hours"][rows]))
    cxr_bn = model.layers[0][1](torch.cat([bn[rows], cxr_x], dim=1), None)[:, :k]
    return ehr_bn, cxr_bn, rows


# ------------------------------------------------------------------------------------------------ triplets
def test_triplets_are_exactly_the_observed_cells_most_recent_first_capped():
    """Fails if imputed cells enter, if the order is not (hour, feature), or if the cap keeps the oldest events."""
    values = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # [B=2, T=3, F=2]
    mask = torch.tensor([[[1, 0], [0, 1], [1, 1]], [[0, 0], [0, 1], [0, 0]]], dtype=torch.float32)
    time, value, feature, valid = triplets(values, mask, max_events=10)
    assert valid.tolist() == [[True] * 4, [True, False, False, False]]
    assert time[0].tolist() == [0.0, 1.0, 2.0, 2.0] and feature[0].tolist() == [0, 1, 0, 1]
    assert value[0].tolist() == [0.0, 3.0, 4.0, 5.0]
    assert (time[1, 0], value[1, 0], feature[1, 0]) == (1.0, 9.0, 1)
    assert (value[1, 1:] == 0).all() and (time[1, 1:] == 0).all()  # padding holds no value
    # cap 2: the two most recent events of stay 0 (hour 2, features 0 and 1)
    time, value, feature, valid = triplets(values, mask, max_events=2)
    assert time[0].tolist() == [2.0, 2.0] and value[0].tolist() == [4.0, 5.0] and valid.shape == (2, 2)
    # the contract batch: count = observed cells capped at max_events
    batch = make_batch("phenotype")
    for cap in (5, 64, 10_000):
        *_, valid = triplets(batch["ehr"], batch["ehr_mask"], cap)
        expected = batch["ehr_mask"].flatten(1).sum(1).clamp_max(cap).long()
        assert valid.sum(1).tolist() == expected.tolist()
    assert int(batch["ehr_mask"].flatten(1).sum(1).min()) > 64  # the test preset's cap (64) is reached


def test_imputed_values_change_nothing_observed_values_change_the_output():
    """Fails if the EHR is read as the imputed grid (e.g. triplets given an all-ones mask)."""
    model = build(max_events=10_000)
    batch = make_batch("phenotype")
    imputed = batch["ehr_mask"] == 0
    other = dict(batch, ehr=torch.where(imputed, batch["ehr"] + 50.0, batch["ehr"]))
    with torch.no_grad():
        base = model(batch).logits
        assert torch.equal(model(other).logits, base)
        observed = batch["ehr"].clone()
        t, f = (batch["ehr_mask"][0] == 1).nonzero()[-1].tolist()
        observed[0, t, f] += 30.0
        changed = model(dict(batch, ehr=observed)).logits
    assert (changed[0] - base[0]).abs().max() > 1e-4
    assert torch.equal(changed[1:], base[1:])


# ------------------------------------------------------------------------------------------- bottleneck
def test_bottleneck_is_the_mean_over_the_available_modalities_only():
    """Stay 3 has no X-ray: the bottleneck entering layer 1 is exactly its EHR stream's; stays 0-2 get the mean of
    both streams. Fails with an EHR-only bottleneck or a plain mean over both modalities for every stay."""
    model = build()
    batch = make_batch("phenotype")  # has_cxr = (T, T, T, F)
    with torch.no_grad():
        _, entering = model.encode(batch)
        ehr_bn, cxr_bn, rows = layer0_stream_bottlenecks(model, batch)
    assert rows.tolist() == [0, 1, 2] and len(entering) == model.hparams["num_layers"]
    assert torch.equal(entering[1][3], ehr_bn[3])
    torch.testing.assert_close(entering[1][:3], (ehr_bn[:3] + cxr_bn) / 2, rtol=0, atol=1e-6)
    assert (ehr_bn[:3] - cxr_bn).abs().max() > 1e-3  # the two streams differ, so the mean is not trivial


def test_fuse_bottleneck_known_values():
    ehr = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])
    cxr = torch.tensor([[[3.0, 0.0]], [[-5.0, 2.0]]])
    fused = fuse_bottleneck(ehr, cxr, torch.tensor([0, 2]))
    assert fused.tolist() == [[[2.0, 1.0]], [[3.0, 4.0]], [[0.0, 4.0]]]
    assert fuse_bottleneck(ehr, None, torch.tensor([], dtype=torch.long)) is ehr


def test_xray_time_counts_only_when_the_xray_is_present():
    """Fails if the X-ray stream (with its time embedding) runs for stays without an image."""
    model = build()
    batch = make_batch("phenotype")  # stay 3 has no X-ray
    with torch.no_grad():
        base = model(batch).logits
        hours = batch["cxr_hours"].clone()
        hours[3] = 40.0
        assert torch.equal(model(dict(batch, cxr_hours=hours)).logits, base)
        hours[0] = -batch["cxr_hours"][0]  # before admission instead of after
        moved = model(dict(batch, cxr_hours=hours)).logits
    assert (moved[0] - base[0]).abs().max() > 1e-5
    assert torch.equal(moved[1:], base[1:])


def test_the_ehr_cls_reads_the_xray_through_the_bottleneck(monkeypatch):
    """With >= 2 layers the EHR CLS output changes when a present X-ray's pixels change; with the bottleneck no
    longer shared (the next bottleneck is the EHR stream's alone, the X-ray stream's is dropped) it cannot."""
    model = build()
    batch = make_batch("phenotype")
    other = dict(batch, cxr=batch["cxr"].clone())
    other["cxr"][0] = torch.randn_like(other["cxr"][0])
    with torch.no_grad():
        a, _ = model.encode(batch)
        b, _ = model.encode(other)
        assert (a[0] - b[0]).abs().max() > 1e-4
        assert torch.equal(a[1:], b[1:])
        monkeypatch.setattr(umse, "fuse_bottleneck", lambda ehr_bn, cxr_bn, rows: ehr_bn)
        a, _ = model.encode(batch)
        b, _ = model.encode(other)
    assert torch.equal(a, b)


def test_every_preset_has_at_least_two_layers_and_one_layer_is_refused():
    cls = get_model_class("umse")
    for name in ("quick", "full", "test"):
        assert cls.resolve_hparams({}, preset=name)["num_layers"] >= 2
    assert cls.search_space["num_layers"]["low"] >= 2
    with pytest.raises(ModelConfigError, match="num_layers must be >= 2"):
        build(num_layers=1)


# ------------------------------------------------------------------------------------------------- head
def test_demographics_reach_the_head_and_are_required():
    """Fails if the demographics embedding is replaced by zeros (or dropped from the head)."""
    model = build()
    batch = make_batch("phenotype")
    static = batch["static"].clone()
    static[0, 0] += 1.5  # one standard deviation and a half older
    with torch.no_grad():
        base = model(batch).logits
        older = model(dict(batch, static=static)).logits
        static[1, 1] = 1.0 - static[1, 1]
        flipped = model(dict(batch, static=static)).logits
    assert (older[0] - base[0]).abs().max() > 1e-4 and torch.equal(older[1:], base[1:])
    assert (flipped[1] - base[1]).abs().max() > 1e-4
    with pytest.raises(ModelConfigError, match="'static'"):
        model({k: v for k, v in batch.items() if k != "static"})


def test_a_training_batch_of_one_stay_uses_the_running_statistics():
    model = build("mortality").train()
    batch = {k: v[:1] for k, v in make_batch("mortality").items()}
    out = model(batch).logits
    assert out.shape == (1, 1) and torch.isfinite(out).all()


def test_event_cap_is_declared_per_preset():
    cls = get_model_class("umse")
    assert cls.resolve_hparams({}, preset="full")["max_events"] == 1000
    assert cls.resolve_hparams({}, preset="quick")["max_events"] <= 256
    assert umse.UMSE.default_hparams["d_model"] == 256 and umse.UMSE.default_hparams["num_heads"] == 4
