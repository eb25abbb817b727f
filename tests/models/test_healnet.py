"""HEALNet: per-stay masked X-ray update, weight tying after the first layer, Fourier features, temperature-0.5
attention, pre-norm residual steps with the gated-SELU feed-forward, the L1 term, X-ray tokens as feature-map cells.
Each test names the replacement (identity / zero / removal) under which it fails."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from model_batches import F, S, T, make_batch

from carebench.models import create_model
from carebench.models.fusion.healnet import (
    Attention,
    FusionLayer,
    GatedSELUFeedForward,
    PreNorm,
    fourier_encode,
    masked_step,
)


def build(task: str = "phenotype", seed: int = 0, image_size: int = S, **overrides):
    torch.manual_seed(seed)
    return create_model("healnet", task, F, image_size, preset="test", **overrides).eval()


def module_params(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


# ------------------------------------------------------------------------------ missing X-ray, per stay
def test_the_xray_step_leaves_the_latents_of_a_stay_without_xray_exactly_unchanged():
    """Fails if the X-ray update is applied to every stay (zero tokens for the missing image, or the whole batch
    skipped only when no stay has one): after the X-ray cross-attention + feed-forward of each layer, the stay
    without an X-ray has exactly its latents from before; the stays with one have changed latents."""
    model = build()
    batch = make_batch("phenotype")  # stay 3 has no X-ray
    has = batch["has_cxr"]
    with torch.no_grad():
        ehr, cxr = model.ehr_tokens(batch), model.cxr_tokens(batch, has)
        x = model.latents.expand(4, -1, -1)
        for layer in model.layers:
            x = masked_step(layer, 0, x, ehr, None)
            after = masked_step(layer, 1, x, cxr, has)
            assert torch.equal(after[3], x[3])
            assert all((after[i] - x[i]).abs().max() > 1e-4 for i in range(3))
            x = after


def test_a_stay_without_xray_gets_exactly_the_ehr_only_latents_from_the_model():
    """Fails if ``fuse`` updates the latents of a stay without an X-ray by the X-ray step: its final latents equal
    the latents computed by hand with the EHR steps only (each layer's EHR cross-attention + FF), while a stay with
    an X-ray differs from its EHR-only latents."""
    model = build()
    batch = make_batch("phenotype")
    with torch.no_grad():
        fused = model.fuse(batch)
        x = model.latents.expand(4, -1, -1)
        ehr = model.ehr_tokens(batch)
        for layer in model.layers:
            x = layer.step(0, x, ehr)
    torch.testing.assert_close(fused[3], x[3], rtol=0, atol=1e-6)
    assert (fused[0] - x[0]).abs().max() > 1e-4


def test_batchnorm_statistics_in_training_see_present_images_only():
    """Fails if every image (missing ones included) goes through the CNN: after one training forward, the
    running statistics of the CNN are the same whatever pixels the missing image holds."""
    batch = make_batch("phenotype")
    noisy = dict(batch, cxr=batch["cxr"].clone())
    noisy["cxr"][3] = torch.randn_like(noisy["cxr"][3]) * 50 + 3
    stats = []
    for b in (batch, noisy):
        model = build().train()
        with torch.no_grad():
            model(b)
        stats.append(
            torch.cat([model.cxr_encoder.net.bn1.running_mean, model.cxr_encoder.net.bn1.running_var])
        )
    assert torch.equal(stats[0], stats[1])


# ------------------------------------------------------------------------------------ weight tying
def test_layers_after_the_first_share_weights_and_the_first_is_untied():
    """Fails if tying is removed (fresh modules for every layer) or applied to layer 1 too: layers 2..depth are one
    module object; layer 1 shares no parameter with them; in the tied layers both modalities use one feed-forward
    (the authors' module cache), in layer 1 each has its own; the parameter count does not grow with depth."""
    model = build(depth=4)
    first, rest = model.layers[0], list(model.layers[1:])
    assert all(layer is rest[0] for layer in rest)
    assert first is not rest[0]
    assert not module_params(first) & module_params(rest[0])
    assert rest[0].cross_ffs[0] is rest[0].cross_ffs[1]
    assert first.cross_ffs[0] is not first.cross_ffs[1]
    assert rest[0].cross_attns[0] is not rest[0].cross_attns[1]
    n_params = {d: sum(p.numel() for p in build(depth=d).parameters()) for d in (2, 3, 5)}
    assert n_params[2] == n_params[3] == n_params[5]
    per_layer = sum(p.numel() for p in first.parameters())
    tied_layer = sum(p.numel() for p in rest[0].parameters())
    ff = sum(p.numel() for p in first.cross_ffs[0].parameters())
    assert tied_layer == per_layer - ff  # one feed-forward fewer: shared by the modalities
    untied = {d: sum(p.numel() for p in build(depth=d, weight_tie_layers=False).parameters()) for d in (2, 3)}
    assert untied[3] - untied[2] == per_layer
    assert n_params[2] == untied[2] - ff


# ---------------------------------------------------------------------------------- Fourier features
def test_fourier_features_have_known_values():
    """Fails if the encoding is replaced by zeros or the bands/pi/raw x are changed: for x = 0.5 and bands
    f = linspace(1, 6/2, 3) = (1, 2, 3): sin(pi x f) = (1, 0, -1), cos = (0, -1, 0), then x."""
    enc = fourier_encode(torch.tensor([[0.5]]), max_freq=6.0, num_bands=3)
    torch.testing.assert_close(enc, torch.tensor([[1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 0.5]]), atol=1e-6, rtol=0)
    two_axes = fourier_encode(torch.tensor([[0.5, -1.0]]), max_freq=2.0, num_bands=2)  # f = (1, 1)
    expected = [1.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, -1.0, -1.0, -1.0]
    torch.testing.assert_close(two_axes, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_ehr_tokens_are_the_hours_with_1d_fourier_time_features():
    """Fails if the time features are dropped or not on linspace(-1, 1, T): token t is concat(ehr_t, mask_t,
    sin(pi x_t f), cos(pi x_t f), x_t) with x_t = -1 + 2t / (T - 1)."""
    model = build(max_freq=6.0, num_freq_bands=3)
    batch = make_batch("phenotype")
    tokens = model.ehr_tokens(batch)
    assert tokens.shape == (4, T, 2 * F + 7)
    assert torch.equal(tokens[..., :F], batch["ehr"]) and torch.equal(
        tokens[..., F : 2 * F], batch["ehr_mask"]
    )
    x = torch.linspace(-1, 1, T)
    f = torch.tensor([1.0, 2.0, 3.0])
    expected = torch.cat(
        [torch.sin(math.pi * x[:, None] * f), torch.cos(math.pi * x[:, None] * f), x[:, None]], 1
    )
    torch.testing.assert_close(tokens[1, :, 2 * F :], expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- X-ray tokens
def test_xray_tokens_are_the_cells_of_the_cnn_feature_map_with_2d_positions():
    """Fails if pixels (or the pooled vector) become the tokens: with 128 px images the tiny ResNet's layer4 map is
    4 x 4, so there are 16 tokens of 64 channels + 2 * (2 * 2 + 1) Fourier channels, per present image only; the
    first 64 channels are exactly the map's cells (row-major) and the last channel of each axis its position."""
    model = build(image_size=128, cxr_token_stage="layer4")
    g = torch.Generator().manual_seed(1)
    batch = dict(make_batch("phenotype"), cxr=torch.randn(4, 1, 128, 128, generator=g))
    batch["cxr"][3] = 0
    has = batch["has_cxr"]
    with torch.no_grad():
        tokens = model.cxr_tokens(batch, has)
        fmap = model.cxr_encoder.feature_map(batch["cxr"][has], model.n_stages)
    assert fmap.shape == (3, 64, 4, 4)
    assert tokens.shape == (3, 16, 64 + 10)
    torch.testing.assert_close(tokens[..., :64], fmap.permute(0, 2, 3, 1).reshape(3, 16, 64))
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 4), indexing="ij")
    torch.testing.assert_close(tokens[0, :, 64 + 4], rows.reshape(-1))
    torch.testing.assert_close(tokens[0, :, 64 + 9], cols.reshape(-1))
    layer3 = build(image_size=128, cxr_token_stage="layer3")
    with torch.no_grad():
        assert layer3.cxr_tokens(batch, has).shape == (3, 64, 32 + 10)  # 8 x 8 cells of 32 channels


# ---------------------------------------------------------------------------------------- attention
def test_attention_softmax_has_temperature_one_half():
    """Fails if the temperature is 1 (or dropped): one head of width 1 (scale 1), q = 1 and keys (0, 1, 2) give
    weights softmax(2 * (0, 1, 2)); with values (1, 2, 3), to_out = identity and LeakyReLU(0.01) on a negative
    output, the result is known."""
    attn = Attention(query_dim=1, context_dim=1, heads=1, dim_head=1, dropout=0.0)
    with torch.no_grad():
        attn.to_q.weight.fill_(1.0)
        attn.to_kv.weight.copy_(torch.tensor([[1.0], [-1.0]]))  # k = c, v = -c
        attn.to_out[0].weight.fill_(1.0)
        attn.to_out[0].bias.zero_()
        x, context = torch.ones(1, 1, 1), torch.tensor([[[0.0], [1.0], [2.0]]])
        out, weights = attn(x, context), attn.weights(x, context)
    w = torch.softmax(torch.tensor([0.0, 2.0, 4.0]), dim=0)
    torch.testing.assert_close(weights.reshape(-1), w)
    assert not torch.allclose(w, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), dim=0), atol=1e-2)
    expected = 0.01 * -(w * torch.tensor([0.0, 1.0, 2.0])).sum()  # v = -(0, 1, 2): negative -> slope 0.01
    torch.testing.assert_close(out.reshape(()), expected)


def test_a_modality_step_is_prenorm_cross_attention_and_gated_selu_ff_with_residuals():
    """Fails if a residual, a pre-norm, the context norm or the SELU gate is removed: one step recomputed by hand
    from the weights: x1 = x + to_out(softmax(2 q k^T / sqrt(dh)) v) with q from LN(x), k, v from LN(context);
    x2 = x1 + W_out(a * SELU(g)), (a, g) = halves of W_in LN(x1), W_in: d -> 8d, W_out: 4d -> d."""
    torch.manual_seed(0)
    d, c, dh = 6, 5, 3
    cross = PreNorm(d, Attention(d, c, heads=1, dim_head=dh, dropout=0.0), c)
    ff = PreNorm(d, GatedSELUFeedForward(d, 0.0))
    for m in (cross, ff):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.5)  # non-trivial LayerNorm affine parameters too
    layer = FusionLayer([cross], [ff], [])
    x, ctx = torch.randn(2, 4, d), torch.randn(2, 7, c)
    got = layer.step(0, x, ctx)
    a = cross.fn
    q = a.to_q(cross.norm(x))
    k, v = a.to_kv(cross.norm_context(ctx)).chunk(2, dim=-1)
    x1 = x + a.to_out(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh) / 0.5, dim=-1) @ v)
    net = ff.fn
    assert net.proj_in.weight.shape == (8 * d, d) and net.proj_out.weight.shape == (d, 4 * d)
    h_a, h_g = net.proj_in(ff.norm(x1)).chunk(2, dim=-1)
    x2 = x1 + net.proj_out(h_a * F_.selu(h_g))
    torch.testing.assert_close(got, x2)


def test_head_is_mean_over_latents_then_layernorm_then_linear():
    """Fails if the head pools differently (first latent, sum) or drops the LayerNorm."""
    model = build()
    with torch.no_grad():
        for p in model.head.parameters():
            torch.nn.init.normal_(p)
        batch = make_batch("phenotype")
        latents = model.fuse(batch)
        expected = model.head[1](F_.layer_norm(latents.mean(1), (latents.size(-1),)) * model.head[0].weight)
        expected = expected + model.head[1].weight @ model.head[0].bias
        torch.testing.assert_close(model(batch).logits, expected)


# ----------------------------------------------------------------------------------------------- L1
def test_l1_term_is_l1_times_the_abs_sum_of_the_fusion_parameters_counted_once():
    """Fails if the term is zero, covers the CNN, or counts the tied layers' shared weights once per layer:
    aux_losses["l1"] = l1 * sum |theta| over the unique parameters outside the X-ray CNN; editing a CNN weight
    leaves it unchanged; its gradient on the latents is l1 * sign(latents)."""
    model = build(depth=4, l1=1e-3)
    batch = make_batch("phenotype")
    seen: set[int] = set()
    total = torch.zeros(())
    for name, p in model.named_parameters():  # named_parameters lists a shared tensor once
        assert id(p) not in seen
        seen.add(id(p))
        if not name.startswith("cxr_encoder."):
            total = total + p.detach().abs().sum()
    out = model(batch)
    torch.testing.assert_close(out.aux_losses["l1"], 1e-3 * total)
    per_layer_listing = sum(p.abs().sum() for layer in model.layers for p in layer.parameters())
    unique = sum(p.abs().sum() for p in {id(p): p for p in model.layers.parameters()}.values())
    assert per_layer_listing > unique * 1.5  # the tied layers would be counted three times
    with torch.no_grad():
        model.cxr_encoder.net.conv1.weight.add_(1.0)
    torch.testing.assert_close(model(batch).aux_losses["l1"], out.aux_losses["l1"])
    model.zero_grad()
    model(batch).aux_losses["l1"].backward()
    torch.testing.assert_close(model.latents.grad, 1e-3 * model.latents.detach().sign())
    assert model.cxr_encoder.net.conv1.weight.grad is None
