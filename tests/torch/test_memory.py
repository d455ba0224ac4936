"""What the MoE layer keeps for backward (saved tensors), so memory regressions show up as failures.

Issue 7 target: forward+backward memory <= 1.5x the activations a loop implementation keeps,
``rows * (D + 4H)`` elements (x, h1, silu(h1), h3, h per routed row). Measured here with
``torch.autograd.graph.saved_tensors_hooks`` on the unique storages saved, parameters and input excluded.
"""

from __future__ import annotations

import pytest
import torch

from moe_torch import MoE

D, H, E, K, N = 32, 16, 8, 4, 64
ROWS = N * K


def _saved(moe: MoE, x: torch.Tensor) -> dict[int, torch.Tensor]:
    skip = {p.untyped_storage().data_ptr() for p in moe.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved.setdefault(ptr, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moe(x)
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score_before_experts", [True, False])
def test_layer_saves_no_float32_copy_of_routed_rows(dtype, score_before_experts):
    torch.manual_seed(0)
    moe = MoE(dim=D, hidden_dim=H, num_experts=E, top_k=K, score_func="softmax",
              score_before_experts=score_before_experts, expert_kernel="grouped_mm").to(dtype)
    x = torch.randn(1, N, D, dtype=dtype, requires_grad=True)
    saved = _saved(moe, x)
    routed = [t for t in saved.values() if t.dim() >= 1 and t.shape[0] * (t.shape[1] if t.dim() == 3 else 1) == ROWS
              and t.is_floating_point() and t.numel() >= ROWS * H]
    # the routed rows the layer keeps are in the layer's dtype (x, h1, h3 of the kernel; y of the combine)
    assert routed and all(t.dtype == dtype for t in routed), [(tuple(t.shape), t.dtype) for t in routed]
    total = sum(t.untyped_storage().nbytes() for t in saved.values())
    loop = ROWS * (D + 4 * H) * x.element_size()
    # kernel x, h1, h3 (D + 2H) + combine y (D, without score_before_experts) + the float32 router
    # input (N * D * 4 bytes) and small (N, E) / index tensors
    bound = ROWS * (D + 2 * H + (0 if score_before_experts else D)) * x.element_size() + N * D * 4 + 4096 * 4
    assert total <= bound, (total, bound)
    assert total <= 1.5 * loop
