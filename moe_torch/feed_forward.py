"""SwiGLU feed-forward: the shared expert and the maths of every routed expert (DESIGN.md step 7/9).

Also holds ``local_tensor``, the one DTensor helper the other files use.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn


def dtensor_class():
    """``torch.distributed.tensor.DTensor`` if that module is loaded, else None.

    NOTE: importing torch.distributed.tensor takes ~1 s (a third of ``import moe_torch``); a DTensor
    can only exist once that module is loaded, so the checks look it up in ``sys.modules`` rather
    than importing it.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (without importing torch.distributed.tensor)."""
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (``t.to_local()``), or ``t`` itself for a plain tensor.

    NOTE: the expert maths runs on plain tensors: token counts per expert are data-dependent, which
    DTensor cannot express (torchtitan's GroupedExperts converts its weights the same way). The
    gradient still flows back to the DTensor parameter through ``to_local``.
    """
    if is_dtensor(t):
        return t.to_local()
    return t


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): ``w2(silu(w1(x)) * w3(x))``.

    Args:
        dim: model dimension D.
        hidden_dim: hidden dimension H.
        bias: give every Linear a bias (``w1.bias`` [H], ``w2.bias`` [D], ``w3.bias`` [H]), as the
            original module's ``bias=True``; default False.

    Parameters (canonical names ``w1.weight`` [H, D], ``w2.weight`` [D, H], ``w3.weight`` [H, D]):
    three ``nn.Linear``. The canonical weights (DESIGN.md) hold no biases: a ``bias=True``
    FeedForward is a user module, not one the parity harness builds.

    Shapes: x (..., D) -> (..., D), in x's dtype. Raises ``TypeError`` when x's dtype differs from
    the weights'.

    Example::
        >>> ff = FeedForward(dim=256, hidden_dim=512)
        >>> out = ff(torch.randn(4, 16, 256))
        >>> out.shape
        torch.Size([4, 16, 256])
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        if not isinstance(bias, bool):
            raise ValueError(f"bias={bias!r} must be True or False")
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (local_tensor(m.weight) for m in (self.w1, self.w2, self.w3))
        b1, b2, b3 = (None if m.bias is None else local_tensor(m.bias) for m in (self.w1, self.w2, self.w3))
        x = local_tensor(x)
        if x.dtype != w1.dtype:
            raise TypeError(f"FeedForward input has dtype {x.dtype} but its weights have dtype {w1.dtype}")
        return F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w3, b3), w2, b2)

    def init_weights(self, std: float | None = None) -> None:
        """Normal init with std ``fan_in ** -0.5`` (or ``std``), as ``parity.weights.init_weights``;
        biases (``bias=True``) zeroed."""
        for lin in (self.w1, self.w2, self.w3):
            nn.init.normal_(lin.weight, 0.0, std if std is not None else lin.in_features ** -0.5)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
