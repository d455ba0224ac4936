"""What the ready-made adapters (``TorchModuleColumn``, ``NNXModuleColumn``, ``LinenModuleColumn``)
share: reading a module's result, the skip reasons, the default bias-update rule. NumPy only."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from parity import reference as ref
from parity.config import MoEConfig

AUX_KEYS = ("router_logits", "scores", "selected_experts", "routing_weights", "tokens_per_expert",
            "load_balance_loss", "router_z_loss")
LOSS_KEYS = ("load_balance_loss", "router_z_loss")


def split_result(result) -> tuple[object, dict]:
    """A module's return value as ``(out, aux)``: a tensor (no aux), ``(out, aux_dict)``, ``(out, ...)``
    (the rest ignored) or a dict holding ``"out"``. ``TypeError`` for anything else."""
    if isinstance(result, Mapping):
        if "out" not in result:
            raise TypeError(f"the module returned a dict without 'out' (keys: {', '.join(map(str, result))})")
        return result["out"], {k: v for k, v in result.items() if k != "out"}
    if isinstance(result, (tuple, list)):
        if not result:
            raise TypeError("the module returned an empty tuple")
        aux = result[1] if len(result) > 1 and isinstance(result[1], Mapping) else {}
        return result[0], dict(aux)
    if hasattr(result, "shape"):
        return result, {}
    raise TypeError(f"the module returned {type(result).__name__}; expected out, (out, aux) or a dict with 'out'")


def rename_aux(aux: Mapping, aux_names: Mapping[str, str] | None) -> dict:
    """The module's aux keys renamed to DESIGN.md's (``aux_names``: module key -> DESIGN key); keys
    that are not DESIGN keys after renaming are dropped."""
    names = dict(aux_names or {})
    out = {}
    for key, value in aux.items():
        key = names.get(key, key)
        if key in AUX_KEYS:
            out[key] = value
    return out


def as_rows(key: str, a: np.ndarray, cfg: MoEConfig) -> np.ndarray:
    """An aux tensor in DESIGN.md's shape: ``[N, E]`` / ``[N, k]`` rows for per-token tensors
    (a module's ``[B, S, E]`` is flattened), ``[E]`` for counts, a scalar for losses."""
    a = np.asarray(a)
    if key in ("router_logits", "scores"):
        return a.reshape(-1, cfg.num_experts)
    if key in ("selected_experts", "routing_weights"):
        return a.reshape(-1, cfg.top_k)
    if key in LOSS_KEYS:
        return a.reshape(())
    return a


def skip_reasons(*, has_aux: bool, grads: bool, lock: bool, bias: bool, framework: str,
                 bias_why: str = "") -> dict[str, str]:
    """The reasons an adapter gives for the capabilities it lacks (SKIP rows, docs/columns.md)."""
    out = {}
    if not has_aux:
        out["aux"] = ("the module returns no aux tensors (return (out, aux) with DESIGN.md keys, or pass aux_names"
                      + (" / capture" if framework == "torch" else "") + ")")
    if not grads:
        out["grad"] = "gradients turned off for this column (grads=False)"
    if not lock:
        out["lock"] = "the module takes no selected_experts (pass lock_kwarg= to lock its routing)"
    if not bias:
        out["bias"] = bias_why or "the mapping names no expert_bias and tokens_per_expert buffers"
    return out


def default_update(bias: np.ndarray, counts: np.ndarray, lr: float) -> np.ndarray:
    """DESIGN.md's update rule (``parity.reference.update_expert_bias``), used when a column gives no
    ``update_bias`` of its own: ``bias + lr * sign(mean(counts) - counts)``, float32."""
    return ref.update_expert_bias(np.asarray(bias, np.float32), np.asarray(counts, np.float32), lr)


def call_factory(factory: Callable, cfg: MoEConfig):
    """``factory(cfg)``, or ``factory()`` for a factory that takes no argument."""
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(cfg)
    required = [p for p in params.values() if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return factory(cfg) if required or any(p.kind == p.VAR_POSITIONAL for p in params.values()) \
        else factory()
