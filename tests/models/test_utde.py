"""UTDE: mTAND time attention over the observed cells, the UTDE gate, the X-ray time attention, the head."""

from __future__ import annotations

import pytest
import torch
from model_batches import F, S, make_batch

from carebench.models import ModelConfigError, create_model
from carebench.models.fusion.utde import masked_time_interpolation


def build(task: str = "mortality", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("utde", task, F, S, preset="test", **overrides).eval()


def only_irregular(model) -> None:
    """Saturate the UTDE gate at 1: the EHR sequence is then exactly the time-attention embedding."""
    with torch.no_grad():
        model.gate.net[-1].weight.zero_()
        model.gate.net[-1].bias.fill_(50.0)


def test_masked_interpolation_equals_a_per_feature_softmax_over_observed_times():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 5, 7, generator=g)  # heads, queries, keys
    values = torch.randn(3, 7, 4, generator=g)
    mask = (torch.rand(3, 7, 4, generator=g) > 0.5).float()
    mask[1, :, 2] = 0.0  # a feature never observed
    mask[2, :, 0] = 0.0
    mask[2, 3, 0] = 1.0  # a feature observed once
    got = masked_time_interpolation(scores, values, mask)
    # brute force: [B, H, Q, K, D] masked softmax over keys, as mTAND computes it
    s = scores[None, :, :, :, None].expand(3, 2, 5, 7, 4)
    m = mask[:, None, None]
    w = torch.softmax(s.masked_fill(m == 0, float("-inf")), dim=3).nan_to_num(0.0)
    expected = (w * values[:, None, None]).sum(3)
    torch.testing.assert_close(got, expected)
    assert (got[1, :, :, 2] == 0).all()
    torch.testing.assert_close(got[2, :, :, 0], values[2, 3, 0].expand(2, 5))


def test_time_attention_weights_depend_on_the_query_time():
    model = build()
    with torch.no_grad():
        w = torch.softmax(
            model.ehr_attention_scores(48, torch.device("cpu")), dim=-1
        )  # [H, 48 queries, 48 keys]
    assert w.shape == (2, 48, 48)
    for head in range(2):  # at initialisation already, every query time weighs the hours differently
        rows = w[head]
        assert (rows - rows[0]).abs().amax(dim=1)[1:].min() > 0
        assert (rows.amax(dim=1) - rows.amin(dim=1)).min() > 0
    # With a Time2Vec of rising frequencies and identity query/key maps the attention is local in time: the hour
    # with the largest weight moves forward with the query time (a time attention, not a copy or an average).
    with torch.no_grad():
        model.time_embedding.linear.weight.fill_(1.0)
        model.time_embedding.linear.bias.zero_()
        model.time_embedding.periodic.weight.copy_(torch.linspace(1, 12, 7)[:, None])
        model.time_embedding.periodic.bias.zero_()
        for proj in (model.ehr_time_attention.query, model.ehr_time_attention.key):
            proj.weight.copy_(torch.eye(8) * 4)
            proj.bias.zero_()
        w = torch.softmax(model.ehr_attention_scores(48, torch.device("cpu")), dim=-1)
    for head in range(2):
        peak = w[head].argmax(dim=1)
        assert (peak[1:] >= peak[:-1]).all()
        assert peak[-1] == 47 and peak[-1] - peak[1] >= 20
        assert w[head, -1].max() > 5 * w[head, -1].mean()


def test_same_values_at_other_hours_change_the_time_embedding_and_the_prediction():
    """The observed values are identical; only when they were observed differs."""
    model = build()
    only_irregular(model)
    batch = make_batch("mortality")
    batch["ehr_mask"] = torch.zeros_like(batch["ehr_mask"])
    batch["ehr"] = torch.zeros_like(batch["ehr"])
    for i in range(4):  # feature 0 observed twice with different values
        batch["ehr"][i, 3, 0], batch["ehr"][i, 30, 0] = -2.0 + i, 3.0
        batch["ehr_mask"][i, 3, 0] = batch["ehr_mask"][i, 30, 0] = 1.0
    moved = {k: v.clone() for k, v in batch.items()}
    moved["ehr"][0, 3, 0], moved["ehr"][0, 12, 0] = 0.0, -2.0  # stay 0: the first value now at hour 12
    moved["ehr_mask"][0, 3, 0], moved["ehr_mask"][0, 12, 0] = 0.0, 1.0
    with torch.no_grad():
        seq_a, gate = model.ehr_sequence(batch)
        seq_b, _ = model.ehr_sequence(moved)
        a, b = model(batch).logits, model(moved).logits
    assert torch.equal(gate, torch.ones_like(gate))
    torch.testing.assert_close(seq_a, model.ehr_irregular(batch))  # regular path switched off
    assert not torch.allclose(seq_a[0], seq_b[0])
    assert torch.equal(seq_a[1:], seq_b[1:])
    assert not torch.allclose(a[0], b[0])
    assert torch.equal(a[1:], b[1:])
    # the interpolated channel of feature 0 varies along the reference grid (two values, two times)
    x, m = batch["ehr"], batch["ehr_mask"]
    interp = masked_time_interpolation(
        model.ehr_attention_scores(48, x.device), torch.cat([x * m, m], -1), torch.cat([m, m], -1)
    )
    assert interp[0, 0, :, 0].max() - interp[0, 0, :, 0].min() > 1e-3


def test_the_xray_time_changes_the_prediction_and_weights_vary_with_query_time():
    model = build("phenotype")
    batch = make_batch("phenotype", has_cxr=(True, True, False, False))
    later = dict(batch, cxr_hours=batch["cxr_hours"].clone())
    later["cxr_hours"][0] = 45.0
    later["cxr_hours"][2] = 33.0  # a missing image's time is ignored
    with torch.no_grad():
        a, b = model(batch).logits, model(later).logits
        w = model.cxr_attention_weights(batch["cxr_hours"], batch["has_cxr"])  # [B, H, Q]
        w_later = model.cxr_attention_weights(later["cxr_hours"], later["has_cxr"])
    assert not torch.allclose(a[0], b[0])
    assert torch.equal(a[1:], b[1:])
    assert ((w[:2] > 0) & (w[:2] < 1)).all()
    assert (w[:2].amax(-1) - w[:2].amin(-1)).min() > 1e-4  # the image weight varies along the reference grid
    assert not torch.allclose(w[0], w_later[0])
    assert (w[2:] == 0).all() and (w_later[2:] == 0).all()


def test_a_missing_xray_gives_the_learned_null_sequence():
    model = build("los")
    batch = make_batch("los", has_cxr=(True, False, True, False))
    with torch.no_grad():
        model.null_value.copy_(torch.linspace(-1, 1, model.null_value.numel()))
        seq, _ = model.cxr_sequence(batch, batch["has_cxr"])
        heads = model.hparams["time_heads"]
        expected = model.cxr_out(model.null_value.repeat(heads))
    torch.testing.assert_close(seq[1], expected.expand(48, -1))
    torch.testing.assert_close(seq[3], expected.expand(48, -1))
    assert not torch.allclose(seq[0], expected.expand(48, -1))


@pytest.mark.parametrize(
    ("level", "shape"), [("batch", (4, 1, 1)), ("batch_seq", (4, 48, 1)), ("batch_seq_feature", (4, 48, 8))]
)
def test_gate_levels_mix_the_two_embeddings(level, shape):
    model = build(mixup_level=level)
    batch = make_batch("mortality")
    with torch.no_grad():
        seq, gate = model.ehr_sequence(batch)
        irregular = model.ehr_irregular(batch)
        grid = torch.cat([batch["ehr"], batch["ehr_mask"]], -1).transpose(1, 2)
        regular = model.ehr_regular(grid).transpose(1, 2)
    assert gate.shape == shape and ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(seq, gate * irregular + (1 - gate) * regular)


def test_configuration_errors():
    with pytest.raises(ModelConfigError, match="tt_max"):
        build(tt_max=24)(make_batch("mortality"))
    with pytest.raises(ModelConfigError, match="'mixup_level' must be one of"):
        build(mixup_level="sample")
    with pytest.raises(ModelConfigError, match="divisible"):
        build(embed_time=9)
    with pytest.raises(ModelConfigError, match="kernel_size"):
        build(kernel_size=2)
