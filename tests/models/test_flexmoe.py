"""Flex-MoE: combination-indexed missing bank, exact top-k routing, gate loss, balance terms, attention residual,
warm-up curriculum. Each test names the replacement (identity / zero) under which it fails."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from model_batches import F, S, make_batch

from carebench.models import create_model
from carebench.models.base import per_sample_task_loss
from carebench.models.fusion.flexmoe import (
    NoisyTopKGate,
    SparseMoE,
    combination_index,
    cv_squared,
    gate_loss,
    modality_combinations,
    warmup_keep,
)


def build(task: str = "phenotype", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("flexmoe", task, F, S, preset="test", **overrides).eval()


def test_combinations_are_ordered_largest_first_with_zero_all_present():
    assert modality_combinations(2) == [(True, True), (True, False), (False, True)]
    present = torch.tensor([[True, True], [True, False], [False, True]])
    assert combination_index(present).tolist() == [0, 1, 2]


def test_a_stay_without_xray_gets_the_bank_entry_of_its_combination():
    """Fails if the bank is replaced by zeros or indexed by a constant: the CXR tokens of the stay without an X-ray
    are exactly ``missing_embeds[1, 1]``, and editing that entry changes that stay's logits only; editing the
    entries of other combinations changes nothing."""
    model = build()
    batch = make_batch("phenotype")  # stay 3 has no X-ray
    with torch.no_grad():
        tokens, _, mc = model.tokens(batch)
        p = model.n_patches
        assert mc.tolist() == [0, 0, 0, 1]
        assert torch.equal(tokens[3, p:], model.missing_embeds[1, 1])
        assert not torch.equal(tokens[0, p:], model.missing_embeds[0, 1])
        before = model(batch).logits
        model.missing_embeds[0].add_(1.0)
        model.missing_embeds[2].add_(1.0)
        model.missing_embeds[1, 0].add_(1.0)  # EHR is never missing: unused
        assert torch.equal(model(batch).logits, before)
        model.missing_embeds[1, 1].add_(1.0)
        after = model(batch).logits
    assert torch.equal(after[:3], before[:3])
    assert (after[3] - before[3]).abs().max() > 1e-3


def test_top_k_sends_every_token_to_exactly_k_distinct_experts_and_mixes_them():
    """Fails if dispatch is replaced by identity or top-k by all experts: exact k distinct experts per token and the
    output equals the brute-force weighted sum of those k experts' outputs."""
    torch.manual_seed(0)
    moe = SparseMoE(d=6, num_experts=5, k=2, n_gates=1)
    for gate in moe.gates:
        torch.nn.init.normal_(gate.w_gate.weight)
    x = torch.randn(3, 7, 6)
    for mode in (True, False):
        moe.train(mode)
        torch.manual_seed(1)
        (out,), ((idx, logits, _),) = moe([x])
        flat_idx = idx.reshape(-1, 2)
        counts = torch.zeros(flat_idx.size(0), 5).scatter_add(
            1, flat_idx, torch.ones_like(flat_idx, dtype=torch.float)
        )
        assert ((counts > 0).sum(1) == 2).all() and (counts.sum(1) == 2).all()
    moe.eval()
    (out,), ((idx, logits, _),) = moe([x])
    flat, fi = x.reshape(-1, 6), idx.reshape(-1, 2)
    w = torch.softmax(logits.reshape(-1, 5).gather(1, fi), dim=-1)
    expected = torch.stack(
        [sum(w[n, j] * moe.experts[int(fi[n, j])](flat[n]) for j in range(2)) for n in range(flat.size(0))]
    )
    torch.testing.assert_close(out.reshape(-1, 6), expected)
    assert torch.equal(idx.reshape(-1, 2), logits.reshape(-1, 5).topk(2, dim=-1).indices)


def test_gate_is_deterministic_in_eval_and_noisy_in_training():
    gate = NoisyTopKGate(4, 6, 2)
    torch.nn.init.normal_(gate.w_noise.weight)
    x = torch.randn(50, 4)
    gate.eval()
    torch.manual_seed(0)
    a = gate(x)
    torch.manual_seed(1)
    b = gate(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    gate.train()
    torch.manual_seed(0)
    c = gate(x)
    torch.manual_seed(1)
    d = gate(x)
    assert not torch.equal(c[0], d[0])


def test_gate_loss_alone_moves_missing_stays_to_their_combination_expert():
    """Fails if the cross-entropy toward expert ``mc`` is removed from ``gate_loss``: after 80 Adam steps on the
    gate loss alone, the mean gate probability of expert 1 for the tokens of the stay without an X-ray rises from
    ~1/E (zero-initialised gate) to above 0.5."""
    model = build().train()
    batch = make_batch("phenotype")
    gate_params = [p for n, p in model.named_parameters() if ".gates." in n]
    opt = torch.optim.Adam(gate_params, lr=5e-2)

    def prob_expert1() -> float:
        model.eval()
        with torch.no_grad():
            x, _, _ = model.tokens(batch)
            x = model.positions + x
            layer = model.layers[0]
            h = layer.attn_norm(x)
            x = x + layer.attn(h, h, h, need_weights=False)[0]
            probs = [
                torch.softmax(g.w_gate(layer.ffn_norm(c))[3], dim=-1)[:, 1].mean()
                for c, g in zip(x.split(model.n_patches, dim=1), layer.moe.gates, strict=True)
            ]
        model.train()
        return float(sum(probs) / len(probs))

    start = prob_expert1()
    assert abs(start - 1 / 4) < 1e-6
    for _ in range(80):
        opt.zero_grad()
        model(batch).aux_losses["gate"].backward()
        opt.step()
    assert prob_expert1() > 0.5


def test_importance_and_load_terms_have_known_values_on_a_constructed_gate():
    """Full stays only (mc = 0), eval-style hard load. Two tokens, four experts, k = 2:
    token 0 logits (0, 0, -9, -9) -> gates (.5, .5, 0, 0); token 1 (0, -9, 0, -9) -> (.5, 0, .5, 0).
    importance = (1, .5, .5, 0): mean .5, unbiased var 1/6 -> cv^2 = 2/3; load = (2, 1, 1, 0): cv^2 = 2/3 too."""
    neg = -9.0
    logits = torch.tensor([[[0.0, 0.0, neg, neg]], [[0.0, neg, 0.0, neg]]])  # [B=2, P=1, E=4]
    load = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[1.0, 0.0, 1.0, 0.0]]])
    got = gate_loss(logits, load, torch.tensor([0, 0]), k=2)
    torch.testing.assert_close(got, torch.tensor(4.0 / 3.0))
    assert float(cv_squared(torch.tensor([1.0, 1.0, 1.0]))) == 0.0
    # stays missing a modality: cross-entropy toward mc plus balance over experts 1.. only
    mc = torch.tensor([1, 1])
    ce = torch.nn.functional.cross_entropy(logits.reshape(2, 4), mc)
    imp, hard = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = ce + cv_squared(imp) + cv_squared(hard)
    torch.testing.assert_close(gate_loss(logits, load, mc, k=2), expected)


def test_the_attention_residual_is_present():
    """Fails with the official ``x = x + dropout(x)`` (input dropped): with the attention output and the dense FFN
    zeroed, a dense layer must return its input exactly; without the residual it would return zeros."""
    model = build(num_layers=2)
    layer = model.layers[1]
    assert not layer.sparse
    with torch.no_grad():
        for p in list(layer.attn.out_proj.parameters()) + list(layer.ffn[-1].parameters()):
            p.zero_()
        x = torch.randn(3, 2 * model.n_patches, model.d)
        out, _ = layer(x, model.n_patches)
        assert torch.equal(out, x)
        layer.residual = False
        assert not torch.allclose(layer(x, model.n_patches)[0], x)


def test_warmup_orders_stays_by_number_of_observed_modalities():
    """Fails if the curriculum is replaced by "every stay always": in warm-up epoch 0 only full stays count, from
    epoch 1 (two modalities) every stay; after the warm-up the task loss is the framework's."""
    n = torch.tensor([2, 1, 2, 1])
    assert warmup_keep(n, 2, 0, 2).tolist() == [True, False, True, False]
    assert warmup_keep(n, 2, 1, 2).tolist() == [True] * 4
    assert warmup_keep(n, 2, 0, 0).tolist() == [True] * 4
    assert warmup_keep(n, 2, None, 5).tolist() == [True] * 4
    model = build()
    batch = make_batch("phenotype", has_cxr=(True, False, True, False))
    per = None
    with torch.no_grad():
        model.on_train_epoch_start(SimpleNamespace(current_epoch=0))
        out0 = model(batch)
        per = per_sample_task_loss(model.task, out0.logits, batch["y"])
        torch.testing.assert_close(out0.aux_losses["task"], per[[0, 2]].mean())
        model.on_train_epoch_start(SimpleNamespace(current_epoch=2))
        out2 = model(batch)
        torch.testing.assert_close(out2.aux_losses["task"], per.mean())
    assert model.train_task_loss is False  # the framework does not add the unmasked task loss on top
