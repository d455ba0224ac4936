"""moe_torch as a drop-in for the original PyTorch module (issue 13).

Its docstring examples, its signatures (positional order), its outputs (the router's 3-tuple,
``out._load_balance_loss``), its routing order ("scale_first"), its live attributes, and what later
versions of it added (``num_recomputations``, counts summed over several groups, the aux-loss auto
scaler, the sequence loss over context-parallel ranks). The original's source is the specification:
``../shared/original/moe_module.txt``.
"""

from __future__ import annotations

import doctest
import inspect
import json
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moe_torch
from moe_torch import (
    FeedForward,
    GroupedExperts,
    MoE,
    MoEAuxLossAutoScaler,
    RouterOutput,
    TokenChoiceTopKRouter,
    update_expert_bias,
)
from parity import reference
from parity.config import MoEConfig

# ------------------------------------------------------------------------ the original's docstring examples
# Verbatim from the original module's docstrings (the ``Example::`` blocks).
ORIGINAL_EXAMPLES = {
    "FeedForward": """
>>> ff = FeedForward(dim=256, hidden_dim=512)
>>> out = ff(torch.randn(4, 16, 256))
>>> out.shape
torch.Size([4, 16, 256])
""",
    "GroupedExperts": """
>>> experts = GroupedExperts(dim=8, hidden_dim=16, num_experts=4)
>>> x = torch.randn(10, 8)
>>> counts = torch.tensor([3, 2, 4, 1])
>>> out = experts(x, counts)
>>> out.shape
torch.Size([10, 8])
""",
    "TokenChoiceTopKRouter": """
>>> router = TokenChoiceTopKRouter(dim=64, num_experts=8, top_k=2)
>>> scores, indices, counts = router(torch.randn(32, 64))
>>> scores.shape, indices.shape, counts.shape
(torch.Size([32, 2]), torch.Size([32, 2]), torch.Size([8]))
""",
    "MoE": """
>>> moe = MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2)
>>> out = moe(torch.randn(2, 16, 64))
>>> out.shape
torch.Size([2, 16, 64])
""",
    "update_expert_bias": """
>>> # After optimizer.step():
>>> update_expert_bias(moe_layer, lr=1e-3)
""",
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_EXAMPLES))
def test_original_docstring_example(name):
    globs = {"torch": torch, "moe_layer": MoE(dim=64, hidden_dim=128, num_experts=8), **vars(moe_torch)}
    test = doctest.DocTestParser().get_doctest(ORIGINAL_EXAMPLES[name], globs, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert runner.summarize(verbose=False).attempted >= 1


@pytest.mark.parametrize("obj", [FeedForward, GroupedExperts, TokenChoiceTopKRouter, MoE])
def test_our_docstring_examples(obj):
    """Our docstrings carry the same examples; they run too."""
    tests = doctest.DocTestFinder().find(obj, globs={"torch": torch, **vars(moe_torch)})
    runner = doctest.DocTestRunner()
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).attempted >= 3
    assert runner.summarize(verbose=False).failed == 0


# ---------------------------------------------------------------------------------------- signatures
def test_signatures_keep_the_original_positional_order():
    def positional(cls):
        params = list(inspect.signature(cls).parameters.values())
        return [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]

    e = inspect.Parameter.empty
    assert positional(FeedForward) == [("dim", e), ("hidden_dim", e), ("bias", False)]
    assert positional(GroupedExperts) == [("dim", e), ("hidden_dim", e), ("num_experts", e), ("use_grouped_mm", False)]
    assert positional(TokenChoiceTopKRouter) == [
        ("dim", e), ("num_experts", e), ("top_k", 1), ("score_func", "sigmoid"), ("num_expert_groups", None),
        ("num_limited_groups", None), ("route_scale", 1.0)]
    assert positional(MoE) == [
        ("dim", e), ("hidden_dim", e), ("num_experts", e), ("top_k", 1), ("score_before_experts", True),
        ("load_balance_coeff", None), ("shared_expert", None), ("router_kwargs", None), ("use_grouped_mm", False)]
    assert inspect.signature(update_expert_bias).parameters["lr"].default == 1e-3


def test_feed_forward_bias():
    torch.manual_seed(0)
    ff = FeedForward(8, 16, True)
    assert all(getattr(ff, n).bias is not None for n in ("w1", "w2", "w3"))
    assert FeedForward(8, 16).w1.bias is None
    x = torch.randn(3, 8)
    want = ff.w2(F.silu(ff.w1(x)) * ff.w3(x))  # the original's formula, through nn.Linear
    torch.testing.assert_close(ff(x), want, rtol=0, atol=0)
    with torch.no_grad():
        ff.w2.bias.fill_(1.0)
    assert not torch.equal(ff(x), want)  # the bias is used
    ff.init_weights()
    assert not ff.w2.bias.any()
    with pytest.raises(ValueError, match="bias='yes'"):
        FeedForward(8, 16, "yes")


def test_grouped_experts_use_grouped_mm_positional():
    torch.manual_seed(0)
    grouped = GroupedExperts(8, 16, 4, True)
    assert grouped.expert_kernel == "grouped_mm" and grouped.use_grouped_mm
    loop = GroupedExperts(8, 16, 4)
    assert loop.expert_kernel == "loop" and not loop.use_grouped_mm
    loop.load_state_dict(grouped.state_dict())
    x, counts = torch.randn(10, 8), torch.tensor([3, 2, 4, 1])
    torch.testing.assert_close(grouped(x, counts), loop(x, counts))
    assert GroupedExperts(8, 16, 4, expert_kernel="npu").expert_kernel == "npu"  # the keyword still works
    with pytest.raises(ValueError, match="use_grouped_mm='grouped_mm' must be True or False"):
        GroupedExperts(8, 16, 4, "grouped_mm")
    with pytest.raises(ValueError, match="contradicts expert_kernel='loop'"):
        GroupedExperts(8, 16, 4, True, expert_kernel="loop")


def test_router_positional_arguments_are_the_originals():
    r = TokenChoiceTopKRouter(16, 8, 2, "softmax", 4, 2, 2.5)
    assert (r.top_k, r.score_func, r.num_expert_groups, r.num_limited_groups, r.route_scale) == \
        (2, "softmax", 4, 2, 2.5)
    assert r.route_norm is False and r.route_order == "scale_first"  # 5th positional is not route_norm
    with pytest.raises(TypeError):
        TokenChoiceTopKRouter(16, 8, 2, "softmax", None, None, 1.0, True)  # route_norm is keyword-only


def test_moe_positional_arguments_are_the_originals():
    shared = FeedForward(16, 32)
    moe = MoE(16, 24, 8, 2, False, 0.01, shared, {"score_func": "softmax"}, True)
    assert (moe.num_experts, moe.top_k, moe.score_before_experts, moe.load_balance_coeff) == (8, 2, False, 0.01)
    assert moe.shared_expert is shared and moe.router.score_func == "softmax"
    assert moe.expert_kernel == "grouped_mm" and moe.use_grouped_mm
    assert moe.load_balance_loss == "switch" and moe.use_expert_bias and moe.route_order == "scale_first"


def test_config_path_builds_exactly_the_config():
    """``MoE(**cfg.to_kwargs())``: every field explicit, every field wins (MoEConfig's own defaults)."""
    for cfg in (MoEConfig(), MoEConfig(load_balance_coeff=0.5), MoEConfig(use_expert_bias=False, route_scale=2.0),
                MoEConfig(top_k=2, load_balance_loss="sequence", route_order="bias_first", expert_kernel="auto")):
        assert MoE(**cfg.to_kwargs()).config == cfg
    assert MoEConfig().use_expert_bias is False and MoEConfig().route_order == "bias_first"


# ------------------------------------------------------------------------------------------ router
def test_router_returns_the_original_triple_and_route_the_rest():
    torch.manual_seed(0)
    r = TokenChoiceTopKRouter(16, 8, 3)
    x = torch.randn(20, 16)
    bias = torch.linspace(-0.2, 0.2, 8)
    top_scores, selected, counts = r(x, bias)
    full = r.route(x, bias)
    assert isinstance(full, RouterOutput)
    assert full._fields == ("router_logits", "scores", "selected_experts", "routing_weights")
    assert selected.dtype == torch.int64 and counts.dtype == torch.int64 and counts.shape == (8,)
    assert torch.equal(selected, full.selected_experts) and torch.equal(top_scores, full.routing_weights)
    assert torch.equal(counts, torch.bincount(selected.flatten(), minlength=8)) and int(counts.sum()) == 60
    assert top_scores.requires_grad  # the routing weights train the gate


def original_router(r: TokenChoiceTopKRouter, x: torch.Tensor, expert_bias: torch.Tensor | None):
    """The original module's forward, written from its specification (moe_module.txt lines 374-402)."""
    scores = r.gate(x).float()
    scores = torch.sigmoid(scores) if r.score_func == "sigmoid" else F.softmax(scores, dim=-1)
    if r.route_scale != 1.0:
        scores = scores * r.route_scale
    for_topk = scores
    if r.num_expert_groups is not None:
        n, e = scores.shape
        gscore = scores.view(n, r.num_expert_groups, -1).max(dim=-1).values
        _, groups = gscore.topk(r.num_limited_groups, dim=-1)
        mask = scores.new_zeros(n, r.num_expert_groups).scatter_(1, groups, 1.0)
        mask = mask.unsqueeze(-1).expand(n, r.num_expert_groups, e // r.num_expert_groups).reshape(n, e)
        for_topk = scores.masked_fill(mask == 0, float("-inf"))
    with_bias = for_topk + expert_bias.float() if expert_bias is not None else for_topk
    _, selected = with_bias.topk(r.top_k, dim=-1)
    return scores.gather(1, selected), selected


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("groups", [None, (4, 2)])
def test_scale_first_is_the_original_routing_bit_for_bit(score_func, groups):
    """Selection and weights of the original (weights = scaled scores gathered) == ours, bit for bit."""
    torch.manual_seed(1)
    ng, nl = groups or (None, None)
    r = TokenChoiceTopKRouter(16, 8, 2, score_func, ng, nl, 2.5)
    x = torch.randn(64, 16)
    bias = torch.randn(8) * 0.3
    want_w, want_idx = original_router(r, x, bias)
    got_w, got_idx, _ = r(x, bias)
    assert torch.equal(got_idx, want_idx)
    assert torch.equal(got_w, want_w)  # scores.gather * scale == (scores * scale).gather in float32


def test_route_orders_pick_different_experts_with_bias_and_scale():
    torch.manual_seed(2)
    first = TokenChoiceTopKRouter(16, 8, 2, "sigmoid", 4, 2, 2.5)
    other = TokenChoiceTopKRouter(16, 8, 2, "sigmoid", 4, 2, 2.5, route_order="bias_first")
    other.load_state_dict(first.state_dict())
    x, bias = torch.randn(256, 16), torch.randn(8) * 0.3
    a, b = first.route(x, bias), other.route(x, bias)
    differ = (a.selected_experts.sort(-1).values != b.selected_experts.sort(-1).values).any(-1)
    assert 0.05 < differ.float().mean() < 1.0
    no_bias = first.route(x).selected_experts, other.route(x).selected_experts
    assert torch.equal(*no_bias)  # without a bias the order does not matter


# -------------------------------------------------------------------------------- balance loss, bias
def test_load_balance_coeff_none_means_no_loss():
    moe = MoE(16, 24, 8, 2)
    out, aux = moe(torch.randn(2, 4, 16), return_aux=True)
    assert not hasattr(out, "_load_balance_loss") and "load_balance_loss" not in aux
    assert moe.load_balance_coeff is None and moe.load_balance_loss is None


def test_load_balance_coeff_number_attaches_the_switch_loss():
    torch.manual_seed(0)
    moe = MoE(16, 24, 8, 2, True, 0.01)
    x = torch.randn(2, 4, 16)
    out, aux = moe(x, return_aux=True)
    loss = out._load_balance_loss
    assert loss.shape == () and loss.requires_grad and loss is aux["load_balance_loss"]
    assert moe(x)._load_balance_loss.requires_grad  # without return_aux too
    want = reference.load_balance_loss(aux["scores"].detach().double().numpy(), aux["selected_experts"].numpy(),
                                       8, 0.01, "switch")
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0  # not the original's constant loss


def test_expert_bias_steers_selection_under_the_original_constructor():
    """The original always adds expert_bias; update_expert_bias therefore changes the routing."""
    torch.manual_seed(0)
    moe = MoE(16, 24, 4)
    x = torch.randn(2, 8, 16)
    before = moe(x, return_aux=True)[1]["selected_experts"]
    counts = torch.bincount(before.flatten(), minlength=4)
    for _ in range(200):
        moe.tokens_per_expert.copy_(counts.float())
        update_expert_bias(moe, lr=0.01)
    after = moe(x, return_aux=True)[1]["selected_experts"]
    assert not torch.equal(before, after)
    assert moe.expert_bias.abs().max() > 0


def test_update_expert_bias_default_lr():
    moe = MoE(8, 8, 4)
    moe.tokens_per_expert.copy_(torch.tensor([5.0, 0, 1, 2]))
    update_expert_bias(moe)
    np.testing.assert_array_equal(moe.expert_bias.numpy(),
                                  reference.update_expert_bias(np.zeros(4), np.array([5.0, 0, 1, 2]), 1e-3))


# ----------------------------------------------------------------------------------------- attributes
def _twin(moe: MoE, **changes) -> MoE:
    """A fresh MoE built with ``changes`` and the same weights and buffers."""
    twin = MoE(**moe.config.to_kwargs(**changes))
    twin.load_state_dict(moe.state_dict())
    return twin


@pytest.mark.parametrize("name, value", [
    ("top_k", 3), ("score_before_experts", False), ("score_func", "softmax"), ("route_scale", 2.5),
    ("route_norm", True), ("use_expert_bias", False), ("route_order", "bias_first"), ("group_score", "top2_sum"),
    ("router_z_loss_coeff", 0.1), ("load_balance_loss", "sequence"),
])
def test_assigned_attribute_takes_effect(name, value):
    torch.manual_seed(0)
    moe = MoE(16, 24, 8, 2, num_expert_groups=4, num_limited_groups=2, load_balance_coeff=0.01)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(2, 8, 16)
    before = moe.eval()(x, return_aux=True)
    twin = _twin(moe, **{name: value}).eval()
    setattr(moe, name, value)
    assert getattr(moe, name) == value and getattr(moe.config, name) == value
    got, want = moe(x, return_aux=True), twin(x, return_aux=True)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert sorted(got[1]) == sorted(want[1])
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], rtol=0, atol=0)
    changed = not torch.equal(before[0], got[0]) or sorted(before[1]) != sorted(got[1]) or any(
        not torch.equal(before[1][k], got[1][k]) for k in got[1])
    assert changed, f"assigning {name}={value!r} changed nothing"


def test_load_balance_coeff_and_use_grouped_mm_attributes():
    moe = MoE(16, 24, 8, 2)
    x = torch.randn(2, 4, 16)
    moe.load_balance_coeff = 0.1  # the original's switch: a number turns the loss on
    assert moe.load_balance_loss == "switch" and moe.config.load_balance_coeff == 0.1
    np.testing.assert_allclose(moe(x)._load_balance_loss.item() / 0.1,
                               _twin(moe, load_balance_coeff=1.0)(x)._load_balance_loss.item(), rtol=1e-6)
    moe.load_balance_coeff = None
    assert moe.load_balance_loss is None and not hasattr(moe(x), "_load_balance_loss")

def test_kernel_attributes_take_effect(monkeypatch):
    """``use_grouped_mm`` / ``expert_kernel`` assigned: the next forward runs that kernel."""
    from moe_torch import kernels

    ran = []
    for name in ("loop", "grouped_mm"):
        fn = kernels.KERNELS[name]
        monkeypatch.setitem(kernels.KERNELS, name, lambda *a, _fn=fn, _name=name: ran.append(_name) or _fn(*a))
    moe = MoE(16, 24, 8, 2)
    x = torch.randn(2, 4, 16)
    moe(x)
    moe.use_grouped_mm = True
    assert moe.expert_kernel == "grouped_mm" and moe.experts.use_grouped_mm
    moe(x)
    moe.use_grouped_mm = False
    assert moe.experts.expert_kernel == "loop" and not moe.use_grouped_mm
    moe(x)
    moe.expert_kernel = "grouped_mm"
    moe(x)
    assert ran == ["loop", "grouped_mm", "loop", "grouped_mm"]


def test_router_group_attributes_take_effect_together():
    torch.manual_seed(0)
    r = TokenChoiceTopKRouter(16, 8, 2)
    x, bias = torch.randn(64, 16), torch.randn(8)
    with pytest.raises(ValueError, match=r"num_limited_groups must be set .*router.configure"):
        r.num_expert_groups = 4
    assert r.num_expert_groups is None  # nothing changed
    r.configure(num_expert_groups=4, num_limited_groups=1)
    twin = TokenChoiceTopKRouter(16, 8, 2, "sigmoid", 4, 1)
    twin.load_state_dict(r.state_dict())
    assert torch.equal(r(x, bias)[1], twin(x, bias)[1])
    r.num_limited_groups = 2
    assert r.num_limited_groups == 2
    with pytest.raises(ValueError, match="unknown routing option"):
        r.configure(topk=2)


@pytest.mark.parametrize("target, name, value, match", [
    ("moe", "top_k", 9, "top_k=9 exceeds num_experts=8"),
    ("moe", "score_before_experts", "no", "score_before_experts='no' must be True or False"),
    ("moe", "load_balance_coeff", -1.0, "load_balance_coeff=-1.0"),
    ("moe", "load_balance_loss", "aux", "load_balance_loss='aux'"),
    ("moe", "use_grouped_mm", "yes", "use_grouped_mm='yes'"),
    ("moe", "expert_kernel", "ragged_dot", "expert_kernel='ragged_dot'"),
    ("moe", "route_order", "random", "route_order='random'"),
    ("router", "score_func", "relu", "score_func='relu'"),
    ("router", "route_scale", 0.0, "route_scale=0.0"),
    ("router", "num_limited_groups", 2, "needs num_expert_groups"),
    ("router", "route_norm", 1, "route_norm=1 must be True or False"),
])
def test_bad_assignment_is_refused(target, name, value, match):
    moe = MoE(16, 24, 8, 2)
    obj = moe if target == "moe" else moe.router
    before = moe.config
    with pytest.raises(ValueError, match=match):
        setattr(obj, name, value)
    assert moe.config == before


@pytest.mark.parametrize("target, name", [("moe", "num_experts"), ("moe", "dim"), ("moe", "hidden_dim"),
                                          ("moe", "num_shared_experts"), ("router", "num_experts"),
                                          ("experts", "num_experts")])
def test_sizes_refuse_assignment(target, name):
    moe = MoE(16, 24, 8, 2)
    obj = {"moe": moe, "router": moe.router, "experts": moe.experts}[target]
    with pytest.raises(AttributeError, match="fixed by the"):
        setattr(obj, name, 4)


# ------------------------------------------------------------------------------ what later versions added
def test_num_recomputations_under_activation_checkpointing():
    """A checkpointed layer runs its forward again in backward: its counts double; dividing by
    ``num_recomputations=2`` gives the counts (and the bias) of one pass."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    moe = MoE(16, 24, 8, 2)
    x = torch.randn(2, 8, 16, requires_grad=True)
    once = moe(x, return_aux=True)[1]["tokens_per_expert"]
    moe.tokens_per_expert.zero_()
    checkpoint(moe, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(moe.tokens_per_expert, 2 * once)
    update_expert_bias(moe, 0.01, num_recomputations=2)
    np.testing.assert_array_equal(moe.expert_bias.numpy(),
                                  reference.update_expert_bias(np.zeros(8), once.numpy(), 0.01))
    assert not moe.tokens_per_expert.any()
    moe.tokens_per_expert.copy_(torch.tensor([3.0, 1, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="not a multiple of num_recomputations=2"):
        update_expert_bias(moe, num_recomputations=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_recomputations="):
            update_expert_bias(moe, num_recomputations=bad)


@pytest.fixture
def fresh_scale():
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


@pytest.mark.parametrize("scale", [None, 0.25])
def test_aux_loss_auto_scaler_injects_the_gradient(fresh_scale, scale):
    """Backward through ``apply(out, aux)`` == backward of ``out.sum() + scale * aux``; the value is ``out``."""
    torch.manual_seed(0)
    moe = MoE(16, 24, 8, 2, True, 0.01)
    twin = _twin(moe)
    x = torch.randn(2, 4, 16)
    if scale is not None:
        MoEAuxLossAutoScaler.set_loss_scale(scale)
    out = moe(x)
    y = MoEAuxLossAutoScaler.apply(out, out._load_balance_loss)
    torch.testing.assert_close(y, out, rtol=0, atol=0)
    y.sum().backward()
    ref_out = twin(x)
    (ref_out.sum() + (1.0 if scale is None else scale) * ref_out._load_balance_loss).backward()
    for (name, p), q in zip(moe.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    plain = _twin(moe)
    plain(x).sum().backward()
    assert not torch.allclose(plain.router.gate.weight.grad, moe.router.gate.weight.grad)  # it did inject


def test_aux_loss_auto_scaler_scale_updates_in_place(fresh_scale):
    MoEAuxLossAutoScaler.set_loss_scale(0.5)
    held = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.1))
    assert MoEAuxLossAutoScaler.main_loss_backward_scale is held and float(held) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="must be one finite number"):
        MoEAuxLossAutoScaler.set_loss_scale(float("nan"))


@pytest.fixture(scope="module")
def gloo_results():
    from parity.mesh_torch import spawn

    with tempfile.TemporaryDirectory(prefix="moe_original_api_") as tmp:
        spawn("tests.torch.original_api_workers:all_checks", 4, tmp, timeout_s=240)
        out = {}
        for kind in ("bias", "seq"):
            out[kind] = []
            for r in range(4):
                with open(os.path.join(tmp, f"{kind}.rank{r}.json")) as f:
                    out[kind].append(json.load(f))
    return out


@pytest.mark.distributed
def test_update_expert_bias_over_several_groups(gloo_results):
    ranks = gloo_results["bias"]
    total = np.sum([r["counts"] for r in ranks], axis=0)
    want = reference.update_expert_bias(np.zeros(4), total, 0.125)
    for r in ranks:
        for name in ("tp_cp_dp", "cp_dp"):
            np.testing.assert_array_equal(np.float32(r[name]), want, err_msg=name)
            assert r[f"{name}_zeroed"]
        dp_total = np.sum([ranks[q]["counts"] for q in r["dp_ranks"]], axis=0)
        np.testing.assert_array_equal(np.float32(r["dp_only"]), reference.update_expert_bias(np.zeros(4), dp_total, 0.125))
        assert len(r["dp_ranks"]) == 2
    assert not np.array_equal(ranks[0]["dp_only"], ranks[0]["cp_dp"])  # the second group mattered


@pytest.mark.distributed
def test_sequence_loss_over_context_parallel_ranks(gloo_results):
    ranks = gloo_results["seq"]
    for r in ranks:
        assert r["loss"] == pytest.approx(r["want"], rel=1e-6)
        assert abs(r["local_loss"] - r["want"]) > 1e-6  # one half of the sequences alone gives another loss
    # each cp rank's backward holds its own tokens' share: the two shares sum to the whole gradient
    for group in ((0, 2), (1, 3)):  # ranks with the same dp index form a cp group of the (cp, dp) mesh
        assert sorted(ranks[q]["cp_rank"] for q in group) == [0, 1]
        summed = np.sum([ranks[q]["grad"] for q in group], axis=0)
        np.testing.assert_allclose(summed, ranks[group[0]]["want_grad"], rtol=1e-5, atol=1e-9)
