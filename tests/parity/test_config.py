"""MoEConfig validation: every invalid combination is a ValueError that names the field and value."""

import pytest

from parity.config import EXPERT_KERNELS, MoEConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=9, num_experts=8), "top_k=9 exceeds num_experts=8"),
        (dict(num_experts=8, num_expert_groups=3, num_limited_groups=1), "num_expert_groups=3 does not divide num_experts=8"),
        (dict(num_experts=8, num_expert_groups=4, num_limited_groups=5), "num_limited_groups=5 exceeds num_expert_groups=4"),
        (dict(num_experts=8, top_k=5, num_expert_groups=4, num_limited_groups=2), "top_k=5 exceeds the 4 experts"),
        (dict(num_experts=8, num_expert_groups=4), "num_limited_groups must be set"),
        (dict(num_experts=8, num_limited_groups=2), "needs num_expert_groups"),
        (dict(num_experts=8, num_expert_groups=8, num_limited_groups=2, group_score="top2_sum"), "at least 2 experts per group"),
        (dict(score_func="relu"), "score_func='relu' is not one of"),
        (dict(group_score="mean"), "group_score='mean' is not one of"),
        (dict(expert_kernel="triton"), "expert_kernel='triton' is not one of"),
        (dict(load_balance_loss="global"), "load_balance_loss='global' is not one of"),
        (dict(dim=0), "dim=0 must be a positive integer"),
        (dict(hidden_dim=-4), "hidden_dim=-4 must be a positive integer"),
        (dict(num_experts=0), "num_experts=0 must be a positive integer"),
        (dict(top_k=0), "top_k=0 must be a positive integer"),
        (dict(dim=8.0), "dim=8.0 must be a positive integer"),
        (dict(route_scale=0.0), "route_scale=0.0 must be a finite number > 0"),
        (dict(load_balance_coeff=-1.0), "load_balance_coeff=-1.0 must be a finite number >= 0"),
        (dict(router_z_loss_coeff=float("nan")), "router_z_loss_coeff=nan"),
        (dict(num_shared_experts=-1), "num_shared_experts=-1"),
        (dict(shared_hidden_dim=16), "shared_hidden_dim=16 given but num_shared_experts=0"),
        (dict(route_norm=1), "route_norm=1 must be True or False"),
        (dict(route_norm_eps=-1e-20), "route_norm_eps=-1e-20 must be a finite number >= 0"),
        (dict(route_norm_eps=float("inf")), "route_norm_eps=inf must be a finite number >= 0"),
        (dict(route_norm_eps="0"), "route_norm_eps='0' must be a finite number >= 0"),
        (dict(route_norm_mode="max"), "route_norm_mode='max' is not one of"),
    ],
)
def test_invalid_config_names_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(**kwargs)


def test_to_kwargs_round_trip_and_overrides():
    cfg = MoEConfig(dim=32, hidden_dim=48, num_experts=16, top_k=4, num_expert_groups=4,
                    num_limited_groups=2, group_score="top2_sum")
    kwargs = cfg.to_kwargs()
    assert MoEConfig(**kwargs) == cfg
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_kwargs(expert_kernel="loop")["expert_kernel"] == "loop"
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        cfg.to_kwargs(n_experts=3)
    with pytest.raises(ValueError, match=r"unknown MoEConfig field\(s\) \['experts'\]"):
        MoEConfig.from_dict({"experts": 4})


def test_shared_dim():
    assert MoEConfig().shared_dim == 0
    assert MoEConfig(hidden_dim=24, num_shared_experts=2).shared_dim == 48
    assert MoEConfig(hidden_dim=24, num_shared_experts=1, shared_hidden_dim=40).shared_dim == 40


def test_kernel_names_cover_both_backends():
    assert {"auto", "loop", "grouped_mm", "npu", "ragged_dot"} <= set(EXPERT_KERNELS)


def test_importing_config_needs_no_framework():
    import subprocess
    import sys

    code = "import sys, parity.config, parity; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
