"""Gradients against finite differences (torch.autograd.gradcheck, float64, loop kernel, tiny sizes).

Routing is piecewise constant; each case uses a seed whose routing margins (gap between the k-th and
(k+1)-th selection score, and between kept and dropped groups) are far above gradcheck's 1e-6
perturbation, so no selection flips while the finite differences are taken.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from parity import reference
from parity.config import MoEConfig
from parity.weights import init_weights
from tests.torch.conftest import build_moe

SMALL = dict(dim=4, hidden_dim=6, num_experts=4)
GRAD_CASES = {
    "sigmoid_top1_before": MoEConfig(**SMALL),
    "softmax_top2_after_switch": MoEConfig(**SMALL, top_k=2, score_func="softmax", route_norm=True,
                                           score_before_experts=False, load_balance_loss="switch",
                                           load_balance_coeff=0.5, router_z_loss_coeff=0.1),
    "groups_top2_sum_bias_shared_sequence": MoEConfig(
        **SMALL, top_k=2, num_expert_groups=2, num_limited_groups=1, group_score="top2_sum",
        use_expert_bias=True, route_scale=2.5, num_shared_experts=1, shared_hidden_dim=4,
        load_balance_loss="sequence", load_balance_coeff=0.5),
}


def _margin(weights, x, cfg):
    tokens = x.reshape(-1, cfg.dim).astype(np.float64)
    aux = reference.route(tokens, weights["router.gate.weight"], cfg, weights["expert_bias"])
    sel = aux["scores"] + (weights["expert_bias"] if cfg.use_expert_bias else 0)
    margins = []
    if cfg.num_expert_groups:
        g = np.sort(sel.reshape(len(sel), cfg.num_expert_groups, -1), -1)
        gscore = g[..., -1] if cfg.group_score == "max" else g[..., -1] + g[..., -2]
        gs = np.sort(gscore, -1)[:, ::-1]
        margins.append((gs[:, cfg.num_limited_groups - 1] - gs[:, cfg.num_limited_groups]).min())
        keep = reference.group_limited_mask(sel, cfg.num_expert_groups, cfg.num_limited_groups, cfg.group_score)
        sel = np.where(keep, sel, -np.inf)
    s = np.sort(sel, -1)[:, ::-1]
    if cfg.top_k < cfg.num_experts:
        margins.append(np.nan_to_num(s[:, cfg.top_k - 1] - s[:, cfg.top_k], posinf=1.0).min())
    return min(margins) if margins else 1.0


def _pick_seed(cfg, shape):
    for seed in range(50):
        weights = init_weights(cfg, seed)
        x = np.random.default_rng(seed + 1000).standard_normal(shape)
        if _margin(weights, x, cfg) > 1e-3:
            return weights, x
    raise AssertionError("no seed with a safe routing margin")


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck(name):
    cfg = GRAD_CASES[name]
    weights, x = _pick_seed(cfg, (2, 3, cfg.dim))
    moe = build_moe(cfg, weights, torch.float64, expert_kernel="loop")
    names = [n for n, _ in moe.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in moe.parameters())
    xt = torch.from_numpy(x).requires_grad_()

    def f(x, *ps):
        out, aux = functional_call(moe, dict(zip(names, ps, strict=True)), (x,), {"return_aux": True})
        losses = [aux[k].reshape(1) for k in ("load_balance_loss", "router_z_loss") if k in aux]
        return torch.cat([out.reshape(-1), *losses])

    assert torch.autograd.gradcheck(f, (xt, *params), eps=1e-6, atol=1e-6, rtol=1e-5)
    # every parameter receives a gradient through the layer (no silently detached path)
    out = f(xt, *params)
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    assert all(g is not None for g in grads), [n for n, g in zip(names, grads, strict=True) if g is None]


def test_fast_kernels_gradients_match_loop(fake_npu):
    """Whole-layer gradients (input and every parameter) agree across kernels in float32."""
    cfg = GRAD_CASES["groups_top2_sum_bias_shared_sequence"].replace(dim=16, hidden_dim=24, num_experts=8)
    weights = init_weights(cfg, 1)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 8, 16)).astype(np.float32))
    grads = {}
    for kernel in ("loop", "grouped_mm", "npu", "auto"):
        moe = build_moe(cfg, weights, expert_kernel=kernel)
        xk = x.clone().requires_grad_()
        out, aux = moe(xk, return_aux=True)
        (out.pow(2).sum() + aux["load_balance_loss"]).backward()
        grads[kernel] = [xk.grad] + [p.grad for p in moe.parameters()]
    for kernel in ("grouped_mm", "npu", "auto"):
        for a, b in zip(grads[kernel], grads["loop"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
