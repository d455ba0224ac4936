"""Expert, tensor and expert-tensor parallelism for ``moe_torch.MoE`` on torch.distributed + DTensor.

Three ``ParallelStyle``s for ``torch.distributed.tensor.parallel.parallelize_module`` (the design of
torchtitan's ``distributed/expert_parallel.py``, written anew): the expert weights become DTensors,
tokens travel between ranks by ``all_to_all_single`` around ``GroupedExperts.forward(x, counts)``, and
everything else runs on plain local tensors.

Mesh dimensions (names are arguments; defaults "ep" and "tp"):

- ``ep`` (expert parallel): ranks along ``ep`` hold *different tokens* (each its own data-parallel
  batch shard) and ``E / ep`` experts each: ``w1``, ``w2``, ``w3`` are ``Shard(0)``.
- ``tp`` (tensor parallel): ranks along ``tp`` hold *the same tokens* and a slice of every expert's
  hidden dim: ``w1``, ``w3`` (E, H, D) ``Shard(1)``, ``w2`` (E, D, H) ``Shard(2)``; the shared expert
  is split the same way (``w1.weight``, ``w3.weight`` (Hs, D) ``Shard(0)``, ``w2.weight`` (D, Hs)
  ``Shard(1)``) and the router gate is a ``Replicate()`` DTensor.

What is reduced where (N_r = tokens of rank r; all sums, never means, so nothing is scaled by a mesh size):

- Forward, TP: each TP rank's expert (and shared-expert) output is a partial sum over its hidden
  slice; it is all-reduced over ``tp`` right after the experts ("g" of Megatron-LM, Shoeybi et al.
  2019, backward = identity), and the expert input passes an identity whose backward all-reduces
  over ``tp`` ("f"). So everything outside the experts (router, dispatch, combine, aux losses) is
  computed identically on every TP rank, and so are its gradients: the router gradient is the full
  gradient on each TP rank, never a partial one (torchtitan needed a ``Partial`` grad placement for
  this). A post-accumulate-grad hook then averages the router gradient over ``tp`` so replicas stay
  bit-identical even where a device's kernels are not deterministic.
- Forward, EP: per-expert counts (E,) are exchanged by one ``all_to_all_single`` over ``ep``; they give
  the (dropless) split sizes of a second ``all_to_all_single`` that sends every routed row to the rank
  owning its expert, and of a third that brings the expert outputs back. The backward of each
  exchange is the exchange with the splits swapped, so an expert's gradient on its owner rank already
  sums the contributions of every rank's tokens: it must *not* be reduced (or averaged) over ``ep``.
- Aux losses under EP (``load_balance_loss``, ``router_z_loss`` in ``aux``) are those of the whole
  batch across ``ep`` (counts, mean probabilities and squared log-sum-exps summed over ``ep``): every
  rank holds the same value, the single-device value of the concatenated batch. The sums' backward is
  the identity, so each rank's gradient is its own tokens' share of the global loss.
- Gradients of the *dense* parameters (router gate, shared expert) on an EP rank are that rank's
  share; ``all_reduce_dense_grads(moe, group)`` sums them over the data-parallel ranks (``ep``, plus
  any pure data-parallel dims), as DDP/FSDP would. The expert gradients are skipped there.
- ``moe_torch.update_expert_bias(moe, lr, group=...)`` sums ``tokens_per_expert`` over ``group`` (pass
  ``token_group(mesh)``, the ``ep`` ranks) so every rank computes the same ``expert_bias``.

Inputs: ``moe(x)`` with x (bs, slen, D) a plain tensor holding this rank's tokens (different along
``ep``, identical along ``tp``); ``out`` and the aux tensors are this rank's (``tokens_per_expert``
counts its own tokens), only the aux losses are whole-batch values. Errors: ``ValueError`` when the mesh lacks a named dimension (the
name given and the names present), when ``num_experts`` is not divisible by the ``ep`` size, when a
hidden dim is not divisible by the ``tp`` size, or when the module is already parallelised;
``TypeError`` for a module that is neither ``MoE`` nor ``GroupedExperts``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from moe_torch.balancing import load_balance_loss, sum_over_group
from moe_torch.experts import GroupedExperts
from moe_torch.feed_forward import FeedForward
from moe_torch.moe import MoE

__all__ = ["ExpertParallel", "TensorParallel", "ExpertTensorParallel", "all_reduce_dense_grads", "token_group",
           "mesh_dim_size"]


# ------------------------------------------------------------------------ autograd-aware collectives
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward = the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_x = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_x, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_x, None, None, None


class _SumGradOver(torch.autograd.Function):
    """"f": identity forward, gradient summed over ``group`` (the input feeds a partial computation)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


# ------------------------------------------------------------------------------------ mesh helpers
def _dim_names(mesh: DeviceMesh) -> tuple[str, ...]:
    return tuple(mesh.mesh_dim_names or ())


def mesh_dim_size(mesh: DeviceMesh, name: str, style: str = "parallel style") -> int:
    """Size of the mesh dimension ``name``; ``ValueError`` naming ``name`` and the names present."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{style} needs a DeviceMesh, got {type(mesh).__name__}")
    names = _dim_names(mesh)
    if name not in names:
        raise ValueError(f"{style}: the device mesh has no dimension named {name!r}; its dimensions are "
                         f"{names if names else 'unnamed'} (shape {tuple(mesh.shape)}); build it with "
                         f"init_device_mesh(..., mesh_dim_names=(..., {name!r}, ...))")
    return mesh.size(names.index(name))


def token_group(mesh: DeviceMesh, tp_dim: str = "tp"):
    """The process group over which tokens differ: the mesh's one dimension other than ``tp_dim``.

    This is the group for ``update_expert_bias(moe, lr, group=...)`` and ``all_reduce_dense_grads``.
    Returns None for a mesh that only has ``tp_dim`` (all ranks see the same tokens).
    Raises ``ValueError`` when more than one dimension is left (flatten them into one first).
    """
    dims = [n for n in _dim_names(mesh) if n != tp_dim]
    if not dims:
        return None
    if len(dims) > 1:
        raise ValueError(f"token_group: mesh dimensions {dims} all hold different tokens; pass a mesh with one "
                         f"such dimension (e.g. flatten dp and ep into one)")
    return mesh.get_group(dims[0])


def _placements(mesh: DeviceMesh, shard: dict[str, int]):
    """One placement per mesh dim: ``Shard(shard[name])`` for the named dims, ``Replicate()`` elsewhere."""
    return [Shard(shard[n]) if n in shard else Replicate() for n in _dim_names(mesh)]


def _distributed_param(p: nn.Parameter, mesh: DeviceMesh, placements, src_data_rank) -> nn.Parameter:
    """``p`` as a DTensor parameter (``src_data_rank=None``: each rank keeps its own copy's shard)."""
    dt = distribute_tensor(p.data, mesh, placements, src_data_rank=src_data_rank)
    return nn.Parameter(dt, requires_grad=p.requires_grad)


def _check_plain(module: nn.Module, style: str) -> None:
    for name, p in module.named_parameters():
        if isinstance(p, DTensor):
            raise ValueError(f"{style}: parameter {name!r} is already a DTensor ({p.placements}); "
                             f"parallelise a module only once")


def _check_divisible(what: str, value: int, dim: str, size: int, style: str) -> None:
    if value % size:
        raise ValueError(f"{style}: {what}={value} is not divisible by the {dim!r} mesh size {size}")


# -------------------------------------------------------------------------------- token exchange
def _expert_major(recv_counts: torch.Tensor) -> torch.Tensor:
    """Row permutation taking received rows from [source rank][local expert] to [local expert][source rank].

    recv_counts (ep, E_local) int64 -> perm (rows,) int64 with ``x_expert_major = x_received[perm]``.
    """
    ep, e_local = recv_counts.shape
    lens = recv_counts.reshape(-1)
    starts = torch.cumsum(lens, 0) - lens
    seg = torch.arange(ep * e_local, device=lens.device).view(ep, e_local).t().reshape(-1)
    lens_e, starts_e = lens[seg], starts[seg]
    row_seg = torch.repeat_interleave(torch.arange(seg.numel(), device=lens.device), lens_e)
    first_row = torch.cumsum(lens_e, 0) - lens_e
    return starts_e[row_seg] + torch.arange(row_seg.numel(), device=lens.device) - first_row[row_seg]


def _dispatch(x: torch.Tensor, counts: torch.Tensor, group, state: dict):
    """Send each routed row to the rank owning its expert. x (rows, D) expert-major, counts (E,).

    Returns (rows received (rows', D) expert-major over the local experts, local counts (E_local,)).
    NOTE: the split sizes go to the host (``tolist``): all_to_all_single takes Python lists.
    """
    ep = dist.get_world_size(group)
    with torch.no_grad():
        counts = counts.to(torch.int64)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=group)
        send_counts, recv_counts = counts.view(ep, -1), recv.view(ep, -1)
        in_splits, out_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        perm = _expert_major(recv_counts)
    received = _AllToAll.apply(x, out_splits, in_splits, group)
    state.update(in_splits=in_splits, out_splits=out_splits, perm=perm)
    return received[perm], recv_counts.sum(0)


def _combine(y: torch.Tensor, group, state: dict) -> torch.Tensor:
    """Inverse of ``_dispatch``: y (rows', D) expert-major -> (rows, D) in this rank's routed order."""
    perm = state.pop("perm")
    y = y.new_zeros(y.shape).index_copy(0, perm, y)  # back to [source rank][local expert]
    return _AllToAll.apply(y, state.pop("in_splits"), state.pop("out_splits"), group)


# ---------------------------------------------------------------------------------- aux losses
def _global_aux_losses(moe: MoE, x: torch.Tensor, aux: dict, group) -> None:
    """Replace ``aux``'s losses by those of the whole batch across ``group`` (in place).

    "switch" / z-loss: per-expert counts, summed router probabilities and summed squared
    log-sum-exps are summed over ``group`` (identity backward); "sequence": each rank holds whole
    sequences, so the global loss is the sum of ``local loss * local batch`` over ``group`` divided by the
    global batch. Formulas as ``moe_torch.balancing``.
    """
    cfg = moe.config
    if cfg.load_balance_loss is None and not cfg.router_z_loss_coeff > 0:
        return
    scores, selected = aux["scores"], aux["selected_experts"]
    n, k = selected.shape
    acc = scores.dtype
    size = torch.tensor([float(n), float(x.shape[0])], dtype=acc, device=scores.device)
    dist.all_reduce(size, group=group)
    n_all, bs_all = size[0], size[1]
    if cfg.load_balance_loss == "switch":
        with torch.no_grad():
            counts = torch.bincount(selected.reshape(-1), minlength=moe.num_experts).to(acc)
            dist.all_reduce(counts, group=group)
        probs = sum_over_group((scores / scores.sum(-1, keepdim=True)).sum(0), group)
        aux["load_balance_loss"] = (cfg.load_balance_coeff * moe.num_experts
                                    * ((counts / (n_all * k)) * (probs / n_all)).sum())
    elif cfg.load_balance_loss == "sequence":
        local = load_balance_loss(scores, selected, moe.num_experts, cfg.load_balance_coeff, "sequence",
                                  batch=x.shape[0])
        aux["load_balance_loss"] = sum_over_group(local * x.shape[0], group) / bs_all
    if cfg.router_z_loss_coeff > 0:
        lse2 = torch.logsumexp(aux["router_logits"].to(acc), dim=-1).square().sum()
        aux["router_z_loss"] = cfg.router_z_loss_coeff * sum_over_group(lse2, group) / n_all


# ------------------------------------------------------------------------------------ the styles
class _MoEParallel(ParallelStyle):
    """Shared machinery; subclasses set ``ep_dim`` / ``tp_dim`` (None when not used)."""

    ep_dim: str | None = None
    tp_dim: str | None = None

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = type(self).__name__
        if not isinstance(module, (MoE, GroupedExperts)):
            raise TypeError(f"{style} applies to a moe_torch.MoE or GroupedExperts, got {type(module).__name__}")
        _check_plain(module, style)
        experts = module.experts if isinstance(module, MoE) else module
        num_experts, hidden = experts.w1.shape[0], experts.w1.shape[1]
        ep = tp = 1
        if self.ep_dim is not None:
            ep = mesh_dim_size(device_mesh, self.ep_dim, style)
            _check_divisible("num_experts", num_experts, self.ep_dim, ep, style)
        if self.tp_dim is not None:
            tp = mesh_dim_size(device_mesh, self.tp_dim, style)
            _check_divisible("hidden_dim", hidden, self.tp_dim, tp, style)
            shared = module.shared_expert if isinstance(module, MoE) else None
            if isinstance(shared, FeedForward):
                _check_divisible("shared_hidden_dim", shared.w1.weight.shape[0], self.tp_dim, tp, style)
        # NOTE: a 1-D sub-mesh per used dim: DTensor placements then name only what this style shards.
        names = tuple(n for n in _dim_names(device_mesh) if n in (self.ep_dim, self.tp_dim))  # mesh order
        mesh = device_mesh if names == _dim_names(device_mesh) else device_mesh[names]
        ep_group = mesh.get_group(self.ep_dim) if self.ep_dim else None
        tp_group = mesh.get_group(self.tp_dim) if self.tp_dim else None
        self._shard_experts(experts, mesh, ep_group, tp_group)
        if isinstance(module, MoE):
            if tp_group is not None:
                self._tensor_parallel_dense(module, device_mesh[self.tp_dim] if device_mesh.ndim > 1
                                            else device_mesh, tp_group)
            if ep_group is not None:
                module.register_forward_hook(_aux_hook(ep_group), with_kwargs=True)
        return module

    # experts: DTensor weights + token exchange around GroupedExperts.forward(x, counts)
    def _shard_experts(self, experts: GroupedExperts, mesh: DeviceMesh, ep_group, tp_group) -> None:
        shard = {"w1": {}, "w2": {}, "w3": {}}
        for name, tp_axis in (("w1", 1), ("w2", 2), ("w3", 1)):
            if self.ep_dim:
                shard[name][self.ep_dim] = 0
            if self.tp_dim:
                shard[name][self.tp_dim] = tp_axis
        src = self.src_data_rank

        def partition(_name, mod, m):
            if mod is experts:
                for pname in ("w1", "w2", "w3"):
                    mod.register_parameter(pname, _distributed_param(getattr(mod, pname), m,
                                                                     _placements(m, shard[pname]), src))

        state: dict = {}

        def input_fn(_mod, inputs, _m):
            x, counts = inputs
            if ep_group is not None:
                x, counts = _dispatch(x, counts, ep_group, state)
            if tp_group is not None:
                x = _SumGradOver.apply(x, tp_group)
            return x, counts

        def output_fn(_mod, y, _m):
            if tp_group is not None:
                y = sum_over_group(y, tp_group)
            if ep_group is not None:
                y = _combine(y, ep_group, state)
            return y

        distribute_module(experts, mesh, partition, input_fn, output_fn)

    # router gate replicated over tp (gradient averaged), shared expert split like Megatron's MLP
    def _tensor_parallel_dense(self, moe: MoE, tp_mesh: DeviceMesh, tp_group) -> None:
        gate = moe.router.gate
        gate.weight = _distributed_param(gate.weight, tp_mesh, [Replicate()], self.src_data_rank)
        tp = dist.get_world_size(tp_group)

        @torch.no_grad()
        def average_over_tp(p):
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=tp_group)
            g.div_(tp)

        gate.weight.register_post_accumulate_grad_hook(average_over_tp)
        shared = moe.shared_expert
        if not isinstance(shared, FeedForward):
            return  # a user module (or None): computed whole, redundantly, on every TP rank
        for lin, axis in ((shared.w1, 0), (shared.w2, 1), (shared.w3, 0)):
            lin.weight = _distributed_param(lin.weight, tp_mesh, [Shard(axis)], self.src_data_rank)
        shared.register_forward_pre_hook(lambda _m, args: (_SumGradOver.apply(args[0], tp_group), *args[1:]))
        shared.register_forward_hook(lambda _m, _args, out: sum_over_group(out, tp_group))


def _aux_hook(group):
    def hook(module, args, kwargs, output):
        if isinstance(output, tuple):
            x = args[0] if args else kwargs["x"]
            _global_aux_losses(module, x.to_local() if isinstance(x, DTensor) else x, output[1], group)
        return output

    return hook


class ExpertParallel(_MoEParallel):
    """Expert parallelism over the mesh dimension ``ep_dim`` (default "ep").

    ``parallelize_module(moe, mesh, ExpertParallel())``: ``experts.w1/w2/w3`` become ``Shard(0)``
    DTensors over ``ep_dim`` (E/ep experts per rank); tokens are exchanged by ``all_to_all_single``
    (dropless, split sizes from exchanged counts) before the experts and back after them; the aux
    losses of an ``MoE`` become those of the whole batch across ``ep_dim``. The router and shared
    expert stay plain parameters (reduce their gradients with ``all_reduce_dense_grads``).
    Applied to a ``GroupedExperts`` only the experts are handled.
    Raises ``ValueError`` (missing mesh dim, ``num_experts % ep != 0``), ``TypeError`` (module kind).
    """

    def __init__(self, ep_dim: str = "ep"):
        super().__init__()
        self.ep_dim = ep_dim


class TensorParallel(_MoEParallel):
    """Tensor parallelism of every expert's hidden dim over the mesh dimension ``tp_dim`` (default "tp").

    ``w1``/``w3`` (E, H, D) ``Shard(1)``, ``w2`` (E, D, H) ``Shard(2)``; all TP ranks take the same
    tokens; expert outputs are summed over ``tp_dim`` (input gradient likewise). For an ``MoE``, the
    shared ``FeedForward`` is split the same way (``w1``/``w3.weight`` ``Shard(0)``, ``w2.weight``
    ``Shard(1)``) and the router gate is a ``Replicate()`` DTensor whose gradient is averaged over
    ``tp_dim`` after accumulation (it is already identical; the average keeps it bit-identical).
    Raises ``ValueError`` (missing mesh dim, ``hidden_dim`` or ``shared_hidden_dim`` % tp != 0).
    """

    def __init__(self, tp_dim: str = "tp"):
        super().__init__()
        self.tp_dim = tp_dim


class ExpertTensorParallel(_MoEParallel):
    """``ExpertParallel`` over ``ep_dim`` and ``TensorParallel`` over ``tp_dim`` together (2-D mesh).

    Expert weights ``[Shard(0), Shard(1)]`` (w1, w3) / ``[Shard(0), Shard(2)]`` (w2) over (ep, tp);
    a rank exchanges tokens with the ranks of its ``tp`` index along ``ep``. Raises as both.
    """

    def __init__(self, ep_dim: str = "ep", tp_dim: str = "tp"):
        super().__init__()
        self.ep_dim, self.tp_dim = ep_dim, tp_dim


# -------------------------------------------------------------------------- gradient reduction
@torch.no_grad()
def all_reduce_dense_grads(module: nn.Module, group) -> None:
    """Sum the gradients of every non-expert parameter over ``group`` (the data-parallel / ``ep`` ranks).

    Under EP each rank's router and shared-expert gradients hold only its own tokens' share; their sum
    over ``group`` is the gradient of the whole batch (``token_group(mesh)`` gives the group). Parameters
    of ``GroupedExperts`` are skipped: the all-to-all backward already summed every rank's tokens into
    them, so reducing them again (or averaging) would scale them by the ``ep`` size. Parameters
    without a gradient are skipped. ``group=None`` does nothing.
    """
    if group is None:
        return
    skip = {id(p) for m in module.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    for p in module.parameters():
        if id(p) in skip or p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
