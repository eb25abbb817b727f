"""One mechanism test per method: what makes the method what it is, checked against hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tF
from model_batches import F, S, make_batch

from carebench.models import ModelConfigError, create_model
from carebench.models.encoders import ehr_input
from carebench.models.fusion.drfuse import attention_ranking_loss, logit_average, sigmoid_jsd

MIXED = (True, False, True, False)


def build(name: str, task: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model(name, task, F, S, preset="test", **overrides)


def test_resnet_baseline_gives_imageless_stays_the_learned_no_image_logits():
    model = build("resnet", "los").eval()
    with torch.no_grad():
        model.no_image_logits.copy_(torch.arange(7.0))
        logits = model(make_batch("los", has_cxr=MIXED)).logits
    assert torch.equal(logits[1], torch.arange(7.0)) and torch.equal(logits[3], torch.arange(7.0))
    assert not torch.equal(logits[0], torch.arange(7.0))


def test_latefusion_puts_the_missing_embedding_in_place_of_the_xray_feature():
    model = build("latefusion", "phenotype").eval()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        model.missing_cxr.copy_(torch.linspace(-1, 1, model.missing_cxr.numel()))
        logits = model(batch).logits
        ehr = model.ehr_encoder(ehr_input(batch))
        expected = model.head(torch.cat([ehr[1], model.missing_cxr]))
    torch.testing.assert_close(logits[1], expected)


def test_medfuse_reads_one_token_without_an_xray_and_two_with_one():
    model = build("medfuse", "phenotype").eval()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        seq, lengths = model.modality_sequence(batch)
        assert lengths.tolist() == [2, 1, 2, 1]
        assert not seq[1, 1].any()  # nothing of the missing image enters the sequence
        logits = model(batch).logits
        for i, n in enumerate(lengths.tolist()):
            _, (h, _) = model.fusion(seq[i : i + 1, :n])
            torch.testing.assert_close(logits[i], model.classifier(h[-1])[0], rtol=1e-5, atol=1e-6)
        # a length-2 sequence with an empty CXR token would be a different model (zero imputation)
        _, (h, _) = model.fusion(seq[1:2, :2])
        assert not torch.allclose(logits[1], model.classifier(h[-1])[0])


def test_logit_average_is_the_logit_of_the_mean_probability():
    a = torch.tensor([-30.0, -2.0, 0.0, 1.5, 40.0])
    b = torch.tensor([25.0, 3.0, 0.0, -0.5, 40.0])
    s = logit_average(a, b)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(torch.sigmoid(s), (torch.sigmoid(a) + torch.sigmoid(b)) / 2)


def test_sigmoid_jsd_known_value_and_paired_mask():
    h_a = torch.zeros(3, 2)  # p = 0.5
    h_b = torch.full((3, 2), 50.0)  # q = 1
    m = 0.75
    per_feature = 0.5 * (0.5 * math.log(0.5 / m) + 1.0 * math.log(1.0 / m))
    paired = torch.tensor([True, True, False])
    assert sigmoid_jsd(h_a, h_b, paired).item() == pytest.approx(2 * per_feature, rel=1e-5)
    h_b2 = h_b.clone()
    h_b2[2] = -50.0  # an unpaired stay changes nothing
    assert torch.equal(sigmoid_jsd(h_a, h_b, paired), sigmoid_jsd(h_a, h_b2, paired))
    assert sigmoid_jsd(h_a, h_a, paired).item() == 0.0
    assert sigmoid_jsd(h_a, h_b, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_attention_ranking_loss_follows_the_ranking_of_the_head_losses():
    attn = torch.tensor([[[0.2, 0.3, 0.5]]])  # one stay, one class: (ehr, shared, cxr)
    paired = torch.tensor([True])

    def loss(ehr, shared, cxr):
        t = torch.tensor([[ehr]]), torch.tensor([[shared]]), torch.tensor([[cxr]])
        return attention_ranking_loss(attn, *t, paired).item()

    # attention already agrees with the losses (cxr best, then shared, then ehr): no penalty
    assert loss(ehr=1.0, shared=0.5, cxr=0.1) == 0.0
    # reversed ranking (ehr best): every pair is violated by its attention gap, each term normalised by 1
    assert loss(ehr=0.1, shared=0.5, cxr=1.0) == pytest.approx(((0.5 - 0.2) + (0.3 - 0.2) + (0.5 - 0.3)) / 3)
    # only shared-vs-cxr violated
    assert loss(ehr=1.0, shared=0.05, cxr=0.1) == pytest.approx((0.5 - 0.3) / 3)
    # stays without an X-ray are not ranked
    assert (
        attention_ranking_loss(
            attn, torch.tensor([[0.1]]), torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([False])
        ).item()
        == 0.0
    )


def test_drfuse_attention_shared_fusion_and_auxiliary_heads():
    model = build("drfuse", "phenotype").eval()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        out = model.encode(batch)
        present = batch["has_cxr"]
        attn = out["attn"]
        assert attn.shape == (4, 25, 3)
        torch.testing.assert_close(attn.sum(-1), torch.ones(4, 25))
        assert (attn[~present, :, 2] == 0).all() and (attn[present, :, 2] > 0).all()
        assert torch.equal(out["shared"][~present], out["ehr_shared"][~present])
        torch.testing.assert_close(
            torch.sigmoid(out["shared"][present]),
            (torch.sigmoid(out["ehr_shared"]) + torch.sigmoid(out["cxr_shared"]))[present] / 2,
        )
        result = model(batch)
    assert set(result.extra_logits) == {"ehr", "cxr", "shared"}
    assert set(result.aux_losses) == {
        "pred_shared",
        "pred_ehr",
        "pred_cxr",
        "disentangle_shared_jsd",
        "disentangle_ehr_orth",
        "disentangle_cxr_orth",
        "attn_ranking",
    }
    expected_cxr = tF.binary_cross_entropy_with_logits(out["cxr"][present], batch["y"][present])
    torch.testing.assert_close(result.aux_losses["pred_cxr"], expected_cxr)


def test_drfuse_prediction_is_read_from_the_disease_wise_attention():
    """Class c's logit is W_c . sum_t attn[c, t] v_t + b_c over (ehr_distinct, shared, cxr_distinct).

    Fails if the attention is bypassed: logits read from the shared representation only (``final_fc(shared)``),
    uniform attention, or a value vector that ignores the distinct tokens.
    """
    model = build("drfuse", "phenotype").eval()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        out = model.encode(batch)
        logits = model(batch).logits
        tokens = torch.stack([out["ehr_distinct"], out["shared"], out["cxr_distinct"]], dim=1)
        v = model.attn_proj(tokens).chunk(2 + 25, dim=-1)[1]  # [B,3,d]
        w, b = model.final_fc.weight, model.final_fc.bias  # [C,d], [C]
        expected = torch.einsum("bct,btd,cd->bc", out["attn"], v, w) + b
        torch.testing.assert_close(logits, expected)
        assert not torch.allclose(logits, model.final_fc(out["shared"]), atol=1e-4)
        # a stay's class-c logit moves with its EHR-distinct token through that class's attention weight
        layer = model.ehr_encoder.distinct.layers[0]
        layer.linear2.bias.add_(
            torch.randn(layer.linear2.bias.shape, generator=torch.Generator().manual_seed(0))
        )
        moved = model(batch).logits
    assert (moved - logits).abs().min() > 0
    # different classes attend differently (the attention is per disease, not one shared weighting)
    assert out["attn"][:, :, 0].std(dim=1).min() > 0


def test_drfuse_lambdas_scale_their_losses_and_imageless_batches_zero_the_paired_terms():
    batch = make_batch("los", has_cxr=MIXED)
    with torch.no_grad():
        base = build("drfuse", "los", seed=1).eval()(batch).aux_losses
        scaled = (
            build(
                "drfuse",
                "los",
                seed=1,
                lambda_pred_cxr=2.0,
                lambda_attn_aux=0.0,
                lambda_disentangle_shared=0.5,
            )
            .eval()(batch)
            .aux_losses
        )
        none = build("drfuse", "los", seed=1).eval()(make_batch("los", has_cxr=(False,) * 4)).aux_losses
    torch.testing.assert_close(scaled["pred_cxr"], 2 * base["pred_cxr"])
    torch.testing.assert_close(scaled["disentangle_shared_jsd"], 0.5 * base["disentangle_shared_jsd"])
    assert scaled["attn_ranking"].item() == 0.0 and base["attn_ranking"].item() > 0.0
    torch.testing.assert_close(scaled["pred_ehr"], base["pred_ehr"])
    for key in ("pred_cxr", "disentangle_shared_jsd", "disentangle_cxr_orth", "attn_ranking"):
        assert none[key].item() == 0.0, key
    assert none["pred_ehr"].item() > 0.0


def test_drfuse_missing_augmentation_hides_images_in_training_only():
    model = build("drfuse", "mortality", aug_missing_ratio=0.999)
    batch = make_batch("mortality", has_cxr=(True,) * 4)
    torch.manual_seed(0)
    assert not model.train().encode(batch)["present"].any()
    assert model.eval().encode(batch)["present"].all()
    with pytest.raises(ModelConfigError, match="aug_missing_ratio"):
        build("drfuse", "mortality", aug_missing_ratio=1.0)


def test_transformer_baseline_accepts_sinusoidal_positions_and_rejects_others():
    model = build("transformer", "mortality", positional="sinusoidal")
    assert not any("pos" in n for n, _ in model.named_parameters())
    assert model(make_batch("mortality")).logits.shape == (4, 1)
    with pytest.raises(ModelConfigError, match="'positional' must be one of"):
        build("transformer", "mortality", positional="rotary")
