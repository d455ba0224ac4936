"""Checks for loading canonical weights (DESIGN.md, "Canonical weights"), the twin of ``moe_jax.weights``.

``check_state_dict(module, mapping, strict)`` raises the one ``parity.config.StateDictError`` that
``moe_jax.load_state_dict`` raises for the same mistakes, with the same message: every missing,
unexpected, mis-shaped or non-float key with both shapes, and finite values that the cast to the
module's dtype would turn into infinities. ``MoE.load_state_dict`` calls it before loading.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from parity.config import StateDictError
from parity.config import check_state_dict as _check

__all__ = ["StateDictError", "check_state_dict"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_state_dict(module: nn.Module, mapping: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Raise ``StateDictError`` unless ``mapping`` (name -> tensor) fits ``module.state_dict()``.

    ``strict=False`` tolerates missing keys only (an unexpected key is an error in both backends,
    unlike ``nn.Module.load_state_dict``). Values that are not tensors are left to torch.
    """
    targets = module.state_dict()
    expected = {name: tuple(t.shape) for name, t in targets.items()}
    given, overflows = {}, {}
    for name, value in mapping.items():
        if not isinstance(value, torch.Tensor):
            continue
        given[name] = (tuple(value.shape), _dtype_name(value.dtype), value.dtype.is_floating_point)
        target = targets.get(name)
        if (target is not None and value.dtype.is_floating_point and value.dtype != target.dtype
                and tuple(value.shape) == expected[name]):
            cast = value.detach().to(target.dtype)
            count = int((torch.isfinite(value.detach()) & ~torch.isfinite(cast)).sum())
            overflows[name] = (count, _dtype_name(value.dtype), _dtype_name(target.dtype))
    _check(type(module).__name__, expected, given, strict=strict, overflows=overflows)
