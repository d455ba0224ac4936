"""Step 6a, capacity and token dropping: the formulas of C, the keep policies (hand-computed tiny
cases, ties at the capacity edge included), the float64 reference's layer semantics, the options'
validation, and the harness's drop finding (``parity.drops``) with ``--lock-routing``."""

from __future__ import annotations

import numpy as np
import pytest

from parity import reference as ref
from parity.backends.reference_backend import ReferenceRunner
from parity.config import MoEConfig, capacity_groups, capacity_per_expert
from parity.harness import Settings, run_parity
from parity.presets import PRESETS
from parity.weights import init_weights
from tests.capacity_cases import EXPECTED_KEPT, IDX, X_DUPLICATES, W, cfg_for, group_case, kept_of


# ------------------------------------------------------------------------------------ C formulas
@pytest.mark.parametrize("rounding, tokens, k, experts, cf, expected", [
    ("megatron", 8, 2, 8, 1.25, 3),    # ceil(16 / 8 * 1.25) = ceil(2.5)
    ("maxtext", 8, 2, 8, 1.25, 2),     # int(max(ceil(2) * 1.25, 1.25)) = int(2.5): ceil, multiply, floor
    ("gshard", 8, 2, 8, 1.25, 3),      # ceil(8 / 8 * 2 * 1.25)
    ("megatron", 7, 1, 3, 0.3, 1),     # ceil(0.7)
    ("maxtext", 2, 1, 8, 1.5, 1),      # int(max(ceil(0.25) * 1.5, 1.5)) = int(1.5)
    ("maxtext", 0, 2, 8, 2.5, 2),      # no tokens: int(max(0, 2.5))
    ("megatron", 0, 2, 8, 2.5, 0),
    # the same exact value 3, but (T*k)/E*cf = 3.0 and T/E*k*cf = 3.0000000000000004 in floats
    ("megatron", 10, 3, 13, 1.3, 3),
    ("gshard", 10, 3, 13, 1.3, 4),
])
def test_capacity_formulas(rounding, tokens, k, experts, cf, expected):
    cfg = MoEConfig(num_experts=experts, top_k=k, capacity_factor=cf, capacity_rounding=rounding)
    assert capacity_per_expert(cfg, tokens) == expected


def test_capacity_minimum_fixed_and_dropless():
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25, capacity_rounding="gshard", capacity_min=4)
    assert capacity_per_expert(cfg, 8) == 4  # max(3, 4)
    assert capacity_per_expert(MoEConfig(expert_capacity=5), 1000) == 5
    assert capacity_per_expert(MoEConfig(expert_capacity=5, capacity_min=7), 3) == 7
    assert capacity_per_expert(MoEConfig(), 8) is None
    assert capacity_groups("sequence", 3, 5) == (3, 5)
    assert capacity_groups("batch", 3, 5) == (1, 15)
    assert capacity_groups("batch", 0, 5) == (0, 0)


@pytest.mark.parametrize("fields, message", [
    ({"capacity_factor": 0.0}, "capacity_factor=0.0 must be a finite number > 0"),
    ({"capacity_factor": float("inf")}, "capacity_factor=inf must be a finite number > 0"),
    ({"expert_capacity": 0}, "expert_capacity=0 must be a positive integer"),
    ({"capacity_factor": 1.0, "expert_capacity": 2}, "both given"),
    ({"capacity_factor": 1.0, "capacity_policy": "random"}, "capacity_policy='random' is not one of"),
    ({"capacity_factor": 1.0, "capacity_rounding": "floor"}, "capacity_rounding='floor' is not one of"),
    ({"capacity_factor": 1.0, "capacity_group": "rank"}, "capacity_group='rank' is not one of"),
    ({"capacity_factor": 1.0, "capacity_stats": "both"}, "capacity_stats='both' is not one of"),
    ({"capacity_factor": 1.0, "capacity_min": -1}, "capacity_min=-1 must be an integer >= 0"),
    ({"capacity_factor": 1.0, "capacity_pad": 1}, "capacity_pad=1 must be True or False"),
    ({"capacity_policy": "position"}, "capacity_policy='position' given but the layer is dropless"),
    ({"capacity_renorm": True}, "capacity_renorm=True given but the layer is dropless"),
])
def test_capacity_options_validated(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(**fields)


def test_numpy_scalars_stored_as_python_numbers():
    cfg = MoEConfig(capacity_factor=np.float32(1.5), capacity_min=np.int64(2))
    assert type(cfg.capacity_factor) is float and type(cfg.capacity_min) is int


# --------------------------------------------------------------------------------- keep policies
@pytest.mark.parametrize("policy", sorted(EXPECTED_KEPT))
def test_keep_policy_hand_computed(policy):
    """4 tokens, top-2, 3 experts, C = 2 (see tests/capacity_cases.py for the worked example)."""
    kept, w, _ = ref.drop_tokens(IDX, W, cfg_for(policy), batch=1)
    np.testing.assert_array_equal(kept, EXPECTED_KEPT[policy])
    np.testing.assert_array_equal(w, np.where(EXPECTED_KEPT[policy], W, 0.0))  # dropped slots weigh 0


def test_probs_tie_at_the_edge_goes_to_the_lower_token():
    """Expert 0 gets 0.7 (token 2), then 0.5 from tokens 1 and 3 for its second place: token 1 wins."""
    w = W.copy()
    w[3] = [0.5, 0.5]
    kept, _, ranks = ref.drop_tokens(IDX, w, cfg_for("probs"), batch=1)
    np.testing.assert_array_equal(kept, [[True, False], [True, True], [True, True], [True, False]])
    assert ranks[1, 0] == 1 and ranks[3, 1] == 2 and ranks[0, 1] == 3  # token 1 before token 3


def test_probs_tie_between_slots_of_one_token_goes_to_the_lower_slot():
    """A locked routing may send both slots of a token to one expert: equal weights -> slot 0 first."""
    idx = np.array([[0, 0], [1, 1]])
    w = np.array([[0.5, 0.5], [0.9, 0.1]])
    kept, _, _ = ref.drop_tokens(idx, w, MoEConfig(num_experts=2, top_k=2, expert_capacity=1), batch=1)
    np.testing.assert_array_equal(kept, [[True, False], [True, False]])


def test_groups_sequence_versus_batch():
    """k=1, E=2, C=1: per sequence each of the two sequences keeps one token of expert 0; over the
    batch only the first token does."""
    idx, w, seq_kept, batch_kept = group_case()
    for group, expected in (("sequence", seq_kept), ("batch", batch_kept)):
        cfg = MoEConfig(num_experts=2, top_k=1, expert_capacity=1, capacity_group=group)
        kept, _, _ = ref.drop_tokens(idx, w, cfg, batch=2)
        np.testing.assert_array_equal(kept[:, 0], expected)


def test_renormalised_survivors():
    cfg = cfg_for("position").replace(capacity_renorm=True, route_scale=2.0)
    kept, w, _ = ref.drop_tokens(IDX, W, cfg, batch=1)
    # token 2 kept only its second slot (0.3) -> 2.0; token 3 only its first (0.45) -> 2.0
    np.testing.assert_allclose(w, [[1.2, 0.8], [1.0, 1.0], [0.0, 2.0], [2.0, 0.0]], rtol=1e-15)
    # token 1 is dropped from both its experts: its weights are exactly 0 (no 0 / 0)
    idx, w = np.array([[0, 1], [0, 1]]), np.array([[0.5, 0.5], [0.5, 0.5]])
    kept, w, _ = ref.drop_tokens(idx, w, MoEConfig(num_experts=2, top_k=2, expert_capacity=1,
                                                   capacity_renorm=True), batch=1)
    np.testing.assert_array_equal(kept, [[True, True], [False, False]])
    np.testing.assert_array_equal(w, [[0.5, 0.5], [0.0, 0.0]])


def test_dropped_everywhere_gets_only_the_shared_expert():
    """Identical tokens, top-1, C = 1 over the batch: token 0 is kept, the others are dropped from
    every expert: their output is exactly the shared expert's (exactly zero without one)."""
    for shared in (1, 0):
        cfg = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=1, num_shared_experts=shared,
                        expert_capacity=1, capacity_group="batch")
        weights = init_weights(cfg, seed=3)
        out, aux = ref.moe_forward(weights, X_DUPLICATES, cfg)
        tokens = X_DUPLICATES.reshape(-1, 8)
        np.testing.assert_array_equal(aux["kept_slots"][:, 0], [True, False, False, False])
        expected = ref.shared_experts(tokens, weights, cfg) if shared else np.zeros_like(tokens)
        np.testing.assert_array_equal(out.reshape(-1, 8)[1:], expected[1:])
        assert np.abs(out.reshape(-1, 8)[0] - expected[0]).max() > 1e-3  # the kept token got its expert
        np.testing.assert_array_equal(aux["tokens_per_expert"].sum(), 1.0)  # "kept" stats


def test_stats_before_or_after_dropping():
    base = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=1, expert_capacity=1, capacity_group="batch",
                     load_balance_loss="switch")
    weights = init_weights(base, seed=3)
    _, kept = ref.moe_forward(weights, X_DUPLICATES, base)
    _, selected = ref.moe_forward(weights, X_DUPLICATES, base.replace(capacity_stats="selected"))
    assert kept["tokens_per_expert"].sum() == 1 and selected["tokens_per_expert"].sum() == 4
    # f_i counts the kept slot only (1 of N*k = 4), the same tokens' P_i
    assert np.isclose(kept["load_balance_loss"], selected["load_balance_loss"] / 4, rtol=1e-12)


def test_zero_tokens():
    cfg = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, capacity_factor=1.0, load_balance_loss="switch")
    out, aux = ref.moe_forward(init_weights(cfg, seed=0), np.zeros((0, 5, 8)), cfg)
    assert out.shape == (0, 5, 8) and aux["kept_slots"].shape == (0, 2) and aux["load_balance_loss"] == 0.0


def test_presets_name_the_four_combinations():
    assert {"megatron-capacity", "maxtext-capacity", "gshard", "switch"} <= set(PRESETS)
    c = {n: PRESETS[n].config for n in ("megatron-capacity", "maxtext-capacity", "gshard", "switch")}
    assert (c["megatron-capacity"].capacity_policy, c["megatron-capacity"].capacity_group) == ("probs", "batch")
    assert (c["maxtext-capacity"].capacity_rounding, c["maxtext-capacity"].capacity_stats) == ("maxtext", "selected")
    assert c["gshard"].capacity_policy == "slot_major" and c["gshard"].capacity_renorm
    assert c["switch"].expert_capacity == 2 and c["switch"].top_k == 1


# ------------------------------------------------------------------------------ harness finding
def _settings(cfg, **kw):
    return Settings(cfg=cfg, batch=2, seq_len=8, grads=False, steps=0, **kw)


def test_harness_reports_a_different_drop_as_its_own_finding():
    """One column keeps by "position" where the config says "probs": same routing, different kept
    slots, margins far above tie_tol -> a FAIL on ``routing/kept_slots``, and those tokens masked."""
    cfg = PRESETS["megatron-capacity"].config.replace(dim=16, hidden_dim=32)
    weights = init_weights(cfg, seed=0)
    good = ReferenceRunner("reference:good")
    bad = ReferenceRunner("reference:bad", config_hook=lambda c: c.replace(capacity_policy="position"))
    report = run_parity(_settings(cfg), weights, [good, bad])
    rows = {c.id: c for c in report.checks}
    assert rows["routing/kept_slots/reference:good~reference"].status == "PASS"
    bad_row = rows["routing/kept_slots/reference:bad~reference"]
    assert bad_row.status == "FAIL" and bad_row.masked_tokens > 0
    assert "kept differently" in bad_row.note and "edge margin" in bad_row.note
    assert rows["routing/selected_experts/reference:bad~reference"].status == "PASS"
    assert "diverged token(s) masked" in rows["forward/out/reference:bad~reference"].note


def test_lock_routing_locks_the_drop_decision():
    cfg = PRESETS["megatron-capacity"].config.replace(dim=16, hidden_dim=32)
    weights = init_weights(cfg, seed=0)
    bad = ReferenceRunner("reference:bad", config_hook=lambda c: c.replace(capacity_policy="position"))
    report = run_parity(_settings(cfg, lock_routing=True), weights, [bad, ReferenceRunner("reference:b")])
    rows = {c.id: c for c in report.checks}
    assert rows["routing/kept_slots/reference:b~reference"].status == "PASS"
    assert rows["routing/kept_slots/reference:bad~reference:b"].status == "PASS"
    assert report.passed


def test_edge_margins_hand_computed():
    from parity.drops import edge_margins

    m = edge_margins(cfg_for("probs"), IDX, W, batch=1)
    # expert 0 keeps 0.7 (token 2) and 0.55 (token 3), drops 0.5 (token 1) first: margin 0.05
    np.testing.assert_allclose(m[[2, 3, 1, 0], [0, 1, 0, 1]], 0.05, rtol=1e-12)
    assert np.isinf(m[0, 0]) and np.isinf(m[1, 1])  # experts 1 and 2 did not overflow
    assert np.isinf(edge_margins(cfg_for("position"), IDX, W, batch=1)).all()
    assert kept_of(IDX, EXPECTED_KEPT["probs"]) == [[1], [2], [0, 1], [0, 2]]
