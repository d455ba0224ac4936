"""GroupedExperts: the routed experts' weights and the kernel that runs them (DESIGN.md step 7)."""

from __future__ import annotations

import torch
from torch import nn

from moe_torch.feed_forward import local_tensor
from moe_torch.kernels import KERNELS, select_kernel


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as three 3-D parameters, ``[E, out, in]``.

    Args:
        dim: model dimension D.
        hidden_dim: expert hidden dimension H.
        num_experts: E.
        expert_kernel: "auto" | "loop" | "grouped_mm" | "npu" (see ``moe_torch.kernels``).

    Parameters: ``w1`` (E, H, D), ``w2`` (E, D, H), ``w3`` (E, H, D).

    ``forward(x, num_tokens_per_expert)``: x (rows, D) sorted expert-major, counts (E_local,) int;
    returns (rows, D) in x's dtype. This is the hook a later expert-parallel style wraps (tokens are
    exchanged before this call and returned after it), as in torchtitan. Weights and x may be
    DTensors: the local shard is used (E_local experts).

    Raises ``ValueError`` for a bad shape or kernel name, ``TypeError`` for a dtype mismatch.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, expert_kernel: str = "auto"):
        super().__init__()
        if expert_kernel != "auto" and expert_kernel not in KERNELS:
            raise ValueError(f"expert_kernel={expert_kernel!r} is not one of {('auto', *KERNELS)}")
        self.num_experts = num_experts
        self.expert_kernel = expert_kernel
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.init_weights()

    def init_weights(self, std: float | None = None) -> None:
        """Normal init with std ``fan_in ** -0.5`` (or ``std``), as ``parity.weights.init_weights``."""
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, 0.0, std if std is not None else w.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (local_tensor(w) for w in (self.w1, self.w2, self.w3))
        x, counts = local_tensor(x), local_tensor(num_tokens_per_expert)
        if x.ndim != 2 or x.shape[-1] != w1.shape[-1]:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [rows, dim={w1.shape[-1]}]")
        if x.dtype != w1.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the expert weights have dtype {w1.dtype}")
        if counts.shape != (w1.shape[0],):
            raise ValueError(
                f"num_tokens_per_expert has shape {tuple(counts.shape)}; expected ({w1.shape[0]},), "
                f"one count per local expert")
        kernel = select_kernel(self.expert_kernel, x.device, x.dtype)
        return kernel(w1, w2, w3, x, counts)

    def extra_repr(self) -> str:
        e, h, d = self.w1.shape
        return f"num_experts={e}, dim={d}, hidden_dim={h}, expert_kernel={self.expert_kernel!r}"
