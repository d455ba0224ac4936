"""The case of tests/{torch,jax}/test_nonfinite.py: one expert's fault, the same in both frameworks (issue 12)."""

from __future__ import annotations

import numpy as np

from parity.config import MoEConfig

# 4 experts, top-2, sigmoid scores without route_norm (a token's gate gradient touches only its
# selected experts); with this input (1 sequence of 4 tokens, seed 2) some tokens never use expert 0
# and the JAX blocked kernel's clamped last block holds rows of expert 0 (the case of issue 12).
CFG = MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2, score_func="sigmoid", num_shared_experts=1)
X = np.random.default_rng(2).standard_normal((1, 4, 16)).astype(np.float32)
CT = np.linspace(-1.0, 1.0, X.size, dtype=np.float32).reshape(X.shape)  # a linear objective: sum(out * CT)


def fault(weights, kind):
    """Canonical weights with expert 0 broken: "overflow" (finite, x1e20) or one NaN in w2."""
    bad = {k: v.copy() for k, v in weights.items()}
    if kind == "overflow":
        for n in ("w1", "w2", "w3"):
            bad[f"experts.{n}"][0] *= np.float32(1e20)
    else:
        bad["experts.w2"][0, 3, 5] = np.nan
    return bad
