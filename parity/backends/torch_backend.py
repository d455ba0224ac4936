"""``moe_torch`` as a parity column: "torch:cpu", "torch:cuda", "torch:npu".

torch (and torch_npu for "npu") are imported inside the methods, never at import time. The float64
answer for gradients uses the module cast to float64 with the ``loop`` kernel (exact maths, no
grouped-GEMM accumulation order).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np

from parity.backends.base import GRAD_INPUT, Runner, Tensors
from parity.config import MoEConfig

BUFFERS = ("expert_bias", "tokens_per_expert")


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


class TorchRunner(Runner):
    """One torch device. ``device``: "cpu" | "cuda" | "npu".

    ``compile=True`` (column "torch:<device>+compile", ``moe-parity run --compile``): every call runs
    the layer under ``torch.compile`` (default inductor backend; ``fullgraph=True`` for free routing,
    ``fullgraph=False`` when ``selected_experts`` is given: the router's range check of a locked
    routing reads values on the host). ``compile_backend`` names another dynamo backend (tests:
    "aot_eager"). Dynamo fails rather than falling back to eager when its recompile limit is hit.
    """

    capabilities = frozenset({"forward", "aux", "lock", "grad", "bias"})

    def __init__(self, device: str = "cpu", *, compile: bool = False, compile_backend: str = "inductor", **hooks):
        super().__init__(**hooks)
        self.device = device
        self.compile, self.compile_backend = compile, compile_backend
        self.name = f"torch:{device}" + ("+compile" if compile else "")

    def _layer(self, moe, locked: bool):
        """``moe`` itself, or compiled (``compile=True``); see the class docstring."""
        if not self.compile:
            return moe
        import torch

        return torch.compile(moe, backend=self.compile_backend, fullgraph=not locked)

    def _compiling(self):
        """A context making dynamo raise instead of running eagerly when a recompile limit is hit."""
        import contextlib

        if not self.compile:
            return contextlib.nullcontext()
        import torch._dynamo

        return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)

    def unavailable(self) -> str | None:
        for mod in ("torch", "moe_torch"):
            if importlib.util.find_spec(mod) is None:
                return f'{mod} is not installed (pip install "moe-parity[torch]")'
        if self.device == "npu" and importlib.util.find_spec("torch_npu") is None:
            return "torch_npu is not installed"
        try:
            import torch

            import moe_torch  # noqa: F401

            if self.device == "cuda" and not torch.cuda.is_available():
                return "no CUDA device (torch.cuda.is_available() is False)"
            if self.device == "npu":
                import torch_npu  # noqa: F401

                if not torch.npu.is_available():
                    return "no Ascend NPU (torch.npu.is_available() is False)"
        except Exception as exc:  # a broken install is a skip with its reason, not a crash
            return f"cannot import: {type(exc).__name__}: {exc}".splitlines()[0]
        return None

    # ------------------------------------------------------------------------------------------
    def _build(self, cfg: MoEConfig, weights, dtype: str, kernel: str | None = None):
        import torch

        import moe_torch

        cfg, weights = self.prepare(cfg, weights)
        if kernel is not None:
            cfg = cfg.replace(expert_kernel=kernel)
        moe = moe_torch.MoE(**cfg.to_kwargs())
        moe = moe.to(device=self.device, dtype=getattr(torch, dtype))
        state = {}
        for name, value in weights.items():
            tdtype = torch.float32 if name in BUFFERS else getattr(torch, dtype)
            state[name] = torch.from_numpy(np.asarray(value, np.float64)).to(tdtype)
        moe.load_state_dict(state)
        return moe

    def _x(self, x, dtype, requires_grad=False):
        import torch

        t = torch.from_numpy(np.asarray(x, np.float64)).to(device=self.device, dtype=getattr(torch, dtype))
        return t.requires_grad_(requires_grad)

    def _idx(self, selected_experts):
        import torch

        if selected_experts is None:
            return None
        return torch.from_numpy(np.asarray(selected_experts, np.int64)).to(self.device)

    @staticmethod
    def _np(t) -> np.ndarray:
        t = t.detach().cpu()
        return t.numpy() if not t.is_floating_point() else t.double().numpy()

    def forward(self, cfg, weights, x, dtype, selected_experts=None, kept_slots=None) -> Tensors:
        import torch

        moe = self._build(cfg, weights, dtype).eval()
        kwargs = {} if selected_experts is None else {"selected_experts": self._idx(selected_experts)}
        if kept_slots is not None:  # (6a) a locked drop decision
            kwargs["kept_slots"] = torch.from_numpy(np.asarray(kept_slots, bool)).to(self.device)
        with torch.no_grad(), self._compiling():
            out, aux = self._layer(moe, bool(kwargs))(self._x(x, dtype), return_aux=True, **kwargs)
        t = Tensors()
        t.put("out", self._np(out), _dtype_name(out))
        for key, value in aux.items():
            arr = self._np(value)
            t.put(key, arr.astype(np.int64) if key == "selected_experts" else arr, _dtype_name(value))
        return t

    def grad(self, cfg, weights, x, dtype, cotangent, selected_experts=None, kept_slots=None) -> Tensors:
        import torch

        moe = self._build(cfg, weights, dtype, kernel="loop" if dtype == "float64" else None).eval()
        xt = self._x(x, dtype, requires_grad=True)
        kwargs = {} if selected_experts is None else {"selected_experts": self._idx(selected_experts)}
        if kept_slots is not None:  # (6a) a locked drop decision
            kwargs["kept_slots"] = torch.from_numpy(np.asarray(kept_slots, bool)).to(self.device)
        with self._compiling():
            out, aux = self._layer(moe, bool(kwargs))(xt, return_aux=True, **kwargs)
            acc = torch.float64 if dtype == "float64" else torch.float32
            cot = torch.from_numpy(np.asarray(cotangent, np.float64)).to(device=self.device, dtype=acc)
            loss = (out.to(acc) * cot).sum()
            for key in ("load_balance_loss", "router_z_loss"):
                if key in aux:
                    loss = loss + aux[key].to(acc)
            params = dict(moe.named_parameters())
            grads = torch.autograd.grad(loss, [xt, *params.values()], allow_unused=True)
        t = Tensors()
        for name, g, p in zip([GRAD_INPUT, *params], grads, [xt, *params.values()], strict=True):
            g = torch.zeros_like(p) if g is None else g
            t.put(name, self._np(g), _dtype_name(g))
        return t

    def bias_steps(self, cfg, weights, xs: Sequence[np.ndarray], dtype, lr) -> list[Tensors]:
        import torch

        from moe_torch.balancing import update_expert_bias

        moe = self._build(cfg, weights, dtype).train()
        steps = []
        layer = self._layer(moe, False)
        for x in xs:
            with torch.no_grad(), self._compiling():
                _, aux = layer(self._x(x, dtype), return_aux=True)
            t = Tensors()
            t.put("tokens_per_expert", self._np(moe.tokens_per_expert), _dtype_name(moe.tokens_per_expert))
            t.put("selected_experts", self._np(aux["selected_experts"]).astype(np.int64), "int64")
            with torch.no_grad():
                update_expert_bias(moe, lr)
            t.put("expert_bias", self._np(moe.expert_bias), _dtype_name(moe.expert_bias))
            steps.append(t)
        return steps
