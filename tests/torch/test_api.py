"""Constructor (MoEConfig keywords and the original module's), bad inputs, DTensor, lazy torch_npu."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_torch import FeedForward, MoE
from tests.cases import CASES, make_case
from tests.torch.conftest import build_moe

CFG = CASES["shared_expert"]


def test_canonical_names_round_trip():
    weights, _ = make_case(CFG)
    moe = build_moe(CFG, weights)
    sd = moe.state_dict()
    assert set(sd) == set(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(sd[k].numpy(), v)


@pytest.mark.parametrize("shape", [(2, 16), (2, 5, 7), (1, 2, 5, 16)])
def test_bad_rank_or_dim(shape):
    moe = MoE(**CFG.to_kwargs())
    with pytest.raises(ValueError, match=r"x has shape .*expected \[batch, seq_len, dim=16\]"):
        moe(torch.randn(*shape))


def test_dtype_mismatch():
    moe = MoE(**CFG.to_kwargs())
    with pytest.raises(TypeError, match="torch.bfloat16.*torch.float32"):
        moe(torch.randn(2, 3, 16).bfloat16())


@pytest.mark.parametrize("bad, match", [
    (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
    (dict(num_expert_groups=3, num_limited_groups=1), "num_expert_groups=3 does not divide"),
    (dict(num_expert_groups=4, num_limited_groups=5), "num_limited_groups=5 exceeds"),
    (dict(score_func="relu"), "score_func='relu'"),
    (dict(group_score="mean"), "group_score='mean'"),
    (dict(dim=0), "dim=0"),
    (dict(load_balance_loss="aux"), "load_balance_loss='aux'"),
    (dict(expert_kernel="bogus"), "expert_kernel='bogus'"),
    (dict(expert_kernel="ragged_dot"), r"expert_kernel='ragged_dot' is not a moe_torch kernel.*'grouped_mm'"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        MoE(**CFG.to_kwargs(**bad))


def test_bad_selected_experts():
    moe = MoE(**CFG.to_kwargs())
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=r"selected_experts has shape \(6, 1\); expected \[num_tokens=6, top_k=2\]"):
        moe(x, selected_experts=torch.zeros(6, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected expert indices in \[0, 7\]"):
        moe(x, selected_experts=torch.full((6, 2), 8))
    with pytest.raises(TypeError, match="integer tensor"):
        moe(x, selected_experts=torch.zeros(6, 2))


def test_original_constructor_keywords():
    shared = FeedForward(16, 32)
    moe = MoE(dim=16, hidden_dim=24, num_experts=8, router_kwargs={"top_k": 2, "score_func": "softmax"},
              shared_expert=shared, use_grouped_mm=True)
    assert moe.router.top_k == 2 and moe.router.score_func == "softmax"
    assert moe.shared_expert is shared and moe.experts.expert_kernel == "grouped_mm"
    assert MoE(dim=16, hidden_dim=24, num_experts=8, use_grouped_mm=False).experts.expert_kernel == "loop"
    out = moe(torch.randn(2, 3, 16))
    assert out.shape == (2, 3, 16)
    with pytest.raises(ValueError, match="router_kwargs has unknown key"):
        MoE(dim=16, hidden_dim=24, num_experts=8, router_kwargs={"topk": 2})
    with pytest.raises(ValueError, match="contradicts expert_kernel='loop'"):
        MoE(dim=16, hidden_dim=24, num_experts=8, use_grouped_mm=True, expert_kernel="loop")
    # the original's True picks the NPU kernel on an NPU: a grouped kernel agrees with it
    assert MoE(16, 24, 8, use_grouped_mm=True, expert_kernel="npu").expert_kernel == "npu"
    with pytest.raises(ValueError, match="num_shared_experts=1"):
        MoE(dim=16, hidden_dim=24, num_experts=8, num_shared_experts=1, shared_expert=shared)
    with pytest.raises(TypeError, match="shared_expert"):
        MoE(dim=16, hidden_dim=24, num_experts=8, shared_expert="yes")
    with pytest.raises(ValueError, match="unknown MoE argument"):
        MoE(dim=16, hidden_dim=24, num_experts=8, n_experts=4)


def test_torch_npu_never_imported_at_import_time():
    """``import moe_torch`` and a loop/grouped_mm forward work where ``import torch_npu`` would fail."""
    code = ("import sys; sys.modules['torch_npu'] = None\n"
            "import torch, moe_torch\n"
            "m = moe_torch.MoE(dim=8, hidden_dim=8, num_experts=4, top_k=2)\n"
            "m(torch.randn(1, 3, 8))\n"
            "try:\n"
            "    moe_torch.MoE(dim=8, hidden_dim=8, num_experts=4, expert_kernel='npu')(torch.randn(1, 3, 8))\n"
            "except ImportError:\n"
            "    print('npu-needs-torch_npu')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "npu-needs-torch_npu" in res.stdout


# --------------------------------------------------------------------------------- DTensor
@pytest.mark.parametrize("placement", ["shard0", "replicate"])
def test_dtensor_weights_and_input(gloo_group, placement):
    """Expert weights (Shard(0) / Replicate) and a Replicate input as DTensors on a 1-rank CPU mesh."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    weights, x = make_case(CFG)
    plain = build_moe(CFG, weights, expert_kernel="grouped_mm")
    moe = build_moe(CFG, weights, expert_kernel="grouped_mm")
    mesh = DeviceMesh("cpu", [0])
    place = [Shard(0)] if placement == "shard0" else [Replicate()]
    for name in ("w1", "w2", "w3"):
        p = getattr(moe.experts, name)
        setattr(moe.experts, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, place)))
    moe.router.gate.weight = torch.nn.Parameter(distribute_tensor(moe.router.gate.weight.detach(), mesh, [Replicate()]))
    xt = torch.from_numpy(x)
    want = plain(xt)
    got = moe(xt)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    want.sum().backward()
    assert isinstance(moe.experts.w1.grad, DTensor)
    torch.testing.assert_close(moe.experts.w1.grad.full_tensor(), plain.experts.w1.grad)
    xd = distribute_tensor(xt, mesh, [Replicate()])
    out_d = moe(xd)
    assert isinstance(out_d, DTensor)
    torch.testing.assert_close(out_d.to_local(), want.detach())
