"""GroupedExperts: the routed experts' weights and the kernel that runs them (DESIGN.md step 7)."""

from __future__ import annotations

import torch
from torch import nn

from moe_torch.feed_forward import local_tensor
from moe_torch.kernels import KERNELS, resolve_kernel, select_kernel
from parity.config import validate_experts


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
        expert_activation: "silu" (default, SwiGLU) | "gelu_tanh" (GeGLU, Gemma 4) | "clamped_swiglu"
            (GPT-OSS, with ``swiglu_alpha`` 1.702 and ``swiglu_limit`` 7.0); DESIGN.md step 7.
        expert_proj_bias: biases on the gate, up and down projections (GPT-OSS); default False.

    Attributes ``expert_kernel`` and ``use_grouped_mm`` are live: assigning one (validated) changes
    the kernel of the next forward; ``use_grouped_mm`` reads whether the kernel that runs on the
    weights' device and dtype is a grouped one. ``num_experts`` is fixed (``AttributeError``), and so
    are the activation options (set at construction).

    Parameters: ``w1`` (E, H, D), ``w2`` (E, D, H), ``w3`` (E, H, D); with ``expert_proj_bias`` also
    ``b1``, ``b3`` (E, H) and ``b2`` (E, D) (zeros after ``init_weights``).

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
                 expert_kernel: str | None = None, expert_activation: str = "silu", swiglu_alpha: float = 1.702,
                 swiglu_limit: float = 7.0, expert_proj_bias: bool = False):
        super().__init__()
        validate_experts(expert_activation=expert_activation, swiglu_alpha=swiglu_alpha,
                         swiglu_limit=swiglu_limit, expert_proj_bias=expert_proj_bias)
        self.expert_activation = expert_activation
        self.swiglu_alpha, self.swiglu_limit = float(swiglu_alpha), float(swiglu_limit)
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
        if expert_proj_bias:
            self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
            self.b2 = nn.Parameter(torch.empty(num_experts, dim))
            self.b3 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        else:
            self.b1 = self.b2 = self.b3 = None
        self.init_weights()

    @property
    def expert_proj_bias(self) -> bool:
        """Whether the projections carry biases ``b1``, ``b2``, ``b3`` (fixed at construction)."""
        return self.b1 is not None

    def _kernel_options(self) -> dict:
        """The kernel's keyword options (none for SwiGLU without biases: the original call)."""
        options = {}
        if self.b1 is not None:
            options.update(b1=local_tensor(self.b1), b2=local_tensor(self.b2), b3=local_tensor(self.b3))
        if self.expert_activation != "silu":
            options["activation"] = self.expert_activation
            if self.expert_activation == "clamped_swiglu":
                options.update(alpha=self.swiglu_alpha, limit=self.swiglu_limit)
        return options

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
        """Normal init with std ``fan_in ** -0.5`` (or ``std``), as ``parity.weights.init_weights``;
        biases (``expert_proj_bias``) zero."""
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, 0.0, std if std is not None else w.shape[-1] ** -0.5)
        for b in (self.b1, self.b2, self.b3):
            if b is not None:
                nn.init.zeros_(b)

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
        # (7) act(x W1[e]^T (+ b1[e]), x W3[e]^T (+ b3[e])) W2[e]^T (+ b2[e]), in the input dtype
        return kernel(w1, w2, w3, x, counts, **self._kernel_options())

    def extra_repr(self) -> str:
        e, h, d = self.w1.shape
        extra = "" if self.expert_activation == "silu" else f", expert_activation={self.expert_activation!r}"
        if self.expert_activation == "clamped_swiglu":
            extra += f", swiglu_alpha={self.swiglu_alpha}, swiglu_limit={self.swiglu_limit}"
        if self.expert_proj_bias:
            extra += ", expert_proj_bias=True"
        return f"num_experts={e}, dim={d}, hidden_dim={h}, expert_kernel={self.expert_kernel!r}{extra}"
