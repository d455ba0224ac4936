"""Non-finite values stay where the maths puts them, in every moe_torch kernel (issue 12).

The same cases as tests/jax/test_nonfinite.py: expert 0's activations overflow (its finite weights
times 1e20) or one of its weights is NaN. Only expert 0's weight gradients and the dx of the tokens
routed to it may be non-finite; every other expert's weight gradients, every other token's dx, the
gate rows of experts 1..3 and the shared expert's gradients are finite and equal to a clean run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.weights import init_weights
from tests.nonfinite_case import CFG, CT, X, fault
from tests.torch.conftest import build_moe


def grads(weights, kernel, score_before_experts):
    moe = build_moe(CFG, weights, score_before_experts=score_before_experts, expert_kernel=kernel)
    x = torch.from_numpy(X.copy()).requires_grad_()
    out, aux = moe(x, return_aux=True)
    (out * torch.from_numpy(CT)).sum().backward()
    g = {name: p.grad.numpy().copy() for name, p in moe.named_parameters()}
    g["x"] = x.grad.numpy().reshape(-1, CFG.dim)
    return g, aux["selected_experts"].numpy()


@pytest.mark.parametrize("kind,score_before_experts", [("overflow", True), ("nan", False)], ids=["overflow", "nan"])
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm", "npu"])
def test_one_expert_fault_stays_in_that_expert(request, kernel, kind, score_before_experts):
    if kernel == "npu":
        request.getfixturevalue("fake_npu")
    clean = init_weights(CFG, 0)
    g_ref, sel = grads(clean, kernel, score_before_experts)
    g, sel_bad = grads(fault(clean, kind), kernel, score_before_experts)
    np.testing.assert_array_equal(sel_bad, sel)
    uses0 = (sel == 0).any(1)
    assert uses0.any() and not uses0.all()
    assert not all(np.isfinite(g[f"experts.{n}"][0]).all() for n in ("w1", "w2", "w3"))
    assert not np.isfinite(g["x"][uses0]).all()
    tol = dict(rtol=1e-5, atol=1e-6)
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        assert np.isfinite(g[name][1:]).all(), f"{kernel}: non-finite {name} gradient of experts 1..3"
        np.testing.assert_allclose(g[name][1:], g_ref[name][1:], err_msg=name, **tol)
    assert np.isfinite(g["x"][~uses0]).all()
    np.testing.assert_allclose(g["x"][~uses0], g_ref["x"][~uses0], err_msg="dx", **tol)
    gate = g["router.gate.weight"]
    assert np.isfinite(gate[1:]).all()
    np.testing.assert_allclose(gate[1:], g_ref["router.gate.weight"][1:], err_msg="gate", **tol)
    for name in g:
        if name.startswith("shared_expert."):
            assert np.isfinite(g[name]).all(), name
            np.testing.assert_allclose(g[name], g_ref[name], err_msg=name, **tol)
