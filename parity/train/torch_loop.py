"""The PyTorch training loop of ``moe-parity train``: ``moe_torch.MoE`` + ``torch.optim``.

One step: forward (training mode, so ``tokens_per_expert`` counts), objective (``parity.train.task``),
backward, clip (``torch.nn.utils.clip_grad_norm_``), ``optimizer.step()``, then
``moe_torch.update_expert_bias`` when the config uses the bias (else the counts are zeroed).

Mixed precision (``compute_dtype="bfloat16"``): the module holds bfloat16 copies of float32 master
weights; each step copies the masters in (rounding), runs forward and backward in bfloat16, hands the
gradients to the masters as float32 and steps the optimizer there (its state is float32 too).
The step runs eagerly (op by op): on CPU at these sizes it is a few milliseconds (torch.compile of
the layer is issue 18's).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from parity.train.metrics import StepRecord
from parity.train.optim import torch_clip, torch_optimizer
from parity.train.task import BUFFERS, TrainSettings

AUX_LOSSES = ("load_balance_loss", "router_z_loss")


class TorchTrainer:
    """A ``moe_torch.MoE`` in ``compute_dtype`` with master weights in ``master_dtype`` (default: the same).

    ``initial``: canonical weights (float64 arrays); ``checkpoint``: run the layer under
    ``torch.utils.checkpoint`` (non-reentrant), whose backward runs the forward again (so the router
    counts its tokens twice and ``update_expert_bias`` gets ``num_recomputations=2``);
    ``optimizer_hook(spec, params) -> torch.optim.Optimizer`` replaces ``parity.train.optim.torch_optimizer``
    (to plant a bug in a test or notebook).
    """

    backend = "torch"

    def __init__(self, settings: TrainSettings, initial, compute_dtype: str, master_dtype: str | None = None, *,
                 checkpoint: bool = False, optimizer_hook: Callable | None = None):
        import torch

        import moe_torch

        self.s, self.cfg = settings, settings.cfg
        self.checkpoint = checkpoint
        self.cdtype = getattr(torch, compute_dtype)
        self.mdtype = getattr(torch, master_dtype or compute_dtype)
        self.acc = torch.float64 if compute_dtype == "float64" else torch.float32
        kernel = "loop" if compute_dtype == "float64" else None  # exact maths for the float64 truth
        cfg = self.cfg if kernel is None else self.cfg.replace(expert_kernel=kernel)
        self.moe = moe_torch.MoE(**cfg.to_kwargs()).to(self.cdtype).train()
        self.moe.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float64)).to(
            torch.float32 if k in BUFFERS else self.cdtype) for k, v in initial.items()})
        self.names = [n for n, _ in self.moe.named_parameters()]
        own = dict(self.moe.named_parameters())
        if self.mdtype == self.cdtype:
            self.master = [own[n] for n in self.names]
        else:
            self.master = [torch.from_numpy(np.asarray(initial[n], np.float64)).to(self.mdtype).requires_grad_()
                           for n in self.names]
        make = optimizer_hook or torch_optimizer
        self.opt = make(settings.optimizer, self.master)

    # ------------------------------------------------------------------------------------------
    def _forward_objective(self, x: np.ndarray, y: np.ndarray, scale: float = 1.0):
        """Forward and backward of one (micro-)batch; gradients of ``scale * objective`` accumulate."""
        import torch
        from torch.utils.checkpoint import checkpoint

        xt = torch.from_numpy(np.asarray(x, np.float64)).to(self.cdtype)
        yt = torch.from_numpy(np.asarray(y, np.float64)).to(self.acc)
        if self.checkpoint:
            out, aux = checkpoint(lambda t: self.moe(t, return_aux=True), xt, use_reentrant=False)
        else:
            out, aux = self.moe(xt, return_aux=True)
        mse = ((out.to(self.acc) - yt) ** 2).mean()
        losses = {k: aux[k].to(self.acc) for k in AUX_LOSSES if k in aux}
        loss = mse + sum(losses.values()) if losses else mse
        (loss * scale).backward()
        return loss, mse, losses, aux

    def _copy_masters_in(self) -> None:
        import torch

        if self.mdtype != self.cdtype:
            with torch.no_grad():
                for (_, p), m in zip(self.moe.named_parameters(), self.master, strict=True):
                    p.copy_(m)

    def _grads_to_masters(self) -> None:
        if self.mdtype != self.cdtype:
            for (_, p), m in zip(self.moe.named_parameters(), self.master, strict=True):
                m.grad = None if p.grad is None else p.grad.to(self.mdtype)

    def _zero_grads(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.moe.zero_grad(set_to_none=True)

    def _bias_update(self) -> np.ndarray:
        """``update_expert_bias`` (when the config uses the bias) on the counts of this step; returns them."""
        import torch

        import moe_torch

        counts = self.moe.tokens_per_expert.detach().double().numpy().copy()
        if self.cfg.use_expert_bias:
            moe_torch.update_expert_bias(self.moe, self.s.bias_lr, num_recomputations=2 if self.checkpoint else 1)
        else:
            with torch.no_grad():
                self.moe.tokens_per_expert.zero_()
        return counts

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        """One optimizer step on ``(x, y)`` (``[B, S, D]`` arrays)."""
        self._copy_masters_in()
        self._zero_grads()
        loss, mse, losses, aux = self._forward_objective(x, y)
        self._grads_to_masters()
        norm = torch_clip(self.s.optimizer, self.master)
        self.opt.step()
        self._bias_update()
        self._copy_masters_in()
        return StepRecord(loss=float(loss.detach()), mse=float(mse.detach()),
                          aux={k: float(v.detach()) for k, v in losses.items()},
                          grad_norm=float(norm), selected=aux["selected_experts"].numpy().astype(np.int64),
                          tokens_per_expert=aux["tokens_per_expert"].double().numpy(),
                          expert_bias=self.moe.expert_bias.double().numpy().copy())

    def accumulate(self, x: np.ndarray, y: np.ndarray, micro_batches: int = 1) -> dict:
        """Gradients of the step's objective over ``micro_batches`` equal micro-batches of ``x`` (each
        micro-batch's objective scaled by 1/n, so that the sum is the batch mean), without an
        optimizer step; then the bias update on the accumulated counts.

        Returns ``{"grads": name -> float64 array, "aux": name -> float (mean over micro-batches),
        "counts": [E] the tokens_per_expert buffer before the update, "expert_bias": [E] after}``.
        """
        self._zero_grads()
        aux_sum: dict[str, float] = {}
        for xm, ym in zip(np.split(np.asarray(x), micro_batches), np.split(np.asarray(y), micro_batches), strict=True):
            _, _, losses, _ = self._forward_objective(xm, ym, scale=1.0 / micro_batches)
            for k, v in losses.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + float(v.detach()) / micro_batches
        grads = {n: p.grad.double().numpy().copy() for n, p in self.moe.named_parameters()}
        counts = self._bias_update()
        return {"grads": grads, "aux": aux_sum, "counts": counts,
                "expert_bias": self.moe.expert_bias.double().numpy().copy()}

    def params(self) -> dict[str, np.ndarray]:
        """The master weights, canonical names, float64."""
        return {n: m.detach().double().numpy().copy() for n, m in zip(self.names, self.master, strict=True)}
