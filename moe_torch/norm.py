"""RMSNorm of the layer's input, as Gemma 4 writes it (DESIGN.md steps 1 and 6).

The float64 form is ``parity.reference.rms_norm``.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_torch.feed_forward import local_tensor


class RMSNorm(nn.Module):
    """The weight (D,) of an RMSNorm (initialised to ones); ``forward(x, eps)`` -> ``rms_norm(x, eps,
    weight)`` cast back to x's dtype, as ``Gemma4RMSNorm`` returns ``type_as(x)``.

    The epsilon is an argument, not an attribute: the MoE layer's ``input_norm_eps`` is one live option
    shared by the router's and the experts' norm (DESIGN.md steps 1 and 6).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, eps, local_tensor(self.weight)).to(x.dtype)


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x * (mean(x**2, -1) + eps) ** -0.5`` (times ``weight`` (D,) when given), in float32.

    x (N, D) any float dtype -> (N, D) float32 (float64 for float64 x); the caller casts. RMSNorm:
    Zhang & Sennrich 2019; the operations and their order are ``Gemma4RMSNorm`` (transformers 5.24:
    ``torch.pow(mean_squared, -0.5)``, and a weight that multiplies as is, no ``1 +``), so float32
    results are bit-equal to it.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return y if weight is None else y * weight.to(acc)
