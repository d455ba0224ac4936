"""Any ``torch.nn.Module`` MoE layer as a column of the parity report (docs/columns.md).

``TorchModuleColumn(factory, mapping)`` builds the module with ``factory(cfg)`` (or ``factory()``),
fills it from the canonical weights through ``mapping`` (``parity.backends.mapping``), casts it to
the run's dtype (the ``expert_bias`` / ``tokens_per_expert`` buffers stay float32) and gives:

- forward: ``module(x)`` in eval mode under ``torch.no_grad``; ``x`` is ``[B, S, D]`` in the run's
  dtype. The module returns ``out``, ``(out, aux)`` or a dict with ``"out"``; ``capture`` adds aux
  tensors read by forward hooks on submodules (``{"router": fn(output) -> {design_key: tensor}}``);
- gradients by autograd: of ``sum(out * cotangent)`` plus the ``load_balance_loss`` /
  ``router_z_loss`` the module returns, w.r.t. ``x`` and every mapped parameter, mapped back to
  canonical names (split and transposed back);
- bias steps when the mapping names both buffers: training-mode forwards, each followed by
  ``update_bias(module, lr)`` (default: DESIGN.md's rule applied to the module's buffers, then the
  counts zeroed). ``selected_experts`` must be among the aux tensors for the bias steps.

torch is imported inside the methods. Whatever the column cannot do is a SKIP row with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from parity.backends import columns_common as cc
from parity.backends.base import GRAD_INPUT, Runner, Tensors
from parity.backends.mapping import BUFFERS, WeightMap, check_shapes
from parity.config import MoEConfig


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _arity(fn) -> int:
    """Positional parameters of a capture function: ``fn(output)`` or ``fn(inputs, output)``."""
    import inspect

    try:
        return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return 1


class TorchModuleColumn(Runner):
    """A torch module as a column.

    ``factory``: ``factory(cfg: MoEConfig) -> nn.Module`` (or no argument), or a module (deep-copied
    per call). ``mapping``: module name -> canonical spec (``parity.backends.mapping``).
    ``name``: the column's name in the report (default ``"torch-module:<factory name>"``).
    ``has_aux``: whether the module's result holds aux tensors (DESIGN.md keys, or renamed by
    ``aux_names``: module key -> DESIGN key). ``capture``: submodule path -> ``fn(output)`` or
    ``fn(inputs, output)`` returning aux tensors, read by forward hooks (the last call wins). ``lock_kwarg``: the keyword by which the module's forward
    takes ``selected_experts [N, k]`` (int64), if it can. ``update_bias(module, lr)``: the module's
    own bias update. ``ignore``: module parameters left as the factory made them. ``grads=False``
    turns the gradient checks off. ``device``: a torch device string.
    """

    def __init__(self, factory, mapping: Mapping[str, object], *, name: str | None = None,
                 has_aux: bool = True, aux_names: Mapping[str, str] | None = None,
                 capture: Mapping[str, Callable] | None = None, lock_kwarg: str | None = None,
                 update_bias: Callable | None = None, ignore: Sequence[str] = (), grads: bool = True,
                 device: str = "cpu", **hooks):
        super().__init__(**hooks)
        self.factory = factory
        self.map = WeightMap(mapping)
        self.name = name or f"torch-module:{getattr(factory, '__name__', type(factory).__name__)}"
        self.aux_names, self.capture = dict(aux_names or {}), dict(capture or {})
        self.has_aux = bool(has_aux or self.capture)
        self.lock_kwarg, self.update_bias, self.ignore = lock_kwarg, update_bias, tuple(ignore)
        self.device = device
        bias = all(self.map.buffer_target(b) for b in BUFFERS)
        caps = {"forward"} | ({"aux"} if self.has_aux else set()) | ({"grad"} if grads else set()) \
            | ({"lock"} if lock_kwarg else set()) | ({"bias"} if bias and self.has_aux else set())
        self.capabilities = frozenset(caps)
        self.skip_reasons = cc.skip_reasons(
            has_aux=self.has_aux, grads=grads, lock=bool(lock_kwarg), bias="bias" in caps, framework="torch",
            bias_why="" if not bias else "bias steps need the module's selected_experts (has_aux=False)")

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    # ------------------------------------------------------------------------------------------
    def build(self, cfg: MoEConfig, weights, dtype: str):
        """The module filled with ``weights`` (canonical, float64 NumPy) in ``dtype``, on the device."""
        import torch

        cfg, weights = self.prepare(cfg, weights)
        module = copy.deepcopy(self.factory) if isinstance(self.factory, torch.nn.Module) \
            else cc.call_factory(self.factory, cfg)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{self.name}: the factory returned {type(module).__name__}; expected a torch.nn.Module")
        module = module.to(device=self.device, dtype=getattr(torch, dtype))
        arrays = self.map.module_arrays(weights)
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        check_shapes(arrays, {n: tuple(t.shape) for n, t in {**buffers, **params}.items()}, tuple(params),
                     self.ignore)
        buffer_names = {self.map.buffer_target(b) for b in BUFFERS}
        with torch.no_grad():
            for target, value in arrays.items():
                t = params.get(target, buffers.get(target))
                tdtype = torch.float32 if target in buffer_names else getattr(torch, dtype)
                if target in buffers:  # a buffer keeps the dtype we give it (float32 for the balancing state)
                    owner, _, leaf = target.rpartition(".")
                    sub = module.get_submodule(owner) if owner else module
                    sub._buffers[leaf] = torch.from_numpy(np.asarray(value, np.float64)).to(
                        device=self.device, dtype=tdtype if target in buffer_names else t.dtype)
                else:
                    t.copy_(torch.from_numpy(np.asarray(value, np.float64)).to(tdtype))
        return module

    def _x(self, x, dtype, requires_grad=False):
        import torch

        t = torch.from_numpy(np.asarray(x, np.float64)).to(device=self.device, dtype=getattr(torch, dtype))
        return t.requires_grad_(requires_grad)

    @staticmethod
    def _np(t) -> np.ndarray:
        t = t.detach().cpu()
        return t.numpy().astype(np.int64) if not t.is_floating_point() else t.double().numpy()

    def _run(self, module, x, selected_experts=None):
        """``(out, aux)`` of one call, aux from the result and the capture hooks (DESIGN keys)."""
        import torch

        captured: dict = {}
        handles = []
        for path, fn in self.capture.items():
            both = _arity(fn) >= 2

            def hook(_mod, inputs, output, fn=fn, both=both):
                captured.update(fn(inputs, output) if both else fn(output))
            handles.append(module.get_submodule(path).register_forward_hook(hook))
        kwargs = {}
        if selected_experts is not None:
            kwargs[self.lock_kwarg] = torch.from_numpy(np.asarray(selected_experts, np.int64)).to(self.device)
        try:
            out, aux = cc.split_result(module(x, **kwargs))
        finally:
            for h in handles:
                h.remove()
        aux = cc.rename_aux({**captured, **aux}, self.aux_names) if self.has_aux else {}
        return out, aux

    def forward(self, cfg, weights, x, dtype, selected_experts=None) -> Tensors:
        import torch

        module = self.build(cfg, weights, dtype).eval()
        with torch.no_grad():
            out, aux = self._run(module, self._x(x, dtype), selected_experts)
        t = Tensors()
        t.put("out", self._np(out).reshape(np.shape(x)), _dtype_name(out))
        for key, value in aux.items():
            value = torch.as_tensor(value)
            t.put(key, cc.as_rows(key, self._np(value), cfg), _dtype_name(value))
        return t

    def grad(self, cfg, weights, x, dtype, cotangent, selected_experts=None) -> Tensors:
        import torch

        module = self.build(cfg, weights, dtype).eval()
        xt = self._x(x, dtype, requires_grad=True)
        out, aux = self._run(module, xt, selected_experts)
        acc = torch.float64 if dtype == "float64" else torch.float32
        cot = torch.from_numpy(np.asarray(cotangent, np.float64)).to(device=self.device, dtype=acc)
        loss = (out.reshape(cot.shape).to(acc) * cot).sum()
        for key in cc.LOSS_KEYS:
            if key in aux:
                loss = loss + aux[key].to(acc)
        params = {n: p for n, p in module.named_parameters() if n in self.map.params}
        grads = torch.autograd.grad(loss, [xt, *params.values()], allow_unused=True)
        g_mod = {n: self._np(torch.zeros_like(p) if g is None else g)
                 for n, g, p in zip(params, grads[1:], params.values(), strict=True)}
        _, w = self.prepare(cfg, weights)
        t = Tensors()
        t.put(GRAD_INPUT, self._np(grads[0]), _dtype_name(xt))
        gdtype = {n: _dtype_name(p) for n, p in params.items()}
        for canon, g in self.map.canonical_grads(g_mod, w).items():
            t.put(canon, g, gdtype[self.map.by_source[canon]])
        return t

    def bias_steps(self, cfg, weights, xs: Sequence[np.ndarray], dtype, lr) -> list[Tensors]:
        import torch

        module = self.build(cfg, weights, dtype).train()
        bias_name, counts_name = (self.map.buffer_target(b) for b in BUFFERS)
        steps = []
        for x in xs:
            with torch.no_grad():
                _, aux = self._run(module, self._x(x, dtype))
            if "selected_experts" not in aux:
                raise KeyError(f"{self.name}: bias steps need 'selected_experts' among the module's aux tensors")
            t = Tensors()
            counts = module.get_buffer(counts_name)
            t.put("tokens_per_expert", self._np(counts), _dtype_name(counts))
            t.put("selected_experts", cc.as_rows("selected_experts", self._np(aux["selected_experts"]), cfg),
                  "int64")
            with torch.no_grad():
                if self.update_bias is not None:
                    self.update_bias(module, lr)
                else:
                    bias = module.get_buffer(bias_name)
                    new = cc.default_update(self._np(bias), self._np(counts), lr)
                    bias.copy_(torch.from_numpy(new))
                    counts.zero_()
            bias = module.get_buffer(bias_name)
            t.put("expert_bias", self._np(bias), _dtype_name(bias))
            steps.append(t)
        return steps
