"""moe_torch.MoE against the float64 reference (parity.reference), every case x kernel x dtype.

Tolerances (tests.cases.TOLERANCES, max-abs/relative on O(1) values):
- float32: rtol 1e-4, atol 1e-5 against the reference on the same float32 weights and input;
- bfloat16: rtol 3e-2, atol 3e-2 against the reference run on the bf16-rounded weights and input
  (the module holds exactly those values; the error left is bf16 arithmetic in the experts).
  Router outputs are float32 in every dtype, so they are held to the float32 tolerance;
- float64: rtol 1e-10, atol 1e-12.
Routing (selected experts) and counts must match exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import reference
from tests.cases import TOLERANCES
from tests.torch.conftest import KERNELS, bf16_round, build_moe, to_np

ROUTER_KEYS = ("router_logits", "scores", "routing_weights")


def _run(case, kernel, dtype, request):
    name, cfg, weights, x = case
    if kernel == "npu":
        request.getfixturevalue("fake_npu")
    if dtype == torch.bfloat16:
        ref_weights = {k: bf16_round(v) for k, v in weights.items() if k not in ("expert_bias", "tokens_per_expert")}
        ref_weights["expert_bias"] = weights["expert_bias"]  # stays float32 in the module
        ref_x = bf16_round(x)
    else:
        ref_weights, ref_x = weights, x
    moe = build_moe(cfg, weights, dtype, expert_kernel=kernel)
    out, aux = moe(torch.from_numpy(x).to(dtype), return_aux=True)
    ref_out, ref_aux = reference.moe_forward(ref_weights, ref_x, cfg)
    return cfg, out, aux, ref_out, ref_aux


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_matches_reference(case, kernel, dtype, request):
    cfg, out, aux, ref_out, ref_aux = _run(case, kernel, dtype, request)
    assert out.dtype == dtype and out.shape == ref_out.shape
    np.testing.assert_array_equal(aux["selected_experts"].numpy(), ref_aux["selected_experts"])
    assert aux["selected_experts"].dtype == torch.int64
    np.testing.assert_array_equal(to_np(aux["tokens_per_expert"]), ref_aux["tokens_per_expert"])
    for key in ROUTER_KEYS:
        assert aux[key].dtype == torch.float32, key
        np.testing.assert_allclose(to_np(aux[key]), ref_aux[key], **TOLERANCES["float32"], err_msg=key)
    tol = TOLERANCES["bfloat16" if dtype == torch.bfloat16 else "float32"]
    np.testing.assert_allclose(to_np(out), ref_out, **tol)
    for key in ("load_balance_loss", "router_z_loss"):
        assert (key in aux) == (key in ref_aux), key
        if key in aux:
            assert aux[key].dtype == torch.float32 and aux[key].ndim == 0
            np.testing.assert_allclose(aux[key].item(), ref_aux[key], **TOLERANCES["float32"], err_msg=key)


@pytest.mark.parametrize("kernel", ["loop", "auto", "grouped_mm"])
def test_float64_matches_reference(case, kernel):
    """float64 runs everywhere (grouped_mm has no float64 path and falls back to the exact loop)."""
    _, cfg, weights, x = case
    moe = build_moe(cfg, weights, torch.float64, expert_kernel=kernel)
    assert moe.expert_bias.dtype == torch.float32
    out, aux = moe(torch.from_numpy(x).double(), return_aux=True)
    ref_out, ref_aux = reference.moe_forward(weights, x, cfg)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.detach().numpy(), ref_out, **TOLERANCES["float64"])
    np.testing.assert_array_equal(aux["selected_experts"].numpy(), ref_aux["selected_experts"])


def test_selected_experts_override(case):
    """``selected_experts=`` replaces the top-k; weights are gathered from the module's own scores."""
    _, cfg, weights, x = case
    moe = build_moe(cfg, weights, expert_kernel="loop")
    n = x.shape[0] * x.shape[1]
    rng = np.random.default_rng(7)
    forced = np.stack([rng.permutation(cfg.num_experts)[: cfg.top_k] for _ in range(n)])
    out, aux = moe(torch.from_numpy(x), return_aux=True, selected_experts=torch.from_numpy(forced))
    np.testing.assert_array_equal(aux["selected_experts"].numpy(), forced)
    tokens = x.reshape(n, -1).astype(np.float64)
    ref = reference.route(tokens, weights["router.gate.weight"], cfg, weights["expert_bias"])
    w = np.take_along_axis(ref["scores"], forced, axis=-1)
    if cfg.route_norm:
        w = w / (w.sum(-1, keepdims=True) + reference.ROUTE_NORM_EPS)
    w = w * cfg.route_scale
    np.testing.assert_allclose(to_np(aux["routing_weights"]), w, **TOLERANCES["float32"])
    expected = reference.experts_forward(tokens, forced, w, weights, cfg.score_before_experts)
    if cfg.num_shared_experts:
        expected = expected + reference.feed_forward(
            tokens, *(weights[f"shared_expert.{k}.weight"].astype(np.float64) for k in ("w1", "w2", "w3")))
    np.testing.assert_allclose(to_np(out).reshape(n, -1), expected, **TOLERANCES["float32"])


def test_ties_go_to_lower_expert_index():
    """Exactly equal scores (a zero router) pick experts 0..k-1 in that order, every kernel."""
    from parity.config import MoEConfig

    cfg = MoEConfig(dim=8, hidden_dim=8, num_experts=8, top_k=3, score_func="softmax")
    moe = build_moe(cfg, {"router.gate.weight": np.zeros((8, 8), np.float32),
                          **{f"experts.{k}": np.ones(s, np.float32) * 0.1 for k, s in
                             (("w1", (8, 8, 8)), ("w2", (8, 8, 8)), ("w3", (8, 8, 8)))},
                          "expert_bias": np.zeros(8, np.float32), "tokens_per_expert": np.zeros(8, np.float32)})
    _, aux = moe(torch.randn(2, 5, 8), return_aux=True)
    assert (aux["selected_experts"] == torch.tensor([0, 1, 2])).all()


def test_zero_tokens_forward_and_backward():
    """x with 0 tokens: empty output, zero losses, zero gradients, no NaN."""
    from tests.cases import CASES

    cfg = CASES["sequence_loss_zloss"]
    for kernel in ("loop", "grouped_mm"):
        moe = build_moe(cfg, *_weights(cfg), expert_kernel=kernel)
        x = torch.zeros(2, 0, cfg.dim, requires_grad=True)
        out, aux = moe(x, return_aux=True)
        assert out.shape == (2, 0, cfg.dim)
        assert aux["load_balance_loss"].item() == 0.0 and aux["router_z_loss"].item() == 0.0
        (out.sum() + aux["load_balance_loss"] + aux["router_z_loss"]).backward()
        for name, p in moe.named_parameters():
            assert p.grad is None or (p.grad == 0).all(), name


def _weights(cfg):
    from parity.weights import init_weights

    return (init_weights(cfg, 0),)
