"""moe_jax against the float64 NumPy reference: every option case, every kernel, float32 / bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity import reference
from tests.cases import CASES, TOLERANCES, make_case
from tests.jax.helpers import KERNELS, assert_close, bf16_round, build, rounded_weights

# bfloat16 sweeps every case once, rotating through the kernels so every kernel sees bfloat16 too
BF16_KERNEL = {name: KERNELS[i % len(KERNELS)] for i, name in enumerate(sorted(CASES))}


def check_against_reference(cfg, weights, x, out, aux, tol):
    ref_out, ref_aux = reference.moe_forward(weights, x, cfg)
    assert sorted(aux) == sorted(ref_aux)
    np.testing.assert_array_equal(np.asarray(aux["selected_experts"]), ref_aux["selected_experts"])
    assert aux["selected_experts"].dtype == jnp.int32
    for key in ref_aux:
        if key != "selected_experts":
            assert aux[key].dtype == jnp.float32, key
            assert_close(key, aux[key], ref_aux[key], TOLERANCES["float32"])
    assert_close("out", np.asarray(out.astype(jnp.float32)), ref_out, tol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_matches_reference(case, kernel):
    name, cfg, weights, x = case
    moe = build(cfg, weights, kernel=kernel)
    out, aux = moe(jnp.asarray(x), return_aux=True)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    check_against_reference(cfg, weights, x, out, aux, TOLERANCES["float32"])


def test_bfloat16_matches_reference(case):
    name, cfg, weights, x = case
    moe = build(cfg, weights, kernel=BF16_KERNEL[name], param_dtype=jnp.bfloat16)
    assert moe.expert_bias.dtype == jnp.float32 and moe.tokens_per_expert.dtype == jnp.float32
    out, aux = moe(jnp.asarray(x).astype(jnp.bfloat16), return_aux=True)
    assert out.dtype == jnp.bfloat16
    # the reference sees the same bfloat16-rounded weights and input
    check_against_reference(cfg, rounded_weights(weights), bf16_round(x), out, aux, TOLERANCES["bfloat16"])


@pytest.mark.parametrize("kernel", KERNELS + ("auto",))
def test_float64_matches_reference(kernel):
    cfg = CASES["groups_top2_sum_bias"]
    weights, x = make_case(cfg)
    with jax.enable_x64(True):
        moe = build(cfg, weights, kernel=kernel, param_dtype=jnp.float64)
        out, aux = moe(jnp.asarray(x, jnp.float64), return_aux=True)
        assert out.dtype == jnp.float64
        ref_out, _ = reference.moe_forward(weights, x, cfg)
        assert_close("out", out, ref_out, TOLERANCES["float64"] | dict(rtol=1e-9, atol=1e-7))


def test_ties_go_to_the_lower_expert_index():
    """Equal selection scores (duplicated gate rows, a zero gate) pick the lower index first."""
    cfg = CASES["softmax_top2_norm"].replace(top_k=3)
    weights, x = make_case(cfg)
    gate = weights["router.gate.weight"].copy()
    gate[5] = gate[2]
    gate[7] = gate[2]
    for g in (gate, np.zeros_like(gate)):
        w = dict(weights, **{"router.gate.weight": g})
        moe = build(cfg, w, kernel="dense")
        _, aux = moe(jnp.asarray(x), return_aux=True)
        ref_idx = reference.moe_forward(w, x, cfg)[1]["selected_experts"]
        np.testing.assert_array_equal(np.asarray(aux["selected_experts"]), ref_idx)
    np.testing.assert_array_equal(np.asarray(aux["selected_experts"]), np.tile([0, 1, 2], (16, 1)))


def test_group_top2_sum_includes_the_bias():
    """A large bias on one expert moves its group into the kept groups ("top2_sum" uses sel)."""
    cfg = CASES["groups_top2_sum_bias"]
    weights, x = make_case(cfg)
    bias = np.zeros(cfg.num_experts, np.float32)
    bias[7] = 10.0
    w = dict(weights, expert_bias=bias)
    _, aux = build(cfg, w)(jnp.asarray(x), return_aux=True)
    idx = np.asarray(aux["selected_experts"])
    assert (idx[:, 0] == 7).all()
    np.testing.assert_array_equal(idx, reference.moe_forward(w, x, cfg)[1]["selected_experts"])


def test_selected_experts_replaces_top_k():
    cfg = CASES["softmax_top2_after"]
    weights, x = make_case(cfg)
    moe = build(cfg, weights, train=False)
    out, aux = moe(jnp.asarray(x), return_aux=True)
    locked = moe(jnp.asarray(x), selected_experts=aux["selected_experts"])
    np.testing.assert_array_equal(np.asarray(locked), np.asarray(out))
    # another choice: weights gathered from this module's own scores at those indices
    forced = np.stack([np.arange(16) % 8, (np.arange(16) + 3) % 8], 1)
    out2, aux2 = moe(jnp.asarray(x), return_aux=True, selected_experts=jnp.asarray(forced))
    np.testing.assert_array_equal(np.asarray(aux2["selected_experts"]), forced)
    scores = np.asarray(aux2["scores"], np.float64)
    w = np.take_along_axis(scores, forced, -1)
    w = w / w.sum(-1, keepdims=True)
    assert_close("routing_weights", aux2["routing_weights"], w, TOLERANCES["float32"])
    ref = reference.experts_forward(x.reshape(16, -1).astype(np.float64), forced, w, weights, False)
    assert_close("out", np.asarray(out2).reshape(16, -1), ref, TOLERANCES["float32"])
