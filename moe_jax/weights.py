"""Canonical weights (DESIGN.md): ``load_state_dict`` / ``state_dict`` between NNX modules and the flat
PyTorch-layout mapping name -> array that every backend and the harness exchange.

moe_jax keeps matrices in the JAX ``x @ w`` layout ([in, out]); canonical ones are PyTorch's
[out, in]. The table below is the only place that knows both, so a transpose cannot be forgotten.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from parity.config import StateDictError, check_state_dict

_T2 = (1, 0)  # [in, out] <-> [out, in]
_T3 = (0, 2, 1)  # [E, in, out] <-> [E, out, in]

# internal NNX path -> (canonical name, axes permutation between the two layouts; an involution)
_CANONICAL: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "router.gate": ("router.gate.weight", _T2),
    "experts.w1": ("experts.w1", _T3),
    "experts.w2": ("experts.w2", _T3),
    "experts.w3": ("experts.w3", _T3),
    "shared_expert.w1": ("shared_expert.w1.weight", _T2),
    "shared_expert.w2": ("shared_expert.w2.weight", _T2),
    "shared_expert.w3": ("shared_expert.w3.weight", _T2),
    "shared_expert_gate": ("shared_expert_gate.weight", _T2),
    "router.scale": ("router.scale", None),  # Gemma 4's router input scale (D,)
    "router.per_expert_scale": ("router.per_expert_scale", None),  # (E,)
    "expert_input_norm": ("expert_input_norm.weight", None),  # (D,)
    "router.bias": ("router.gate.bias", None),  # GPT-OSS's router bias (E,)
    "experts.b1": ("experts.b1", None),  # GPT-OSS's expert biases: (E, H), the same layout in both
    "experts.b2": ("experts.b2", None),  # (E, D)
    "experts.b3": ("experts.b3", None),  # (E, H)
    "bias": ("gate.bias", None),
    "b1": ("b1", None),
    "b2": ("b2", None),
    "b3": ("b3", None),
    "expert_bias": ("expert_bias", None),
    "tokens_per_expert": ("tokens_per_expert", None),
    # standalone submodules use the names their PyTorch twins give them
    "gate": ("gate.weight", _T2),
    "scale": ("scale", None),
    "per_expert_scale": ("per_expert_scale", None),
    "w1": ("w1", _T3),
    "w2": ("w2", _T3),
    "w3": ("w3", _T3),
}


def _is_feed_forward(root) -> bool:
    from moe_jax.feed_forward import FeedForward

    return isinstance(root, FeedForward)


def _canonical_name(path: str, root) -> tuple[str, tuple[int, ...] | None]:
    if _is_feed_forward(root) and path in ("w1", "w2", "w3"):
        return f"{path}.weight", _T2  # a FeedForward's w1 is an nn.Linear in PyTorch
    if path not in _CANONICAL:
        raise StateDictError(f"no canonical name for the NNX variable {path!r}")
    return _CANONICAL[path]


def _variables(root) -> dict[str, tuple[str, tuple[int, ...] | None, nnx.Variable]]:
    """canonical name -> (internal path, permutation, Variable) of a module or an ``nnx.State``."""
    state = nnx.state(root) if isinstance(root, nnx.Module) else root
    out = {}
    for path, var in nnx.to_flat_state(state):
        internal = ".".join(str(p) for p in path)
        name, perm = _canonical_name(internal, root)
        out[name] = (internal, perm, var)
    return out


def _to_canonical(value, perm) -> np.ndarray:
    value = np.asarray(value)
    return np.ascontiguousarray(value.transpose(perm) if perm is not None else value)


def state_dict(module) -> dict[str, np.ndarray]:
    """The canonical mapping (NumPy arrays, PyTorch layout, parameters' dtype) of ``module``.

    ``module``: a ``moe_jax.MoE`` (or ``FeedForward`` / ``GroupedExperts`` / ``TokenChoiceTopKRouter``),
    or an ``nnx.State`` such as the gradients returned by ``nnx.grad`` (parameters only), so gradients
    can be compared by canonical name.
    """
    return {name: _to_canonical(var[...], perm) for name, (_, perm, var) in _variables(module).items()}


def load_state_dict(module: nnx.Module, mapping: Mapping[str, object], *, strict: bool = True) -> None:
    """Write canonical weights (PyTorch layout) into ``module`` in place, cast to each variable's dtype.

    Every key is checked before anything is written: missing (unless ``strict=False``), unexpected,
    mis-shaped and non-float (integer, bool) keys raise one ``parity.config.StateDictError`` (a
    ValueError; the same class and message as ``moe_torch``'s ``MoE.load_state_dict``) listing each
    with the expected and the given shape. Float arrays of another float dtype are cast to each
    variable's dtype (round to nearest: float64 -> float32 loses precision, as a float32 module
    does; DESIGN.md), except that a finite value overflowing to infinity is an error too.
    ``expert_bias`` / ``tokens_per_expert`` stay float32.
    """
    targets = _variables(module)
    expected, given, arrays, overflows = {}, {}, {}, {}
    for name, (_, perm, var) in targets.items():
        expected[name] = tuple(var.shape[p] for p in perm) if perm is not None else tuple(var.shape)
    for name, value in mapping.items():
        value = np.asarray(value)
        arrays[name] = value
        given[name] = (value.shape, value.dtype.name, bool(jnp.issubdtype(value.dtype, jnp.floating)))
        if name in targets and given[name][2] and value.shape == expected[name]:
            dtype = np.dtype(targets[name][2].dtype)
            if value.dtype != dtype:
                with np.errstate(over="ignore"):
                    cast = value.astype(dtype)
                count = int((np.isfinite(value) & ~np.isfinite(cast)).sum())
                overflows[name] = (count, value.dtype.name, dtype.name)
    check_state_dict(type(module).__name__, expected, given, strict=strict, overflows=overflows)
    for name, (_, perm, var) in targets.items():
        if name in arrays:
            value = arrays[name]
            value = value.transpose(perm) if perm is not None else value
            var[...] = jnp.asarray(value.astype(var.dtype))
