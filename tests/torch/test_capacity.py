"""moe_torch step 6a (capacity and token dropping): the hand-computed cases of tests/capacity_cases.py,
every torch kernel against the float64 reference (the kept set bit for bit), padding, renormalisation,
the locked drop decision, gradients, and a token dropped from all its experts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import moe_torch
from moe_torch.capacity import drop_tokens
from parity import reference as ref
from parity.config import MoEConfig
from parity.weights import init_weights
from tests.capacity_cases import EXPECTED_KEPT, IDX, X_DUPLICATES, W, cfg_for, group_case


def _t(a, dtype=torch.float32):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


@pytest.mark.parametrize("policy", sorted(EXPECTED_KEPT))
def test_keep_policy_hand_computed(policy):
    kept, w, _ = drop_tokens(_t(IDX, torch.int64), _t(W), cfg_for(policy), batch=1)
    np.testing.assert_array_equal(kept.numpy(), EXPECTED_KEPT[policy])
    np.testing.assert_array_equal(w.numpy(), np.where(EXPECTED_KEPT[policy], W, 0).astype(np.float32))


def test_probs_tie_at_the_edge_and_groups():
    w = W.copy()
    w[3] = [0.5, 0.5]
    kept, _, _ = drop_tokens(_t(IDX, torch.int64), _t(w), cfg_for("probs"), batch=1)
    np.testing.assert_array_equal(kept.numpy(), [[True, False], [True, True], [True, True], [True, False]])
    idx, w, seq_kept, batch_kept = group_case()
    for group, expected in (("sequence", seq_kept), ("batch", batch_kept)):
        cfg = MoEConfig(num_experts=2, top_k=1, expert_capacity=1, capacity_group=group)
        kept, _, _ = drop_tokens(_t(idx, torch.int64), _t(w), cfg, batch=2)
        np.testing.assert_array_equal(kept.numpy()[:, 0], expected)


def _layer(cfg, weights, dtype=torch.float32):
    moe = moe_torch.MoE(**cfg.to_kwargs()).to(dtype)
    state = {k: _t(v, torch.float32 if k in ("expert_bias", "tokens_per_expert") else dtype)
             for k, v in weights.items()}
    moe.load_state_dict(state, strict=False)
    return moe.eval()


# every policy x group, each with padding + weights before the experts, and renormalisation + weights after
CASES = [dict(capacity_policy=p, capacity_group=g, capacity_pad=pad, capacity_renorm=not pad, score_before_experts=pad)
         for p, g, pad in itertools.product(("probs", "position", "slot_major"), ("sequence", "batch"), (False, True))]


@pytest.mark.parametrize("kernel", ["loop", pytest.param("grouped_mm", marks=pytest.mark.slow)])
def test_every_kernel_matches_the_reference(kernel):
    """float32 layer vs the float64 reference on the same (float32-exact) weights and input: the kept
    sets bit for bit, outputs and losses within float32 rounding."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 16)).astype(np.float32).astype(np.float64)
    for i, options in enumerate(CASES):
        cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=6, top_k=2, score_func="softmax", route_norm=True,
                        capacity_factor=0.75, num_shared_experts=1, load_balance_loss="switch",
                        expert_kernel=kernel, **options)
        weights = {k: v.astype(np.float32).astype(np.float64) for k, v in init_weights(cfg, seed=i).items()}
        out_ref, aux_ref = ref.moe_forward(weights, x, cfg)
        with torch.no_grad():
            out, aux = _layer(cfg, weights)(_t(x), return_aux=True)
        np.testing.assert_array_equal(aux["kept_slots"].numpy(), aux_ref["kept_slots"], err_msg=str(options))
        assert (~aux_ref["kept_slots"]).sum() > 0, "the case must drop something"
        np.testing.assert_allclose(out.numpy(), out_ref, rtol=1e-4, atol=1e-5, err_msg=str(options))
        np.testing.assert_allclose(aux["routing_weights"].numpy(), aux_ref["routing_weights"], rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_array_equal(aux["tokens_per_expert"].numpy(), aux_ref["tokens_per_expert"])
        np.testing.assert_allclose(aux["load_balance_loss"].item(), aux_ref["load_balance_loss"], rtol=1e-5)


def test_padding_keeps_the_outputs():
    """The padded layout (G*C rows per expert) gives the same outputs up to the GEMMs' row blocking
    (a matmul's rounding may depend on its row count), and the same kept slots."""
    rng = np.random.default_rng(1)
    x = _t(rng.standard_normal((2, 12, 16)))
    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=6, top_k=2, capacity_factor=1.0, expert_kernel="loop")
    weights = init_weights(cfg, seed=1)
    with torch.no_grad():
        plain, a = _layer(cfg, weights)(x, return_aux=True)
        padded, b = _layer(cfg.replace(capacity_pad=True), weights)(x, return_aux=True)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(a["kept_slots"], b["kept_slots"]) and not a["kept_slots"].all()


def test_dropped_everywhere_gets_only_the_shared_expert():
    for shared in (1, 0):
        cfg = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=1, num_shared_experts=shared,
                        expert_capacity=1, capacity_group="batch")
        moe = _layer(cfg, init_weights(cfg, seed=3))
        x = _t(X_DUPLICATES)
        with torch.no_grad():
            out, aux = moe(x, return_aux=True)
            tokens = x.reshape(-1, 8)
            expected = moe.shared_expert(tokens) if shared else torch.zeros_like(tokens)
        np.testing.assert_array_equal(aux["kept_slots"][:, 0].numpy(), [True, False, False, False])
        torch.testing.assert_close(out.reshape(-1, 8)[1:], expected[1:], rtol=0, atol=0)


def test_locked_drop_decision_and_gradients():
    """``kept_slots=`` replaces the choice (the reference's, given here, reproduces its output); the
    gradient of a dropped slot's weight is exactly zero, a kept one's is not."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 16))
    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2, capacity_factor=0.5, score_func="softmax",
                    score_before_experts=False, load_balance_loss="switch", expert_kernel="grouped_mm")
    weights = init_weights(cfg, seed=2)
    locked = np.zeros((16, 2), bool)
    locked[::3] = True  # any decision within the capacity
    out_ref, _ = ref.moe_forward(weights, x, cfg, kept_slots=locked)
    moe = _layer(cfg, weights, torch.float64)
    xt = _t(x, torch.float64).requires_grad_(True)
    out, aux = moe(xt, return_aux=True, kept_slots=torch.from_numpy(locked))
    np.testing.assert_array_equal(aux["kept_slots"].numpy(), locked)
    np.testing.assert_allclose(out.detach().numpy(), out_ref, rtol=1e-12, atol=1e-13)
    aux["routing_weights"].retain_grad()
    ((out * out).sum() + aux["load_balance_loss"]).backward()
    g = aux["routing_weights"].grad.numpy()
    assert (g[~locked] == 0).all() and (g[locked] != 0).all()
    assert torch.isfinite(moe.router.gate.weight.grad).all() and torch.isfinite(xt.grad).all()
    with pytest.raises(ValueError, match="kept_slots given but the layer is dropless"):
        _layer(cfg.replace(capacity_factor=None), weights)(_t(x), kept_slots=torch.from_numpy(locked))
