"""Non-finite values stay where the maths puts them, in every moe_jax kernel (issue 12).

One expert's activations overflow (its finite weights times 1e20) or one of its weights is NaN: the
non-finite values must stay in that expert's weight gradients and in the dx of the tokens routed to
it. Every other expert's weight gradients, every other token's dx, the gate rows of the other
experts (sigmoid scores, no route_norm: a token's gate gradient touches only its selected experts)
and the shared expert's gradients are finite and equal to a run without the fault.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_jax
from parity.weights import init_weights
from tests.jax.helpers import KERNELS, build
from tests.nonfinite_case import CFG, CT, X, fault


def grads(weights, kernel, score_before_experts):
    moe = build(CFG.replace(score_before_experts=score_before_experts), weights, kernel=kernel, train=False)

    def objective(m, x):
        return (m(x) * CT).sum()

    g_moe, g_x = nnx.grad(objective, argnums=(0, 1))(moe, jnp.asarray(X))
    g = moe_jax.state_dict(g_moe)
    g["x"] = np.asarray(g_x).reshape(-1, CFG.dim)
    _, aux = moe(jnp.asarray(X), return_aux=True)
    return g, np.asarray(aux["selected_experts"])


# the routing weight before the experts with one fault, after them with the other (both paths, half the time)
@pytest.mark.parametrize("kind,score_before_experts", [("overflow", True), ("nan", False)], ids=["overflow", "nan"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_one_expert_fault_stays_in_that_expert(kernel, kind, score_before_experts):
    clean = init_weights(CFG, 0)
    g_ref, sel = grads(clean, kernel, score_before_experts)
    g, sel_bad = grads(fault(clean, kind), kernel, score_before_experts)
    np.testing.assert_array_equal(sel_bad, sel)  # routing does not depend on the expert weights
    uses0 = (sel == 0).any(1)
    assert uses0.any() and not uses0.all(), "the input must route some tokens to expert 0 and some not"
    # the fault is there: expert 0's own gradients and its tokens' dx are not all finite
    assert not all(np.isfinite(g[f"experts.{n}"][0]).all() for n in ("w1", "w2", "w3"))
    assert not np.isfinite(g["x"][uses0]).all()
    tol = dict(rtol=1e-5, atol=1e-6)
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        assert np.isfinite(g[name][1:]).all(), f"{kernel}: non-finite {name} gradient of experts 1..3"
        np.testing.assert_allclose(g[name][1:], g_ref[name][1:], err_msg=name, **tol)
    assert np.isfinite(g["x"][~uses0]).all(), f"{kernel}: non-finite dx of tokens that never use expert 0"
    np.testing.assert_allclose(g["x"][~uses0], g_ref["x"][~uses0], err_msg="dx", **tol)
    gate = g["router.gate.weight"]
    assert np.isfinite(gate[1:]).all(), f"{kernel}: non-finite gate gradient of experts 1..3"
    np.testing.assert_allclose(gate[1:], g_ref["router.gate.weight"][1:], err_msg="gate", **tol)
    for name in g:
        if name.startswith("shared_expert."):
            assert np.isfinite(g[name]).all(), name
            np.testing.assert_allclose(g[name], g_ref[name], err_msg=name, **tol)
