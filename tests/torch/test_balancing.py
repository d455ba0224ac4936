"""Auxiliary losses (values, gradients, direction) and the auxiliary-loss-free bias update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_torch import MoE, load_balance_loss, router_z_loss, update_expert_bias
from parity import reference
from parity.config import MoEConfig
from tests.cases import CASES, TOLERANCES, make_case
from tests.torch.conftest import build_moe


@pytest.mark.parametrize("kind", ["switch", "sequence"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_load_balance_loss_matches_reference(kind, score_func):
    rng = np.random.default_rng(0)
    b, s, e, k = 3, 5, 8, 2
    scores_np = rng.random((b * s, e)) + 0.05
    if score_func == "softmax":
        scores_np /= scores_np.sum(-1, keepdims=True)
    idx_np = reference.topk_lower_index(scores_np, k)
    want = reference.load_balance_loss(scores_np, idx_np, e, 0.3, kind, batch=b)
    got = load_balance_loss(torch.from_numpy(scores_np).float(), torch.from_numpy(idx_np), e, 0.3, kind, batch=b)
    np.testing.assert_allclose(got.item(), want, **TOLERANCES["float32"])
    got64 = load_balance_loss(torch.from_numpy(scores_np), torch.from_numpy(idx_np), e, 0.3, kind, batch=b)
    np.testing.assert_allclose(got64.item(), want, **TOLERANCES["float64"])


def test_router_z_loss_matches_reference():
    logits = np.random.default_rng(1).standard_normal((7, 8)) * 3
    np.testing.assert_allclose(router_z_loss(torch.from_numpy(logits), 0.01).item(),
                               reference.router_z_loss(logits, 0.01), **TOLERANCES["float64"])


def _imbalanced(kind="switch"):
    """A softmax router whose gate favours expert 0 (counts far from uniform)."""
    cfg = MoEConfig(dim=16, hidden_dim=8, num_experts=8, top_k=2, score_func="softmax",
                    load_balance_loss=kind, load_balance_coeff=1.0, expert_kernel="loop")
    weights, _ = make_case(cfg)
    gate = weights["router.gate.weight"].copy()
    x = np.random.default_rng(3).standard_normal((4, 64, cfg.dim)).astype(np.float32) + 0.5
    gate[0] += 0.8  # every token leans to expert 0 through the mean of x
    weights["router.gate.weight"] = gate
    return cfg, build_moe(cfg, weights), torch.from_numpy(x)


@pytest.mark.parametrize("kind", ["switch", "sequence"])
def test_balance_loss_gradient_points_toward_balance(kind):
    """The gradient w.r.t. the gate is non-zero and descending it balances the router.

    (The module this kit grew from returned the constant num_experts with a zero gradient.)
    """
    cfg, moe, x = _imbalanced(kind)
    _, aux = moe(x, return_aux=True)
    loss0 = aux["load_balance_loss"]
    assert loss0.item() > cfg.load_balance_coeff * 1.05  # > its balanced value coeff * 1 (imbalanced)
    loss0.backward()
    grad = moe.router.gate.weight.grad
    assert grad.abs().max() > 1e-3
    assert moe.experts.w1.grad is None  # only router scores carry the loss gradient

    def imbalance():
        with torch.no_grad():
            _, a = moe(x, return_aux=True)
        p = a["scores"].mean(0)
        return float(p.std()), float(a["tokens_per_expert"].max()), a["load_balance_loss"].item()

    p_std0, max_count0, _ = imbalance()
    with torch.no_grad():
        moe.router.gate.weight -= 0.05 * grad  # one small step: the mean router probability evens out
    p_std1, _, _ = imbalance()
    assert p_std1 < p_std0
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        moe(x, return_aux=True)[1]["load_balance_loss"].backward()
        opt.step()
    p_std2, max_count2, loss2 = imbalance()
    assert p_std2 < p_std1 and max_count2 < max_count0 and loss2 < loss0.item()


def test_losses_in_aux_are_differentiable_through_router_only():
    cfg = CASES["sequence_loss_zloss"]
    weights, x = make_case(cfg)
    moe = build_moe(cfg, weights)
    _, aux = moe(torch.from_numpy(x), return_aux=True)
    (aux["load_balance_loss"] + aux["router_z_loss"]).backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in moe.named_parameters() if not n.startswith("router"))


# ------------------------------------------------------------------------------- bias update
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("lr", [1e-3, 0.1, 0.37])
def test_update_expert_bias_bit_identical_to_reference(center, lr):
    cfg = CASES["expert_bias"]
    weights, x = make_case(cfg)
    moe = build_moe(cfg, weights).train()
    rng = np.random.default_rng(5)
    bias_ref = weights["expert_bias"].copy()
    for step in range(4):
        xs = torch.from_numpy(rng.standard_normal((2, 9 + step, cfg.dim)).astype(np.float32))
        moe(xs)
        counts = moe.tokens_per_expert.numpy().copy()
        assert counts.sum() == 2 * (9 + step) * cfg.top_k
        bias_ref = reference.update_expert_bias(bias_ref, counts, lr, center=center)
        assert update_expert_bias(moe, lr, center=center) is None  # as the original (and moe_jax)
        assert moe.expert_bias.dtype == torch.float32
        np.testing.assert_array_equal(moe.expert_bias.numpy(), bias_ref)  # bit for bit
        assert (moe.tokens_per_expert == 0).all()


def test_counts_accumulate_only_in_training_mode():
    cfg = CASES["expert_bias"]
    weights, x = make_case(cfg)
    moe = build_moe(cfg, weights)
    xt = torch.from_numpy(x)
    moe.eval()
    moe(xt)
    assert (moe.tokens_per_expert == 0).all()
    moe.train()
    _, aux = moe(xt, return_aux=True)
    torch.testing.assert_close(moe.tokens_per_expert, aux["tokens_per_expert"])
    moe.eval()
    moe(xt)
    torch.testing.assert_close(moe.tokens_per_expert, aux["tokens_per_expert"])  # eval did not leak


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half", "double"])
def test_buffers_stay_float32_when_cast(cast):
    cfg = CASES["expert_bias"]
    weights, x = make_case(cfg)
    moe = build_moe(cfg, weights)
    with torch.no_grad():
        moe.expert_bias += 1e-5  # not representable next to 0.02 in bf16
    before = moe.expert_bias.clone()
    moe = {"to": lambda m: m.to(torch.bfloat16), "bfloat16": lambda m: m.bfloat16(),
           "half": lambda m: m.half(), "double": lambda m: m.double()}[cast](moe)
    assert moe.experts.w1.dtype != torch.float32
    assert moe.expert_bias.dtype == torch.float32 and moe.tokens_per_expert.dtype == torch.float32
    assert torch.equal(moe.expert_bias, before)
    assert moe.state_dict()["expert_bias"].dtype == torch.float32
    moe.train()(torch.from_numpy(x).to(moe.experts.w1.dtype))
    update_expert_bias(moe, 1e-4)
    assert moe.expert_bias.dtype == torch.float32


def test_update_expert_bias_all_reduce(gloo_group):
    """With a process group the counts are summed over its ranks first (1-rank gloo group here)."""
    cfg = CASES["expert_bias"]
    weights, x = make_case(cfg)
    moe = build_moe(cfg, weights).train()
    moe(torch.from_numpy(x))
    counts = moe.tokens_per_expert.numpy().copy()
    update_expert_bias(moe, 0.01, group=gloo_group, center=True)
    np.testing.assert_array_equal(moe.expert_bias.numpy(),
                                  reference.update_expert_bias(weights["expert_bias"], counts, 0.01, center=True))


def test_update_expert_bias_rejects_bad_lr():
    moe = MoE(dim=8, hidden_dim=8, num_experts=4)
    for lr in (float("nan"), -1.0, "0.1"):
        with pytest.raises(ValueError, match="lr="):
            update_expert_bias(moe, lr)
