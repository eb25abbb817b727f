"""Encoders: padding handled exactly, known position encodings, grayscale ResNet weights and stage access."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from carebench.models.base import masked_mean
from carebench.models.encoders import (
    EHRLSTMEncoder,
    EHRTransformerEncoder,
    PretrainedWeightsError,
    ResNetEncoder,
    SinusoidalPositions,
    encode_present,
    padding_mask,
    pool_steps,
)


def test_pooling_ignores_padded_steps():
    h = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    pad = padding_mask(torch.tensor([2, 3]), 3)
    assert pad.tolist() == [[False, False, True], [False, False, False]]
    assert pool_steps(h, pad).flatten().tolist() == [2.0, 4.0]
    torch.testing.assert_close(pool_steps(h, None).flatten(), torch.tensor([104.0 / 3, 4.0]))


def test_masked_mean_counts_only_kept_entries():
    losses = torch.tensor([1.0, 2.0, 30.0, 4.0])
    keep = torch.tensor([True, True, False, True])
    assert masked_mean(losses, keep).item() == pytest.approx(7.0 / 3)
    assert masked_mean(losses, torch.zeros(4, dtype=torch.bool)).item() == 0.0  # nothing kept: 0, not NaN
    assert masked_mean(losses, None).item() == pytest.approx(37.0 / 4)
    seq = torch.arange(12.0).reshape(2, 3, 2)  # [B, T, D] pooled over the kept steps of each stay
    kept = torch.tensor([[True, False, True], [False, False, False]])
    assert masked_mean(seq, kept, dim=1).tolist() == [[2.0, 3.0], [0.0, 0.0]]


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_transformer_padding_is_neither_attended_nor_pooled(positional):
    torch.manual_seed(0)
    enc = EHRTransformerEncoder(
        6, d_model=8, n_heads=2, n_layers=2, dropout=0.0, ff_dim=16, positional=positional
    ).eval()
    x = torch.randn(2, 10, 6)
    lengths = torch.tensor([7, 10])
    garbage = x.clone()
    garbage[0, 7:] = 1e3
    with torch.no_grad():
        padded = enc(x, lengths)
        assert torch.equal(padded, enc(garbage, lengths))
        # the padded stay gives what its unpadded 7 steps give alone
        torch.testing.assert_close(padded[0], enc(x[:1, :7])[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(padded[1], enc(x[1:])[0], rtol=1e-5, atol=1e-6)


def test_lstm_lengths_pack_the_sequence_and_bidirectional_concatenates():
    torch.manual_seed(0)
    enc = EHRLSTMEncoder(6, hidden=5, num_layers=2, bidirectional=True).eval()
    assert enc.out_dim == 10
    x = torch.randn(2, 9, 6)
    garbage = x.clone()
    garbage[0, 4:] = -50.0
    lengths = torch.tensor([4, 9])
    with torch.no_grad():
        out = enc(x, lengths)
        assert out.shape == (2, 10)
        assert torch.equal(out, enc(garbage, lengths))
        torch.testing.assert_close(out[0], enc(x[:1, :4])[0], rtol=1e-5, atol=1e-6)
    # MedFuse's initialisation: orthogonal recurrent weights, zero biases
    w_hh = enc.lstm.weight_hh_l0  # [4H, H]: orthonormal columns
    torch.testing.assert_close(w_hh.T @ w_hh, torch.eye(5), rtol=0, atol=1e-5)
    assert not enc.lstm.bias_ih_l0.any()


def test_sinusoidal_positions_have_the_textbook_values():
    pe = SinusoidalPositions(d_model=4, max_len=10).pe[0]
    assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    torch.testing.assert_close(
        pe[3], torch.tensor([math.sin(3), math.cos(3), math.sin(3 / 100), math.cos(3 / 100)])
    )


def _rgb_resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial batch-norm statistics so a wrong load would show
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_local_state_dict_loads_with_rgb_filters_summed(tmp_path):
    rgb = _rgb_resnet18(seed=3)
    path = tmp_path / "resnet18_rgb.pt"
    torch.save(rgb.state_dict(), path)
    torch.manual_seed(0)
    random_init = ResNetEncoder("resnet18", "none").eval()
    loaded = ResNetEncoder("resnet18", str(path)).eval()
    torch.testing.assert_close(loaded.net.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    x = torch.randn(2, 1, 64, 64)
    rgb.fc = nn.Identity()
    with torch.no_grad():
        # a grayscale image through the summed filter == the same image repeated on R, G and B
        torch.testing.assert_close(loaded(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(loaded(x), random_init(x))


def test_imagenet_uses_torchvision_weights_api(tmp_path, monkeypatch):
    rgb = _rgb_resnet18(seed=4)
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return rgb.state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    enc = ResNetEncoder("resnet18", "imagenet")
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    torch.testing.assert_close(enc.net.layer3[0].conv1.weight, rgb.layer3[0].conv1.weight)

    def offline(url, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(
        PretrainedWeightsError, match=r"pretrained='imagenet'.*resnet50-11ad3fa6.*network unreachable"
    ):
        ResNetEncoder("resnet50", "imagenet")


def test_bad_pretrained_values_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        ResNetEncoder("resnet18", str(tmp_path / "missing.pt"))
    wrong = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(PretrainedWeightsError, match=r"resnet34\.pt: does not fit a grayscale resnet18"):
        ResNetEncoder("resnet18", str(wrong))
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights for 'resnet_tiny'"):
        ResNetEncoder("resnet_tiny", "imagenet")


@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet_small", "resnet18"])
def test_stages_reproduce_forward_and_report_their_channels(arch):
    torch.manual_seed(0)
    enc = ResNetEncoder(arch).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        h = x
        for (name, stage), channels in zip(enc.stages(), enc.stage_channels, strict=True):
            h = stage(h)
            assert h.shape[1] == channels, name
        assert [n for n, _ in enc.stages()] == ["stem", "layer1", "layer2", "layer3", "layer4"]
        torch.testing.assert_close(enc.pool(h), enc(x))
        torch.testing.assert_close(enc.body()(enc.stem()(x)), enc(x))
        # the feature map of HEALNet's / UMSE's tokens: the stages' output before pooling, or after layer3
        torch.testing.assert_close(enc.feature_map(x), h)
        torch.testing.assert_close(
            enc.feature_map(x, 4), enc.net.layer3(enc.net.layer2(enc.net.layer1(enc.stem()(x))))
        )
    assert len(list(enc.parameters())) == len(list(enc.net.parameters()))  # views add no parameters


def test_encode_present_runs_only_present_images():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x.flatten(1)[:, :3] + 1.0

    images = torch.randn(4, 1, 2, 2)
    out = encode_present(Spy(), images, torch.tensor([True, False, True, False]), 3)
    assert seen == [2]
    assert torch.equal(out[[1, 3]], torch.zeros(2, 3))
    assert torch.equal(out[0], images[0].flatten()[:3] + 1.0)
    assert torch.equal(encode_present(Spy(), images, torch.zeros(4, dtype=torch.bool), 3), torch.zeros(4, 3))
    assert seen == [2]


def test_a_single_small_image_trains_with_running_batchnorm_statistics():
    torch.manual_seed(0)
    enc = ResNetEncoder("resnet_tiny").train()
    x = torch.randn(1, 1, 16, 16)
    out = enc(x)  # plain batch norm would raise: one value per channel at layer4
    assert enc.training and all(m.training for m in enc.modules())
    with torch.no_grad():
        torch.testing.assert_close(out, enc.eval()(x))
    enc.train()
    two = torch.randn(2, 1, 16, 16)
    before = enc.net.bn1.running_mean.clone()
    enc(two)  # a real batch still uses (and updates) batch statistics
    assert not torch.equal(before, enc.net.bn1.running_mean)


def test_resnet_small_is_the_tiny_layout_at_twice_the_width():
    enc = ResNetEncoder("resnet_small")
    assert enc.out_dim == 128 and enc.stage_channels == [16, 16, 32, 64, 128]
    assert [len(getattr(enc.net, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    # by hand: stem 784 + 32, layer1 4,672, layer2 14,528, layer3 57,728, layer4 230,144
    assert sum(p.numel() for p in enc.parameters()) == 307_888
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights for 'resnet_small'"):
        ResNetEncoder("resnet_small", "imagenet")
