"""The configurations every backend is tested on: one per option of DESIGN.md, small enough for CPU.

Every test that needs weights gets them from ``make_case`` so a case means the same thing in
moe_torch, moe_jax and the float64 reference. Sizes are multiples of 8 (grouped_mm needs 16-byte
aligned strides) and non-square so that a missing transpose cannot hide.
"""

from __future__ import annotations

import numpy as np

from parity.config import MoEConfig
from parity.mesh_job import MeshJob
from parity.weights import init_weights

BASE = dict(dim=16, hidden_dim=24, num_experts=8)

CASES: dict[str, MoEConfig] = {
    "default_sigmoid_top1": MoEConfig(**BASE),
    "softmax_top2_norm": MoEConfig(**BASE, top_k=2, score_func="softmax", route_norm=True),
    "softmax_top2_after": MoEConfig(**BASE, top_k=2, score_func="softmax", route_norm=True,
                                    score_before_experts=False),
    "sigmoid_top3_scale": MoEConfig(**BASE, top_k=3, route_norm=True, route_scale=2.5,
                                    score_before_experts=False),
    "groups_max": MoEConfig(**BASE, top_k=2, score_func="softmax", num_expert_groups=4,
                            num_limited_groups=2, group_score="max"),
    "groups_top2_sum_bias": MoEConfig(**BASE, top_k=3, num_expert_groups=4, num_limited_groups=2,
                                      group_score="top2_sum", use_expert_bias=True, route_norm=True,
                                      route_scale=2.5, score_before_experts=False),
    "shared_expert": MoEConfig(**BASE, top_k=2, num_shared_experts=1, shared_hidden_dim=32),
    "switch_loss": MoEConfig(**BASE, top_k=2, score_func="softmax", load_balance_loss="switch",
                             load_balance_coeff=0.01),
    "sequence_loss_zloss": MoEConfig(**BASE, top_k=2, load_balance_loss="sequence",
                                     load_balance_coeff=0.01, router_z_loss_coeff=0.001),
    "expert_bias": MoEConfig(**BASE, top_k=2, use_expert_bias=True),
}


def make_case(cfg: MoEConfig, seed: int = 0, batch: int = 2, seq_len: int = 8):
    """Canonical float32 weights and an input ``x [batch, seq_len, dim]`` (float32), both from ``seed``."""
    weights = init_weights(cfg, seed)
    x = np.random.default_rng(seed + 1000).standard_normal((batch, seq_len, cfg.dim)).astype(np.float32)
    return weights, x


# Tolerances against the float64 reference, per compute dtype (max abs error on outputs of O(1)).
TOLERANCES = {
    "float32": dict(rtol=1e-4, atol=1e-5),
    "bfloat16": dict(rtol=3e-2, atol=3e-2),
    "float64": dict(rtol=1e-10, atol=1e-12),
}


# Sharded runs (tests/torch/test_parallel.py, tests/jax/test_parallel.py): the same jobs in both frameworks.
HOT = (0, 5)  # experts that take every token of a skewed job, so some ranks get no tokens at all
STEPS, LR = 3, 0.01


def skewed(weights, x):
    """Gate and input such that every token scores experts ``HOT`` far above the rest (top-2 = HOT)."""
    w = {k: v.copy() for k, v in weights.items()}
    x = x.copy()
    x[..., 0] += 4.0
    w["router.gate.weight"][:, 0] = -3.0
    w["router.gate.weight"][list(HOT), 0] = 3.0
    return w, x


def make_job(case: str, mesh: dict, skew: bool = False, dtype: str = "float32", **cfg_changes) -> MeshJob:
    cfg = CASES[case].replace(**cfg_changes) if cfg_changes else CASES[case]
    weights, x = make_case(cfg, seed=3, batch=4, seq_len=4)
    if skew:
        weights, x = skewed(weights, x)
    rng = np.random.default_rng(7)
    cot = rng.standard_normal(x.shape).astype(np.float32)
    xs = [x + 0.5 * rng.standard_normal(x.shape).astype(np.float32) for _ in range(STEPS)]
    return MeshJob(cfg, weights, x, cot, mesh, STEPS, LR, dtype, xs)
