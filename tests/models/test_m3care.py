"""M3Care: multi-bandwidth Gaussian kernel, eps mixing of the two kernels, similarity threshold, gated mix, norm
stability loss, imputation from present neighbours only, and the eval bank of training stays. Each test names the
replacement (identity / zero / the official masking) under which it fails."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tf
from model_batches import F, S, make_batch

from carebench.models import create_model
from carebench.models.fusion.m3care import (
    gaussian_kernel,
    mean_bandwidth,
    squared_distances,
    threshold_similarity,
)

EHR, CXR = 0, 1


def build(task: str = "phenotype", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("m3care", task, F, S, preset="test", **overrides).eval()


def fill_bank(model, batch) -> None:
    """One training forward (no step): writes the batch's embeddings into the bank."""
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()


def sub(batch: dict, idx: list[int]) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def cat(*batches: dict) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_gaussian_kernel_has_known_values_on_a_tiny_input():
    """Fails with one bandwidth, another multiplier or another bandwidth rule. Points 0, 1, 3: squared distances
    1, 9, 4; bandwidth = mean over the 6 ordered pairs = 28/6; bandwidths 7/3, 14/3, 28/3."""
    x = torch.tensor([[0.0], [1.0], [3.0]])
    d2 = squared_distances(x, x)
    assert torch.equal(d2, torch.tensor([[0.0, 1.0, 9.0], [1.0, 0.0, 4.0], [9.0, 4.0, 0.0]]))
    bw = mean_bandwidth(d2)
    torch.testing.assert_close(bw, torch.tensor(28.0 / 6.0))
    k = gaussian_kernel(d2, bw)

    def expected(d: float) -> float:
        return sum(math.exp(-d / b) for b in (7 / 3, 14 / 3, 28 / 3)) / 3

    want = torch.tensor([[expected(float(v)) for v in row] for row in d2])
    torch.testing.assert_close(k, want)
    assert torch.equal(torch.diagonal(k), torch.ones(3))
    assert float(mean_bandwidth(torch.zeros(1, 1))) == 1.0  # a lone stay: only its self-loop, any bandwidth


def test_eps_mixes_the_learned_and_the_raw_kernel_with_sigmoid_of_minus_0_3():
    """Fails if either kernel is dropped or the weight is not sigmoid(eps): with phi's last layer zeroed, BN(phi(h))
    is constant, so the learned kernel is 1 everywhere and K = (1 - s) + s * k(BN(h)), s = sigmoid(-0.3)."""
    model = build()
    assert torch.equal(model.eps.detach(), torch.full((2,), -0.3))
    with torch.no_grad():
        for m in (EHR, CXR):
            torch.nn.init.zeros_(model.phi[m][-1].weight)
            torch.nn.init.zeros_(model.phi[m][-1].bias)
        h = torch.randn(5, model.d)
        inputs = model.kernel_inputs(EHR, h)
        _, k = model.modality_kernel(EHR, inputs, inputs)
    s = 1 / (1 + math.exp(0.3))
    raw = h / math.sqrt(1 + model.bn.eps)  # eval BN at init: running mean 0, var 1, weight 1, bias 0
    d2 = squared_distances(raw, raw)
    want = (1 - s) + s * gaussian_kernel(d2, mean_bandwidth(d2))
    torch.testing.assert_close(k, want)
    assert abs(s - 0.425557) < 1e-6


def test_similarities_below_sigmoid_theta_give_zero_edges():
    """Fails if the threshold is identity: theta = 0 -> t = 0.5; entries 0.3 and 0.49 vanish, 0.6 and 1 stay, and
    theta gets the gradient -sigmoid'(theta) per kept edge (5 kept: -5/4)."""
    s = torch.tensor([[1.0, 0.3, 0.6], [0.3, 1.0, 0.49], [0.6, 0.49, 1.0]])
    theta = torch.zeros(1, requires_grad=True)
    out = threshold_similarity(s, theta)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.0], [0.6, 0.0, 1.0]]))
    out.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-5 / 4]))
    # in the model: a threshold near 1 leaves only the self-loops of the batch graph
    model = build().train()
    with torch.no_grad():
        model.theta.fill_(8.0)
        _, st = model.forward_with_state(make_batch("phenotype"))
    sim = st["similarity"]
    assert torch.equal(sim, torch.diag(torch.diagonal(sim))) and bool((torch.diagonal(sim) == 1).all())


def test_present_stays_get_the_gated_mix_and_missing_stays_the_gcn_output():
    """Fails if the gate is replaced by identity (GCN only, or own embedding only): for present stays the final
    embedding is w * gcn + (1 - w) * h with w = s1 / (s1 + s2) strictly inside (0, 1); a stay without an X-ray gets
    exactly the GCN output."""
    model = build()
    batch = make_batch("phenotype")  # stay 3 has no X-ray
    fill_bank(model, make_batch("phenotype", seed=1))
    with torch.no_grad():
        hs, _ = model.embed(batch)
        _, st = model.forward_with_state(batch)
    for m in (EHR, CXR):
        g, final, w = st["gcn"][m], st["final"][m], st["w"][m]
        s1 = torch.sigmoid(model.gate_imputed[m](g))
        s2 = torch.sigmoid(model.gate_own[m](hs[m]))
        torch.testing.assert_close(w, s1 / (s1 + s2))
        assert bool(((w > 0) & (w < 1)).all())
        present = [0, 1, 2, 3] if m == EHR else [0, 1, 2]
        mix = w * g + (1 - w) * hs[m]
        torch.testing.assert_close(final[present], mix[present])
        assert not torch.allclose(final[present], g[present])
        assert not torch.allclose(final[present], hs[m][present])
    assert torch.equal(st["final"][CXR][3], st["gcn"][CXR][3])


def test_the_stability_loss_is_lambda_times_the_norm_gaps_over_present_stays():
    """Fails if the loss is zeroed, not weighted, or computed with the missing X-ray's zero embedding (phi(0) != 0):
    lambda * sum_m |‖phi_m(H_m)‖_F - ‖H_m‖_F| over the stays that have modality m."""
    batch = make_batch("phenotype")
    for weight in (1e-8, 0.5):
        model = build(stability_weight=weight)
        with torch.no_grad():
            out = model(batch)
            hs, av = model.embed(batch)
            gaps = [
                (torch.linalg.norm(model.phi[m](hs[m][av[m]])) - torch.linalg.norm(hs[m][av[m]])).abs()
                for m in (EHR, CXR)
            ]
            with_missing = (torch.linalg.norm(model.phi[CXR](hs[CXR])) - torch.linalg.norm(hs[CXR])).abs()
        torch.testing.assert_close(out.aux_losses["stability"], weight * (gaps[0] + gaps[1]))
        assert float(gaps[0] + gaps[1]) > 0
        assert not torch.isclose(with_missing, gaps[1])


def test_the_bank_is_a_fifo_of_detached_training_embeddings_saved_in_the_state_dict():
    """Fails if the bank is not filled in training, filled in eval, or not in the state dict."""
    model = build(bank_size=6, ehr_dropout=0.0)
    a, b = (
        make_batch("phenotype", seed=1),
        make_batch("phenotype", seed=2, has_cxr=(False, True, True, False)),
    )
    with torch.no_grad():
        model(a)  # eval: nothing written
        assert int(model.bank_count) == 0
        fill_bank(model, a)
        fill_bank(model, b)
        model.train()  # the bank holds training-mode embeddings (batch statistics in the ResNet)
        ha, _ = model.embed(a)
        hb, _ = model.embed(b)
        model.eval()
    assert int(model.bank_count) == 6 and int(model.bank_batch) == 4
    # slots 0-3 got a, then b's four stays went to slots 4, 5, 0, 1
    torch.testing.assert_close(model.bank_h[CXR, [4, 5, 0, 1]], hb[CXR], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bank_h[EHR, [2, 3]], ha[EHR][[2, 3]], rtol=1e-5, atol=1e-6)
    assert model.bank_avail[CXR].tolist() == [True, False, True, False, False, True]
    state = model.state_dict()
    assert {"bank_h", "bank_avail", "bank_count", "bank_next", "bank_batch"} <= set(state)
    fresh = build(seed=5, bank_size=6)
    fresh.load_state_dict(state)
    q = make_batch("phenotype", seed=3)
    with torch.no_grad():
        assert torch.equal(fresh(q).logits, model(q).logits)


def test_a_missing_xray_is_imputed_from_the_training_bank_not_from_eval_batch_mates():
    """Fails if eval builds its graph over the batch (batch-mates change the imputation) or ignores the bank (a
    different bank leaves it unchanged). The stay without an X-ray is predicted with two different sets of
    batch-mates: identical imputation and logits; with another bank: a different imputation."""
    model = build()
    with torch.no_grad():
        model.theta.fill_(-6.0)  # keep (almost) every edge so the neighbours matter
    fill_bank(model, make_batch("phenotype", seed=1))
    query = make_batch("phenotype", seed=4)  # stay 3: no X-ray
    mates1 = make_batch("phenotype", seed=5)
    mates2 = make_batch("phenotype", seed=6, has_cxr=(False, True, False, True))
    with torch.no_grad():
        out1, st1 = model.forward_with_state(cat(sub(query, [3]), mates1))
        g1 = st1["gcn"][CXR][0]
        out2, st2 = model.forward_with_state(cat(mates2, sub(query, [3])))
        g2 = st2["gcn"][CXR][4]
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out1.logits[0], out2.logits[4], rtol=1e-5, atol=1e-6)
    other = build()
    other.load_state_dict(model.state_dict())
    fill_bank(other, make_batch("phenotype", seed=7))
    fill_bank(other, make_batch("phenotype", seed=8))  # replaces only part of the bank
    with torch.no_grad():
        g3 = other.forward_with_state(sub(query, [3]))[1]["gcn"][CXR][0]
    assert (g3 - g1).abs().max() > 1e-4


def test_the_eval_row_is_the_thresholded_kernel_against_the_bank_weighted_by_batch_mates_per_bank_stay():
    """Fails if eval similarities are not computed against the bank with the bank's bandwidth, or not rescaled by
    (B - 1) / N: a bank without X-rays, so S = K_ehr(query, bank), thresholded, times (B - 1) / N."""
    model = build()
    bank = make_batch("phenotype", seed=1, has_cxr=(False, False, False, False))
    fill_bank(model, bank)
    fill_bank(model, make_batch("phenotype", seed=2, has_cxr=(False, False, False, False)))
    n = int(model.bank_count)
    query = make_batch("phenotype", seed=3)
    with torch.no_grad():
        _, st = model.forward_with_state(query)
        hq = model.embed(query)[0][EHR]
        k_q, _ = model.modality_kernel(
            EHR, model.kernel_inputs(EHR, hq), model.kernel_inputs(EHR, model.bank_h[EHR, :n])
        )
        want = threshold_similarity(k_q, model.theta) * (int(model.bank_batch) - 1) / n
    assert n == 8
    torch.testing.assert_close(st["adj"][EHR], want)
    assert torch.equal(st["adj"][CXR], torch.zeros(4, n))  # no bank stay has an X-ray


def test_a_missing_xray_aggregates_only_bank_stays_that_have_one():
    """Fails with the official m m^T masking (the missing row aggregates nothing, bias only) and if columns are not
    masked by availability: the X-ray adjacency of a stay without one is zero exactly on the bank stays without an
    X-ray and positive on the others; garbage stored for a bank stay without an X-ray changes nothing, while the
    embedding of a bank stay with one changes the imputation."""
    model = build()
    with torch.no_grad():
        model.theta.fill_(-6.0)
    fill_bank(model, make_batch("phenotype", seed=1, has_cxr=(True, False, True, False)))
    query = sub(make_batch("phenotype", seed=4), [3])  # no X-ray
    with torch.no_grad():
        _, st = model.forward_with_state(query)
        adj_cxr, adj_ehr = st["adj"][CXR][0], st["adj"][EHR][0]
        g = st["gcn"][CXR][0]
        assert torch.equal(adj_cxr[[1, 3]], torch.zeros(2)) and bool((adj_cxr[[0, 2]] > 0).all())
        assert bool((adj_ehr > 0).all())
        model.bank_h[CXR, 1] = torch.randn(model.d) * 50
        assert torch.equal(model.forward_with_state(query)[1]["gcn"][CXR][0], g)
        model.bank_h[CXR, 0] += 1.0
        assert (model.forward_with_state(query)[1]["gcn"][CXR][0] - g).abs().max() > 1e-4
        assert (g - tf.selu(model.gcn2[CXR].bias)).abs().max() > 1e-4  # not the bias-only "imputation"


def test_in_training_a_missing_xray_borrows_from_batch_mates_with_one():
    """Fails with the official m m^T masking: in the batch graph the stay without an X-ray gets an X-ray imputation
    that changes when a batch-mate's X-ray changes."""
    model = build().train()
    with torch.no_grad():
        model.theta.fill_(-6.0)
    batch = make_batch("phenotype")  # stay 3: no X-ray
    other = dict(batch, cxr=batch["cxr"].clone())
    other["cxr"][0] = torch.randn_like(other["cxr"][0])
    with torch.no_grad():
        _, st = model.forward_with_state(batch)
        g, adj = st["gcn"][CXR][3], st["adj"][CXR][3]
        g2 = model.forward_with_state(other)[1]["gcn"][CXR][3]
    assert adj[3] == 0 and bool((adj[:3] > 0).all())
    assert (g2 - g).abs().max() > 1e-4


def test_with_an_empty_bank_a_stay_only_has_its_self_loop():
    """Before any training: a present modality goes through the GCN with its self-loop (weight 1) only; a missing
    one has nothing to borrow from and gets SELU(b2)."""
    model = build()
    batch = make_batch("phenotype")
    with torch.no_grad():
        _, st = model.forward_with_state(batch)
        hs, _ = model.embed(batch)
        for m in (EHR, CXR):
            gcn1, gcn2 = model.gcn1[m], model.gcn2[m]
            alone = tf.selu(tf.selu(hs[m] @ gcn1.weight + gcn1.bias) @ gcn2.weight + gcn2.bias)
            present = [0, 1, 2, 3] if m == EHR else [0, 1, 2]
            torch.testing.assert_close(st["gcn"][m][present], alone[present])
        torch.testing.assert_close(st["gcn"][CXR][3], tf.selu(model.gcn2[CXR].bias))
