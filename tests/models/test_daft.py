"""DAFT: the affine parameters come from [pooled CNN map, EHR feature] and transform the CNN map inside the last
residual block, at each of the paper's locations; imageless stays get the missing embedding."""

from __future__ import annotations

import pytest
import torch
import torchvision
from model_batches import F, S, make_batch

from carebench.models import ModelConfigError, create_model
from carebench.models.encoders import ehr_input
from carebench.models.fusion.daft import DAFTBlock, DAFTransform

MIXED = (True, False, True, False)


def build(task: str = "phenotype", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("daft", task, F, S, preset="test", **overrides).eval()


def capture(module: torch.nn.Module, store: dict, key: str, *, pre: bool = False):
    if pre:
        return module.register_forward_pre_hook(
            lambda _m, args: store.__setitem__(key, args[0].detach().clone())
        )

    def hook(_m, args, out):
        store[key] = ([a.detach().clone() for a in args], out.detach().clone())

    return module.register_forward_hook(hook)


def test_the_transformed_map_is_alpha_f_plus_beta_with_parameters_from_image_and_ehr():
    model = build()
    batch = make_batch("phenotype", has_cxr=MIXED)
    seen: dict = {}
    handle = capture(model.daft.transform, seen, "t")
    with torch.no_grad():
        model(batch)
        (fmap, aux), out = seen["t"]
        present = batch["has_cxr"]
        # the conditioning vector is the EHR encoder's feature of the stays with an image
        torch.testing.assert_close(aux, model.ehr_encoder(ehr_input(batch))[present])
        w1, w2 = model.daft.transform.aux[0].weight, model.daft.transform.aux[2].weight
        hidden = torch.relu(torch.cat([fmap.mean(dim=(2, 3)), aux], dim=1) @ w1.T)
        alpha, beta = (hidden @ w2.T).chunk(2, dim=1)
        torch.testing.assert_close(out, alpha[:, :, None, None] * fmap + beta[:, :, None, None])
        assert not torch.allclose(out, fmap)

        other = dict(batch, ehr=batch["ehr"].clone())
        other["ehr"][0] = torch.randn_like(other["ehr"][0])
        model(other)
        (fmap2, aux2), _ = seen["t"]
        a_new, b_new = model.daft.transform.affine(fmap2, aux2)
    handle.remove()
    assert torch.equal(fmap2, fmap)  # the map entering the DAFT does not depend on the EHR...
    assert not torch.allclose(a_new[0], alpha[0]) and not torch.allclose(
        b_new[0], beta[0]
    )  # ...alpha, beta do
    torch.testing.assert_close(a_new[1], alpha[1])
    torch.testing.assert_close(b_new[1], beta[1])


def test_removing_the_daft_changes_the_prediction_of_stays_with_an_image(monkeypatch):
    model = build("los")
    batch = make_batch("los", has_cxr=MIXED)
    with torch.no_grad():
        with_daft = model(batch).logits
        monkeypatch.setattr(DAFTransform, "forward", lambda self, fmap, aux: fmap)
        without = model(batch).logits
    present = batch["has_cxr"]
    assert not torch.allclose(with_daft[present], without[present])
    assert torch.equal(with_daft[~present], without[~present])


def test_a_stay_without_an_image_gets_the_missing_embedding():
    model = build()
    batch = make_batch("phenotype", has_cxr=MIXED)
    with torch.no_grad():
        model.missing_cxr.copy_(torch.linspace(-1, 1, model.missing_cxr.numel()))
        logits = model(batch).logits
        ehr = model.ehr_encoder(ehr_input(batch))
        torch.testing.assert_close(logits[1], model.head(torch.cat([model.missing_cxr, ehr[1]])))
        cnn = model.encode_cxr(batch["cxr"][:1], ehr[:1])
        torch.testing.assert_close(logits[0], model.head(torch.cat([cnn[0], ehr[0]])))


@pytest.mark.parametrize("location", [0, 1, 2, 3, 4])
def test_each_location_transforms_the_map_it_names(location):
    model = build(daft_location=location)
    block = model.daft.block  # resnet_tiny's last block: BasicBlock 32 -> 64 with a downsample
    seen: dict = {}
    handles = [
        capture(model.daft.transform, seen, "t"),
        capture(block.conv1, seen, "conv1", pre=True),
        capture(block.downsample, seen, "skip", pre=True),
        capture(block.bn1, seen, "bn1"),
        capture(block.conv2, seen, "conv2", pre=True),
    ]
    with torch.no_grad():
        model(make_batch("phenotype"))
    for h in handles:
        h.remove()
    (fmap, _), out = seen["t"]
    expect_channels = 32 if location in (0, 1, 2) else 64
    assert fmap.size(1) == expect_channels == model.daft.transform.aux[2].out_features // 2
    main, skip = torch.equal(seen["conv1"], out), torch.equal(seen["skip"], out)
    assert (main, skip) == {
        0: (True, True),
        1: (False, True),
        2: (True, False),
        3: (False, False),
        4: (False, False),
    }[location]
    if location == 3:  # after the first batch norm, which lost its own affine parameters
        assert torch.equal(fmap, seen["bn1"][1]) and not block.bn1.affine
    if location == 4:
        assert torch.equal(seen["conv2"], out) and torch.equal(fmap, torch.relu(seen["bn1"][1]))
    if location != 3:
        assert block.bn1.affine


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_daft_block_with_an_identity_transform_is_the_torchvision_block(arch, monkeypatch):
    """The block's re-implemented forward equals torchvision's for BasicBlock and Bottleneck."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None).eval()
    for original in (net.layer4[0], net.layer4[-1]):  # with and without a downsample
        x = torch.randn(2, original.conv1.in_channels, 3, 3)
        with torch.no_grad():
            expected = original(x.clone())
            block = DAFTBlock(
                original, aux_dim=4, location=2, bottleneck_factor=7.0, activation="linear"
            ).eval()
            monkeypatch.setattr(block.transform, "forward", lambda fmap, aux: fmap)
            torch.testing.assert_close(block(x, torch.zeros(2, 4)), expected)


def test_bottleneck_width_activation_and_config_errors():
    model = build(daft_activation="tanh")
    t = model.daft.transform
    assert t.aux[0].out_features == int((32 + 8) / 7.0) and t.aux[0].bias is None and t.aux[2].bias is None
    alpha, _ = t.affine(torch.randn(3, 32, 2, 2), torch.randn(3, 8) * 50)
    assert alpha.abs().max() <= 1.0
    assert len(model.cxr_encoder.net.layer4) == 0  # resnet_tiny's only layer4 block is now the DAFT block
    with pytest.raises(ModelConfigError, match="'daft_location' must be one of \\[0, 1, 2, 3, 4\\], got 5"):
        build(daft_location=5)
    with pytest.raises(ModelConfigError, match="'daft_activation' must be one of"):
        build(daft_activation="relu")
    with pytest.raises(ModelConfigError, match="'bottleneck_factor' must be > 0"):
        build(bottleneck_factor=0.0)
