"""SwiGLU feed-forward: the shared expert and the maths of every routed expert (DESIGN.md step 7/9).

Also holds ``local_tensor``, the one DTensor helper the other files use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (``t.to_local()``), or ``t`` itself for a plain tensor.

    NOTE: the expert maths runs on plain tensors: token counts per expert are data-dependent, which
    DTensor cannot express (torchtitan's GroupedExperts converts its weights the same way). The
    gradient still flows back to the DTensor parameter through ``to_local``.
    """
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): ``w2(silu(w1(x)) * w3(x))``.

    Args:
        dim: model dimension D.
        hidden_dim: hidden dimension H.

    Parameters (canonical names ``w1.weight`` [H, D], ``w2.weight`` [D, H], ``w3.weight`` [H, D]):
    three ``nn.Linear`` without bias.

    Shapes: x (..., D) -> (..., D), in x's dtype. Raises ``TypeError`` when x's dtype differs from
    the weights'.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (local_tensor(m.weight) for m in (self.w1, self.w2, self.w3))
        x = local_tensor(x)
        if x.dtype != w1.dtype:
            raise TypeError(f"FeedForward input has dtype {x.dtype} but its weights have dtype {w1.dtype}")
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    def init_weights(self, std: float | None = None) -> None:
        """Normal init with std ``fan_in ** -0.5`` (or ``std``), as ``parity.weights.init_weights``."""
        for lin in (self.w1, self.w2, self.w3):
            nn.init.normal_(lin.weight, 0.0, std if std is not None else lin.in_features ** -0.5)
