"""GroupedExperts: the routed experts' weights and the kernel that runs them (DESIGN.md step 7)."""

from __future__ import annotations

import torch
from torch import nn

from moe_torch.feed_forward import local_tensor
from moe_torch.kernels import KERNELS, resolve_kernel, select_kernel


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as three 3-D parameters, ``[E, out, in]``.

    Args (the original module's positional order, then keyword-only):
        dim: model dimension D.
        hidden_dim: expert hidden dimension H.
        num_experts: E.
        use_grouped_mm: the original's flag, used when ``expert_kernel`` is not given: True ->
            "grouped_mm" (``torch.nn.functional.grouped_mm``, CPU and CUDA), False (default) -> "loop".
        expert_kernel: "auto" | "loop" | "grouped_mm" | "npu" (see ``moe_torch.kernels``); wins over
            ``use_grouped_mm`` (True with "loop" is a ``ValueError``).

    Attributes ``expert_kernel`` and ``use_grouped_mm`` are live: assigning one (validated) changes
    the kernel of the next forward; ``use_grouped_mm`` reads whether the kernel that runs on the
    weights' device and dtype is a grouped one. ``num_experts`` is fixed (``AttributeError``).

    Parameters: ``w1`` (E, H, D), ``w2`` (E, D, H), ``w3`` (E, H, D).

    ``forward(x, num_tokens_per_expert)``: x (rows, D) sorted expert-major, counts (E_local,) int;
    returns (rows, D) in x's dtype. This is the hook a later expert-parallel style wraps (tokens are
    exchanged before this call and returned after it), as in torchtitan. Weights and x may be
    DTensors: the local shard is used (E_local experts).

    Raises ``ValueError`` for a bad shape or kernel name, ``TypeError`` for a dtype mismatch.

    Example::
        >>> experts = GroupedExperts(dim=8, hidden_dim=16, num_experts=4)
        >>> x = torch.randn(10, 8)
        >>> counts = torch.tensor([3, 2, 4, 1])
        >>> out = experts(x, counts)
        >>> out.shape
        torch.Size([10, 8])
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool = False, *,
                 expert_kernel: str | None = None):
        super().__init__()
        if not isinstance(use_grouped_mm, bool):
            raise ValueError(f"use_grouped_mm={use_grouped_mm!r} must be True or False (a kernel name goes "
                             f"in expert_kernel=)")
        if expert_kernel is None:
            expert_kernel = "grouped_mm" if use_grouped_mm else "loop"
        elif use_grouped_mm and expert_kernel == "loop":
            raise ValueError(f"use_grouped_mm=True contradicts expert_kernel={expert_kernel!r}")
        self.expert_kernel = expert_kernel
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.init_weights()

    @property
    def expert_kernel(self) -> str:
        return self._expert_kernel

    @expert_kernel.setter
    def expert_kernel(self, name: str) -> None:
        if name != "auto" and name not in KERNELS:
            raise ValueError(f"expert_kernel={name!r} is not one of {('auto', *KERNELS)}")
        self._expert_kernel = name

    @property
    def use_grouped_mm(self) -> bool:
        """Whether the kernel that runs on the weights' device and dtype is a grouped one (not "loop")."""
        w = local_tensor(self.w1)
        return resolve_kernel(self.expert_kernel, w.device, w.dtype) != "loop"

    @use_grouped_mm.setter
    def use_grouped_mm(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"use_grouped_mm={value!r} must be True or False")
        self.expert_kernel = "grouped_mm" if value else "loop"

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @num_experts.setter
    def num_experts(self, value) -> None:
        raise AttributeError(f"num_experts={self.w1.shape[0]} is fixed by the weights' shapes; cannot set it "
                             f"to {value!r}: build new experts")

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
