"""``route_order`` (DESIGN.md steps 2-3): "bias_first" (DeepSeek-V3 / torchtitan) and "scale_first"
(the original PyTorch module), in the float64 reference, moe_torch and moe_jax."""

import numpy as np
import pytest

from parity import reference as R
from parity.config import MoEConfig
from parity.weights import init_weights

torch = pytest.importorskip("torch")
nnx = pytest.importorskip("flax.nnx")
moe_torch = pytest.importorskip("moe_torch")
moe_jax = pytest.importorskip("moe_jax")

ORDERS = ("bias_first", "scale_first")


def test_hand_case_orders_differ():
    """One token, 2 groups of 2 experts, keep 1 group, top-1, route_scale 2, bias 0.3 on expert 2.

    scores = (0.6, 0.1, 0.5, 0.2). bias_first: sel = (0.6, 0.1, 0.8, 0.2): group 1 (max 0.8) wins,
    expert 2. scale_first: groups from 2*scores = (1.2, 0.2, 1.0, 0.4): group 0 wins; sel = (1.2,
    0.2, -inf, -inf): expert 0. Weights: 2 * scores at the index in both orders.
    """
    scores = np.array([[0.6, 0.1, 0.5, 0.2]])
    logits = np.log(scores / (1 - scores))  # sigmoid(logits) == scores
    gate = np.eye(4)
    bias = np.array([0.0, 0.0, 0.3, 0.0])
    base = dict(dim=4, hidden_dim=4, num_experts=4, top_k=1, route_scale=2.0, num_expert_groups=2,
                num_limited_groups=1, use_expert_bias=True)
    got = {o: R.route(logits, gate, MoEConfig(**base, route_order=o), bias) for o in ORDERS}
    assert got["bias_first"]["selected_experts"].tolist() == [[2]]
    assert got["scale_first"]["selected_experts"].tolist() == [[0]]
    np.testing.assert_allclose(got["bias_first"]["routing_weights"], [[1.0]], rtol=1e-12)
    np.testing.assert_allclose(got["scale_first"]["routing_weights"], [[1.2]], rtol=1e-12)
    with pytest.raises(ValueError, match="route_order='first'"):
        MoEConfig(route_order="first")


def _case(order: str, route_norm: bool, group_score: str):
    cfg = MoEConfig(dim=16, hidden_dim=16, num_experts=16, top_k=3, score_func="sigmoid", route_norm=route_norm,
                    route_scale=2.5, num_expert_groups=4, num_limited_groups=2, group_score=group_score,
                    use_expert_bias=True, route_order=order)
    weights = init_weights(cfg, 0)
    weights["expert_bias"] = np.random.default_rng(1).normal(0.0, 0.3, 16).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((4, 32, 16)).astype(np.float32)
    return cfg, weights, x


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
@pytest.mark.parametrize("route_norm", [False, True])
def test_orders_select_alike_in_every_backend_and_differ_from_each_other(route_norm, group_score):
    """float32 selection of torch and JAX == the float64 reference, exactly, in both orders; and with a
    bias and route_scale != 1 the two orders pick different experts for some tokens."""
    selected = {}
    for order in ORDERS:
        cfg, weights, x = _case(order, route_norm, group_score)
        tokens = x.reshape(-1, cfg.dim).astype(np.float64)
        ref = R.route(tokens, weights["router.gate.weight"], cfg, weights["expert_bias"])
        tm = moe_torch.MoE(**cfg.to_kwargs())
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        _, taux = tm(torch.from_numpy(x), return_aux=True)
        jm = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
        moe_jax.load_state_dict(jm, weights)
        _, jaux = jm(x, return_aux=True)
        np.testing.assert_array_equal(taux["selected_experts"].numpy(), ref["selected_experts"], err_msg=order)
        np.testing.assert_array_equal(np.asarray(jaux["selected_experts"]), ref["selected_experts"], err_msg=order)
        np.testing.assert_allclose(taux["routing_weights"].detach().numpy(), ref["routing_weights"], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(jaux["routing_weights"]), ref["routing_weights"], rtol=1e-6)
        selected[order] = np.sort(ref["selected_experts"], -1)
    differ = (selected["bias_first"] != selected["scale_first"]).any(-1).mean()
    assert 0.05 < differ < 1.0, differ


def test_jax_router_mirrors_the_torch_router():
    """Same positional order, the original's 3-tuple call and ``route`` with the same fields."""
    jr = moe_jax.TokenChoiceTopKRouter(16, 8, 2, "softmax", 4, 2, 2.5, rngs=nnx.Rngs(0))
    assert (jr.num_expert_groups, jr.num_limited_groups, jr.route_scale, jr.route_norm, jr.route_order) == \
        (4, 2, 2.5, False, "scale_first")
    tr = moe_torch.TokenChoiceTopKRouter(16, 8, 2, "softmax", 4, 2, 2.5)
    with torch.no_grad():
        tr.gate.weight.copy_(torch.from_numpy(np.asarray(jr.gate[...]).T.copy()))
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    bias = np.random.default_rng(1).normal(0, 0.3, 8).astype(np.float32)
    jw, jidx, jcounts = jr(x, bias)
    tw, tidx, tcounts = tr(torch.from_numpy(x), torch.from_numpy(bias))
    np.testing.assert_array_equal(np.asarray(jidx), tidx.numpy())
    np.testing.assert_array_equal(np.asarray(jcounts), tcounts.numpy())
    np.testing.assert_allclose(np.asarray(jw), tw.detach().numpy(), rtol=1e-6)
    assert moe_jax.RouterOutput._fields == moe_torch.RouterOutput._fields
    assert isinstance(jr.route(x), moe_jax.RouterOutput)


def test_both_moe_constructors_resolve_the_same_defaults():
    """The original-constructor path gives the same config in both backends."""
    for kwargs in (dict(), dict(load_balance_coeff=0.02), dict(top_k=2, router_kwargs={"route_scale": 2.0}),
                   dict(load_balance_coeff=0.02, load_balance_loss=None, use_expert_bias=False)):
        t = moe_torch.MoE(16, 24, 8, **kwargs).config
        j = moe_jax.MoE(16, 24, 8, **kwargs, rngs=nnx.Rngs(0)).config
        assert t.replace(expert_kernel="auto") == j, kwargs
        assert moe_torch.MoE(16, 24, 8, **kwargs).load_balance_coeff == \
            moe_jax.MoE(16, 24, 8, **kwargs, rngs=nnx.Rngs(0)).load_balance_coeff
