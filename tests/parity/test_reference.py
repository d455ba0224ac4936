"""The float64 NumPy reference checked against hand-computed cases and an independent dense form."""

import numpy as np
import pytest

from parity import reference as R
from parity.config import MoEConfig
from tests.cases import CASES, make_case


def test_topk_ties_go_to_the_lower_index():
    values = np.array([[0.5, 0.9, 0.9, 0.1, 0.9]])
    assert R.topk_lower_index(values, 3).tolist() == [[1, 2, 4]]
    assert R.topk_lower_index(np.zeros((1, 4)), 2).tolist() == [[0, 1]]


def test_group_limited_mask_max_and_top2_sum():
    # 2 groups of 3: group 0 has the single largest entry, group 1 the largest pair.
    sel = np.array([[0.9, 0.0, 0.0, 0.5, 0.5, 0.0]])
    keep_max = R.group_limited_mask(sel, 2, 1, "max")
    keep_top2 = R.group_limited_mask(sel, 2, 1, "top2_sum")
    assert keep_max.tolist() == [[True, True, True, False, False, False]]
    assert keep_top2.tolist() == [[False, False, False, True, True, True]]


@pytest.mark.parametrize("eps, mode", [(1e-20, "add"), (0.0, "add"), (1e-20, "clamp"), (1e-12, "clamp")])
def test_route_norm_eps_and_mode_reference_torch_and_jax(eps, mode):
    """DESIGN.md step 5: ``w / (sum + route_norm_eps)`` ("add") or ``w / max(sum, route_norm_eps)``
    ("clamp", Ernie 4.5). Sigmoid scores of logits near -46 (~1e-20 each) sum to about the epsilon, so
    every (eps, mode) gives its own total weight, computed here from the logits; reference, moe_torch
    and moe_jax agree on each (default 1e-20 / "add" = DeepSeek-V3; 0.0 = MiniMax-M2's bare sum)."""
    x = np.array([[1.0, 0.0], [1.0, 0.5]])
    gate = np.array([[-46.0, 0.0], [-46.5, 0.0], [-47.0, 0.0], [-48.0, 1.0]])
    cfg = MoEConfig(dim=2, hidden_dim=4, num_experts=4, top_k=2, route_norm=True, route_norm_eps=eps,
                    route_norm_mode=mode)
    w = R.route(x, gate, cfg)["routing_weights"]
    total = np.sort(1.0 / (1.0 + np.exp(-(x @ gate.T))), -1)[:, -2:].sum(-1)
    want = total / (np.maximum(total, eps) if mode == "clamp" else total + eps)
    np.testing.assert_allclose(w.sum(-1), want, rtol=1e-12)
    for backend in ("torch", "jax"):
        got = _backend_route_weights(backend, cfg, gate, x)
        np.testing.assert_allclose(got, w, rtol=1e-5, err_msg=f"{backend} eps={eps} mode={mode}")


def test_route_norm_defaults_are_design_step_5():
    cfg = MoEConfig()
    assert (cfg.route_norm_eps, cfg.route_norm_mode) == (1e-20, "add")


def _backend_route_weights(backend, cfg, gate, x):
    if backend == "torch":
        torch = pytest.importorskip("torch")
        import moe_torch

        r = moe_torch.TokenChoiceTopKRouter(cfg.dim, cfg.num_experts, cfg.top_k, cfg.score_func, route_norm=True,
                                            route_norm_eps=cfg.route_norm_eps, route_norm_mode=cfg.route_norm_mode)
        with torch.no_grad():
            r.gate.weight.copy_(torch.from_numpy(gate))
            return r.route(torch.from_numpy(x).float()).routing_weights.numpy()
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from moe_jax.router import route

    return np.asarray(route(jnp.asarray(x, jnp.float32), jnp.asarray(gate.T, jnp.float32), top_k=cfg.top_k,
                            score_func=cfg.score_func, route_norm=True, route_scale=1.0,
                            route_norm_eps=cfg.route_norm_eps, route_norm_mode=cfg.route_norm_mode).routing_weights)


def test_route_bias_steers_selection_but_not_weights():
    cfg = MoEConfig(dim=2, hidden_dim=4, num_experts=4, top_k=1, use_expert_bias=True)
    gate = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
    x = np.array([[2.0, 1.0]])
    bias = np.array([0.0, 0.0, 0.0, 10.0])
    aux = R.route(x, gate, cfg, bias)
    assert aux["selected_experts"].tolist() == [[3]]
    np.testing.assert_allclose(aux["routing_weights"], R.sigmoid(np.array([[-2.0]])))


def test_route_norm_and_scale():
    cfg = MoEConfig(dim=2, hidden_dim=4, num_experts=4, top_k=2, score_func="softmax",
                    route_norm=True, route_scale=2.5)
    rng = np.random.default_rng(0)
    aux = R.route(rng.standard_normal((5, 2)), rng.standard_normal((4, 2)), cfg)
    np.testing.assert_allclose(aux["routing_weights"].sum(-1), 2.5, rtol=1e-12)
    assert aux["tokens_per_expert"].sum() == 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_dense_form(name):
    """Every expert on every token, weighted by a dense [N, E] routing matrix: the same answer."""
    cfg = CASES[name]
    weights, x = make_case(cfg)
    out, aux = R.moe_forward(weights, x, cfg)
    tokens = x.reshape(-1, cfg.dim).astype(np.float64)
    dense_w = np.zeros((tokens.shape[0], cfg.num_experts))
    np.put_along_axis(dense_w, aux["selected_experts"], aux["routing_weights"], axis=-1)
    expected = np.zeros_like(tokens)
    for e in range(cfg.num_experts):
        w1, w2, w3 = (weights[f"experts.{n}"][e].astype(np.float64) for n in ("w1", "w2", "w3"))
        we = dense_w[:, e:e + 1]
        if cfg.score_before_experts:
            expected += np.where(we > 0, R.feed_forward(tokens * we, w1, w2, w3), 0.0)
        else:
            expected += we * R.feed_forward(tokens, w1, w2, w3)
    if cfg.num_shared_experts:
        expected += R.feed_forward(tokens, *(weights[f"shared_expert.{n}.weight"] for n in ("w1", "w2", "w3")))
    np.testing.assert_allclose(out.reshape(-1, cfg.dim), expected, rtol=1e-12, atol=1e-12)


def test_switch_loss_is_coeff_when_balanced_and_larger_when_collapsed():
    e, k, n = 4, 1, 8
    idx = np.arange(n).reshape(n, 1) % e
    uniform = np.full((n, e), 1.0 / e)
    assert R.load_balance_loss(uniform, idx, e, 0.01, "switch") == pytest.approx(0.01)
    collapsed_scores = np.tile([0.97, 0.01, 0.01, 0.01], (n, 1))
    collapsed = R.load_balance_loss(collapsed_scores, np.zeros((n, k), int), e, 0.01, "switch")
    assert collapsed == pytest.approx(0.01 * e * 0.97)


def test_sequence_loss_averages_per_sequence_switch_losses():
    rng = np.random.default_rng(3)
    scores = R.softmax(rng.standard_normal((12, 6)))
    idx = R.topk_lower_index(scores, 2)
    per_seq = [R.load_balance_loss(scores[i * 4:(i + 1) * 4], idx[i * 4:(i + 1) * 4], 6, 0.1, "switch") for i in range(3)]
    assert R.load_balance_loss(scores, idx, 6, 0.1, "sequence", batch=3) == pytest.approx(np.mean(per_seq))


def test_load_balance_loss_is_not_the_constant_of_the_original_module():
    """The original took a softmax over the k selected scores: the loss was always num_experts."""
    cfg = CASES["switch_loss"]
    values = []
    for seed in range(3):
        weights, x = make_case(cfg, seed=seed)
        values.append(R.moe_forward(weights, x, cfg)[1]["load_balance_loss"])
    assert len(set(np.round(values, 12))) == 3
    assert all(v != pytest.approx(cfg.load_balance_coeff * cfg.num_experts) for v in values)


def test_router_z_loss():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    expected = 0.5 * ((np.log(2.0)) ** 2 + (np.log(4.0)) ** 2)
    assert R.router_z_loss(logits, 1.0) == pytest.approx(expected)


def test_update_expert_bias_sign_rule_and_center():
    bias = np.zeros(4, np.float32)
    counts = np.array([10, 0, 5, 5], np.float32)  # mean 5
    new = R.update_expert_bias(bias, counts, 1e-3)
    assert new.dtype == np.float32
    np.testing.assert_array_equal(new, np.float32([-1e-3, 1e-3, 0, 0]))
    centred = R.update_expert_bias(bias, np.array([10, 0, 0, 0], np.float32), 1e-3, center=True)
    assert abs(float(centred.sum())) < 1e-9
    assert centred[0] < 0 < centred[1]


def test_bad_input_shape():
    cfg = CASES["default_sigmoid_top1"]
    weights, x = make_case(cfg)
    with pytest.raises(ValueError, match=r"expected \[batch, seq_len, dim=16\]"):
        R.moe_forward(weights, x[..., :5], cfg)
