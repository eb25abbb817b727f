"""MMTM: gates computed as in the paper, gated maps fed to the next CNN stage and the next EHR layer, per-stay
missing X-ray handling, and the MMTM/EHR-layer schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF
from model_batches import F, S, make_batch

from carebench.models import ModelConfigError, create_model
from carebench.models.encoders import ehr_input
from carebench.models.fusion.mmtm import MMTMUnit, mmtm_schedule

MIXED = (True, False, True, False)


def build(task: str = "phenotype", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("mmtm", task, F, S, preset="test", **overrides).eval()


class Recorder:
    """Forward hook outputs and forward pre-hook inputs of named modules."""

    def __init__(self) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.inp: dict[str, torch.Tensor] = {}
        self.handles = []

    def output(self, name: str, module: torch.nn.Module) -> None:
        def hook(_m, _args, out):
            self.out[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        self.handles.append(module.register_forward_hook(hook))

    def input(self, name: str, module: torch.nn.Module) -> None:
        def hook(_m, args):
            self.inp[name] = args[0].detach().clone()

        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_schedule_pairs_the_last_cnn_stages_with_the_top_ehr_layers():
    assert mmtm_schedule(3, 3) == [(2, 0), (3, 1), (4, 2)]  # layer2/3/4 with LSTM layers 1/2/3
    assert mmtm_schedule(1, 3) == [(4, 2)]  # one MMTM after the last layers of both streams
    assert mmtm_schedule(5, 2) == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1)]  # lower MMTMs share EHR layer 1
    model = build()
    assert len(model.mmtm) == 3 and len(model.ehr_layers) == 3
    # joint dimension (C_A + C_B) / ratio, C_A = channels of layer2..4 of resnet_tiny, C_B = 8
    assert [u.squeeze.out_features for u in model.mmtm] == [(16 + 8) // 4, (32 + 8) // 4, (64 + 8) // 4]


def test_gated_map_of_stage_k_is_the_input_of_stage_k_plus_1():
    model = build()
    batch = make_batch("phenotype", has_cxr=MIXED)
    net = model.cxr_encoder.net
    rec = Recorder()
    rec.output("layer2", net.layer2)
    rec.input("layer3", net.layer3)
    rec.output("ehr1", model.ehr_layers[0])
    rec.input("ehr2", model.ehr_layers[1])
    with torch.no_grad():
        out = model.encode(batch)
    rec.remove()
    g_cnn, g_ehr = out["cnn_gates"][0], out["ehr_gates"][0]
    assert g_cnn.shape == (2, 16) and g_ehr.shape == (4, 8)  # CNN gates for the 2 stays with an image
    # the next CNN stage receives the gated map, not the raw stage output
    torch.testing.assert_close(rec.inp["layer3"], rec.out["layer2"] * g_cnn[:, :, None, None])
    assert not torch.allclose(rec.inp["layer3"], rec.out["layer2"])
    # the next LSTM layer receives the gated hidden states (gated per channel, over all hours)
    torch.testing.assert_close(rec.inp["ehr2"], rec.out["ehr1"] * g_ehr[:, None, :])
    assert not torch.allclose(rec.inp["ehr2"][0], rec.out["ehr1"][0])


def test_gates_are_the_papers_two_sigmoid_of_the_joint_squeeze():
    model = build()
    batch = make_batch("phenotype", has_cxr=MIXED)
    rec = Recorder()
    rec.output("layer2", model.cxr_encoder.net.layer2)
    rec.output("ehr1", model.ehr_layers[0])
    with torch.no_grad():
        out = model.encode(batch)
        rec.remove()
        unit = model.mmtm[0]
        present = batch["has_cxr"]
        squeeze = torch.cat([rec.out["layer2"].mean(dim=(2, 3)), rec.out["ehr1"][present].mean(dim=1)], dim=1)
        z = torch.relu(squeeze @ unit.squeeze.weight.T + unit.squeeze.bias)
        expected_cnn = 2 * torch.sigmoid(z @ unit.excite_cnn.weight.T + unit.excite_cnn.bias)
        expected_ehr = 2 * torch.sigmoid(z @ unit.excite_ehr.weight.T + unit.excite_ehr.bias)
    torch.testing.assert_close(out["cnn_gates"][0], expected_cnn)
    torch.testing.assert_close(out["ehr_gates"][0][present], expected_ehr)
    # 2*sigmoid: with zero excitation weights the gates are exactly 1 (the identity), not 0.5
    with torch.no_grad():
        for layer in (unit.excite_cnn, unit.excite_ehr):
            layer.weight.zero_()
            layer.bias.zero_()
        out = model.encode(batch)
    assert torch.equal(out["cnn_gates"][0], torch.ones_like(out["cnn_gates"][0]))


def test_cnn_gates_depend_on_the_ehr_and_ehr_gates_on_the_image():
    model = build()
    batch = make_batch("phenotype", has_cxr=MIXED)
    other_ehr = dict(batch, ehr=batch["ehr"].clone())
    other_ehr["ehr"][0] = torch.randn_like(other_ehr["ehr"][0])
    other_img = dict(batch, cxr=batch["cxr"].clone())
    other_img["cxr"][0] = torch.randn_like(other_img["cxr"][0])
    with torch.no_grad():
        base, by_ehr, by_img = model.encode(batch), model.encode(other_ehr), model.encode(other_img)
    for k in range(3):
        # stay 0 is the first of the stays with an image: its X-ray gates move with its EHR, stay 2's do not
        assert not torch.allclose(base["cnn_gates"][k][0], by_ehr["cnn_gates"][k][0])
        torch.testing.assert_close(base["cnn_gates"][k][1], by_ehr["cnn_gates"][k][1])
        assert not torch.allclose(base["ehr_gates"][k][0], by_img["ehr_gates"][k][0])
        torch.testing.assert_close(base["ehr_gates"][k][1:], by_img["ehr_gates"][k][1:])


def test_removing_the_exchange_changes_the_prediction(monkeypatch):
    model = build()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        with_mmtm = model(batch).logits

    def identity_gates(self, fmap, seq, pad):
        return fmap.new_ones(fmap.shape[:2]), seq.new_ones(seq.size(0), seq.size(2))

    monkeypatch.setattr(MMTMUnit, "forward", identity_gates)
    rec = Recorder()
    rec.output("layer2", model.cxr_encoder.net.layer2)
    rec.input("layer3", model.cxr_encoder.net.layer3)
    with torch.no_grad():
        without = model(batch).logits
    rec.remove()
    assert torch.equal(rec.inp["layer3"], rec.out["layer2"])  # ungated: the plain ResNet
    present = batch["has_cxr"]
    assert not torch.allclose(with_mmtm[present], without[present])
    assert torch.equal(with_mmtm[~present], without[~present])  # imageless stays never had an exchange


def test_a_stay_without_an_image_is_the_plain_lstm_stack_and_the_ehr_head():
    model = build("los")
    batch = make_batch("los", has_cxr=MIXED)
    with torch.no_grad():
        out = model.encode(batch)
        for gate in out["ehr_gates"]:
            assert torch.equal(gate[1], torch.ones(8)) and torch.equal(gate[3], torch.ones(8))
        seq = ehr_input(batch)[1:2]
        for lstm in model.ehr_layers:
            seq = lstm(seq)[0]
        torch.testing.assert_close(out["ehr_feat"][1], seq[0, -1])
        torch.testing.assert_close(out["logits"][1], model.ehr_head(seq[0, -1]))
        # with an image the prediction is the average of the two streams' logits
        torch.testing.assert_close(out["logits"][0], (out["ehr"][0] + out["cxr"][0]) / 2)
        assert not out["cnn_feat"][1].any()


def test_padded_hours_are_neither_squeezed_nor_read():
    model = build("mortality")
    batch = make_batch("mortality", has_cxr=(True, True, False, True))
    lengths = torch.tensor([30, 48, 20, 48])
    garbage = dict(batch, ehr=batch["ehr"].clone())
    garbage["ehr"][0, 30:] = 1e3
    garbage["ehr"][2, 20:] = -1e3
    with torch.no_grad():
        a = model(dict(batch, ehr_lengths=lengths)).logits
        b = model(dict(garbage, ehr_lengths=lengths)).logits
        alone = model({k: v[:1, :30] if k in ("ehr", "ehr_mask") else v[:1] for k, v in batch.items()}).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], alone[0], rtol=1e-5, atol=1e-6)


def test_out_of_range_hyperparameters_are_clear_errors():
    with pytest.raises(ModelConfigError, match="'mmtm_stages' must be in \\[1, 5\\], got 6"):
        build(mmtm_stages=6)
    with pytest.raises(ModelConfigError, match="'ehr_layers' must be >= 1"):
        build(ehr_layers=0)
    with pytest.raises(ModelConfigError, match="'mmtm_ratio' must be > 0"):
        build(mmtm_ratio=0.0)
    model = build(mmtm_stages=5, ehr_layers=1)  # an MMTM after every stage, all on the one LSTM layer
    assert len(model.mmtm) == 5 and model(make_batch("phenotype")).logits.shape == (4, 25)


def test_each_stream_is_trained_on_its_own_head_as_well_as_the_joint_one():
    """stream_ehr = lambda * task loss of the EHR head (all stays); stream_cxr = lambda * that of the CNN head on
    stays with an X-ray (the authors' per-stream classifiers). Fails if only the averaged logits are trained."""
    batch = make_batch("phenotype", has_cxr=(True, False, True, False))
    model = build("phenotype", lambda_stream=0.5).eval()
    with torch.no_grad():
        out = model(batch)
        enc = model.encode(batch)
    keep = batch["has_cxr"]
    ehr = tF.binary_cross_entropy_with_logits(enc["ehr"], batch["y"])
    cxr = tF.binary_cross_entropy_with_logits(enc["cxr"][keep], batch["y"][keep])
    assert set(out.aux_losses) == {"stream_ehr", "stream_cxr"}
    torch.testing.assert_close(out.aux_losses["stream_ehr"], 0.5 * ehr)
    torch.testing.assert_close(out.aux_losses["stream_cxr"], 0.5 * cxr)
    # an X-ray-less batch gives the CNN head no loss, and the weight 0 switches the stream losses off
    none = build("phenotype").eval()(make_batch("phenotype", has_cxr=(False,) * 4)).aux_losses
    assert none["stream_cxr"].item() == 0.0 and none["stream_ehr"].item() > 0
    off = build("phenotype", lambda_stream=0.0).eval()(batch).aux_losses
    assert all(v.item() == 0.0 for v in off.values())
    with pytest.raises(ModelConfigError, match="lambda_stream"):
        build("phenotype", lambda_stream=-1.0)
