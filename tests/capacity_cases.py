"""Hand-computed cases of step 6a (capacity and token dropping), shared by the reference, torch and
JAX tests so that a case means the same thing in all three.

The worked example: 4 tokens, top-2, 3 experts, one group, C = 2 (``expert_capacity=2``).

    token  slot 0       slot 1
    0      e1  0.6      e0  0.4
    1      e0  0.5      e2  0.5
    2      e0  0.7      e1  0.3
    3      e2  0.45     e0  0.55

Experts 1 and 2 get two slots each (all kept). Expert 0 gets four: (t0,s1) 0.4, (t1,s0) 0.5,
(t2,s0) 0.7, (t3,s1) 0.55, and keeps two:
- "position" (token, slot order): t0 and t1;
- "slot_major" (all first choices first): t1 and t2 (slot 0), then t0 and t3 would come;
- "probs" (weight descending): t2 (0.7) and t3 (0.55); t1 (0.5) is the first dropped, so the
  priority margin at expert 0's edge is 0.55 - 0.5 = 0.05.
"""

from __future__ import annotations

import numpy as np

from parity.config import MoEConfig

IDX = np.array([[1, 0], [0, 2], [0, 1], [2, 0]])
W = np.array([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.45, 0.55]])
EXPECTED_KEPT = {
    "position": np.array([[True, True], [True, True], [False, True], [True, False]]),
    "slot_major": np.array([[True, False], [True, True], [True, True], [True, False]]),
    "probs": np.array([[True, False], [False, True], [True, True], [True, True]]),
}

# four identical tokens (one sequence): top-1 sends all of them to the same expert
X_DUPLICATES = np.tile(np.linspace(-1.0, 1.0, 8), (1, 4, 1))


def cfg_for(policy: str) -> MoEConfig:
    """The worked example's options: 3 experts, top-2, C = 2 over the batch."""
    return MoEConfig(num_experts=3, top_k=2, expert_capacity=2, capacity_policy=policy, capacity_group="batch")


def group_case():
    """B = 2 sequences of 2 tokens, top-1, 2 experts, C = 1: (idx, w, kept per sequence, kept over the batch)."""
    idx = np.array([[0], [0], [0], [1]])
    w = np.array([[0.9], [0.8], [0.7], [0.6]])
    return idx, w, np.array([True, False, True, True]), np.array([True, False, False, True])


def kept_of(idx: np.ndarray, kept: np.ndarray) -> list[list[int]]:
    """Each token's kept experts, sorted."""
    return [sorted(int(e) for e, k in zip(row, m, strict=True) if k) for row, m in zip(idx, kept, strict=True)]
