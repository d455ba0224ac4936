"""Expert, tensor and expert-tensor parallelism for ``moe_torch.MoE`` on torch.distributed + DTensor.

Three ``ParallelStyle``s for ``torch.distributed.tensor.parallel.parallelize_module`` (the design of
torchtitan's ``distributed/expert_parallel.py``, written anew): the expert weights become DTensors,
tokens travel between ranks by ``all_to_all_single`` around ``GroupedExperts.forward(x, counts)``, and
everything else runs on plain local tensors. A fourth, ``DataParallel``, and ``fully_shard_moe``
(FSDP2 with the expert-data-parallel split of torchtitan) add data-parallel dims next to them.

Mesh dimensions (names are arguments; defaults "dp", "ep" and "tp"):

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
- ``dp`` (data parallel, ``dp_dim`` of the styles and ``DataParallel``): ranks along ``dp`` hold other
  tokens and the same experts. The aux losses are then whole-batch values across ``dp`` x ``ep``.
- Gradients of the *dense* parameters (router gate, shared expert) on a token-parallel rank are that
  rank's share; expert gradients already hold every ``ep`` rank's tokens but only this ``dp`` rank's.
  So dense gradients are summed over ``dp`` x ``ep`` (``token_group(mesh)``) and expert gradients over
  ``dp`` only (``expert_data_mesh(mesh)``): ``fully_shard_moe`` (FSDP2, reduce-scatter with divide
  factor 1) or ``all_reduce_dense_grads(moe, group, expert_group)`` (plain all-reduce) do this.
- ``moe_torch.update_expert_bias(moe, lr, group=...)`` sums ``tokens_per_expert`` over ``group`` (pass
  ``token_group(mesh)``, the ``dp`` x ``ep`` ranks) so every rank computes the same ``expert_bias``.

Inputs: ``moe(x)`` with x (bs, slen, D) a plain tensor holding this rank's tokens (different along
``ep``, identical along ``tp``); ``out`` and the aux tensors are this rank's (``tokens_per_expert``
counts its own tokens), only the aux losses are whole-batch values. Errors: ``ValueError`` when the mesh lacks a named dimension (the
name given and the names present), when ``num_experts`` is not divisible by the ``ep`` size, when a
hidden dim is not divisible by the ``tp`` size, or when the module is already parallelised;
``TypeError`` for a module that is neither ``MoE`` nor ``GroupedExperts``.
"""

from __future__ import annotations

import sys

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

__all__ = ["ExpertParallel", "TensorParallel", "ExpertTensorParallel", "DataParallel", "all_reduce_dense_grads",
           "fully_shard_moe", "token_group", "token_mesh", "expert_data_mesh", "mesh_dim_size"]


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


def token_mesh(mesh: DeviceMesh, tp_dim: str = "tp") -> DeviceMesh | None:
    """The 1-D mesh of the ranks holding different tokens: every dimension of ``mesh`` but ``tp_dim``
    (e.g. "dp" and "ep"), flattened in mesh order (``DeviceMesh._flatten``, as torchtitan's
    ``dp_shard_cp``; named by joining the names with "_"). None when only ``tp_dim`` is left."""
    dims = tuple(n for n in _dim_names(mesh) if n != tp_dim)
    if not dims:
        return None
    if len(dims) == 1:
        return mesh if mesh.ndim == 1 else mesh[dims[0]]
    return mesh[dims]._flatten("_".join(dims))


def token_group(mesh: DeviceMesh, tp_dim: str = "tp"):
    """The process group over which tokens differ: all dimensions of ``mesh`` other than ``tp_dim``
    (``token_mesh``; dp and ep together on a dp x ep mesh).

    This is the group for ``update_expert_bias(moe, lr, group=...)`` and ``all_reduce_dense_grads``:
    every rank that routed different tokens of the global batch. Returns None for a mesh that only
    has ``tp_dim`` (all ranks see the same tokens).
    """
    sub = token_mesh(mesh, tp_dim)
    return None if sub is None else sub.get_group()


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
    NOTE: the split sizes go to the host (``tolist``): all_to_all_single takes Python lists. This is
    the host sync of the sharded layer (one per forward here, and ``_combine`` reuses the lists):
    under ``torch.compile`` dynamo breaks the graph at it and at the exchanges that take the lists,
    so the sharded layer compiles with ``fullgraph=False`` only (tests/torch/test_compile.py).
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
    # (6a) with capacity_stats="kept" the loss counts the kept slots only (still over N*k)
    kept = aux.get("kept_slots") if cfg.capacity_stats == "kept" else None
    if cfg.load_balance_loss == "switch":
        with torch.no_grad():
            counted = selected.reshape(-1) if kept is None else selected[kept]
            counts = torch.bincount(counted, minlength=moe.num_experts).to(acc)
            dist.all_reduce(counts, group=group)
        probs = sum_over_group((scores / scores.sum(-1, keepdim=True)).sum(0), group)
        aux["load_balance_loss"] = (cfg.load_balance_coeff * moe.num_experts
                                    * ((counts / (n_all * k)) * (probs / n_all)).sum())
    elif cfg.load_balance_loss == "sequence":
        local = load_balance_loss(scores, selected, moe.num_experts, cfg.load_balance_coeff, "sequence",
                                  batch=x.shape[0], kept=kept)
        aux["load_balance_loss"] = sum_over_group(local * x.shape[0], group) / bs_all
    if cfg.router_z_loss_coeff > 0:
        lse2 = torch.logsumexp(aux["router_logits"].to(acc), dim=-1).square().sum()
        aux["router_z_loss"] = cfg.router_z_loss_coeff * sum_over_group(lse2, group) / n_all


# ------------------------------------------------------------------------------------ the styles
class _MoEParallel(ParallelStyle):
    """Shared machinery; subclasses set ``ep_dim`` / ``tp_dim`` / ``dp_dim`` (None when not used)."""

    ep_dim: str | None = None
    tp_dim: str | None = None
    dp_dim: str | tuple[str, ...] | None = None

    def _dp_dims(self) -> tuple[str, ...]:
        return () if self.dp_dim is None else (self.dp_dim,) if isinstance(self.dp_dim, str) else tuple(self.dp_dim)

    def _token_group(self, device_mesh: DeviceMesh, style: str):
        """The group of the aux losses: the ``dp_dim`` and ``ep_dim`` ranks (all that hold different tokens)."""
        for d in self._dp_dims():
            mesh_dim_size(device_mesh, d, style)
        dims = tuple(n for n in _dim_names(device_mesh) if n in (*self._dp_dims(), self.ep_dim))
        if not dims:
            return None
        return token_mesh(device_mesh[dims] if dims != _dim_names(device_mesh) else device_mesh, "").get_group()

    @staticmethod
    def _mark_aux(module: nn.Module, style: str) -> None:
        if getattr(module, "_moe_parallel_aux", None):
            raise ValueError(f"{style}: the whole-batch aux losses of this module are already set up by "
                             f"{module._moe_parallel_aux}; apply one style per module")
        module._moe_parallel_aux = style

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = type(self).__name__
        if not isinstance(module, (MoE, GroupedExperts)):
            raise TypeError(f"{style} applies to a moe_torch.MoE or GroupedExperts, got {type(module).__name__}")
        _check_plain(module, style)
        aux_group = self._token_group(device_mesh, style)
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
            if aux_group is not None:
                self._mark_aux(module, style)
                module.register_forward_hook(_aux_hook(aux_group), with_kwargs=True)
        return module

    # experts: DTensor weights + token exchange around GroupedExperts.forward(x, counts)
    def _shard_experts(self, experts: GroupedExperts, mesh: DeviceMesh, ep_group, tp_group) -> None:
        if experts.expert_proj_bias:  # NOTE: b1/b2/b3 are not sharded (nor b2 kept off the TP partial sums) yet
            raise ValueError("expert_proj_bias=True (experts.b1/b2/b3) is not supported by the parallel styles yet")
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
    Applied to a ``GroupedExperts`` only the experts are handled. ``dp_dim`` (a mesh dim name or a
    tuple of them, e.g. "dp") names data-parallel dims next to ``ep_dim``: their ranks hold other
    tokens and the same experts, and the aux losses become those of the whole batch across
    ``dp_dim`` x ``ep_dim`` (shard the parameters over ``dp_dim`` with ``fully_shard_moe``).
    Raises ``ValueError`` (missing mesh dim, ``num_experts % ep != 0``), ``TypeError`` (module kind).
    """

    def __init__(self, ep_dim: str = "ep", dp_dim: str | tuple[str, ...] | None = None):
        super().__init__()
        self.ep_dim, self.dp_dim = ep_dim, dp_dim


class TensorParallel(_MoEParallel):
    """Tensor parallelism of every expert's hidden dim over the mesh dimension ``tp_dim`` (default "tp").

    ``w1``/``w3`` (E, H, D) ``Shard(1)``, ``w2`` (E, D, H) ``Shard(2)``; all TP ranks take the same
    tokens; expert outputs are summed over ``tp_dim`` (input gradient likewise). For an ``MoE``, the
    shared ``FeedForward`` is split the same way (``w1``/``w3.weight`` ``Shard(0)``, ``w2.weight``
    ``Shard(1)``) and the router gate is a ``Replicate()`` DTensor whose gradient is averaged over
    ``tp_dim`` after accumulation (it is already identical; the average keeps it bit-identical).
    ``dp_dim``: data-parallel dims next to ``tp_dim`` (as ``ExpertParallel``): the aux losses become
    whole-batch values across them. Under ``fully_shard`` the averaging hook is not carried over to
    FSDP's parameters; the router gradient is then identical on the TP ranks by construction only.
    Raises ``ValueError`` (missing mesh dim, ``hidden_dim`` or ``shared_hidden_dim`` % tp != 0).
    """

    def __init__(self, tp_dim: str = "tp", dp_dim: str | tuple[str, ...] | None = None):
        super().__init__()
        self.tp_dim, self.dp_dim = tp_dim, dp_dim


class ExpertTensorParallel(_MoEParallel):
    """``ExpertParallel`` over ``ep_dim`` and ``TensorParallel`` over ``tp_dim`` together (2-D mesh).

    Expert weights ``[Shard(0), Shard(1)]`` (w1, w3) / ``[Shard(0), Shard(2)]`` (w2) over (ep, tp);
    a rank exchanges tokens with the ranks of its ``tp`` index along ``ep``; ``dp_dim`` as
    ``ExpertParallel``. Raises as both.
    """

    def __init__(self, ep_dim: str = "ep", tp_dim: str = "tp", dp_dim: str | tuple[str, ...] | None = None):
        super().__init__()
        self.ep_dim, self.tp_dim, self.dp_dim = ep_dim, tp_dim, dp_dim


class DataParallel(_MoEParallel):
    """Data parallelism over ``dp_dim`` (a mesh dim name or a tuple of them; default "dp") alone.

    Shards nothing (``fully_shard_moe`` or DDP does that); it makes the aux losses of an ``MoE``
    (``load_balance_loss``, ``router_z_loss``) those of the whole batch across ``dp_dim``, as
    ``ExpertParallel`` does across ``ep``, so the gradients summed over ``dp_dim`` are those of one
    device on the concatenated batch. With ``ep``/``tp`` on the mesh use their style's ``dp_dim``.
    Raises ``ValueError`` (missing mesh dim, set up twice), ``TypeError`` (not an ``MoE``).
    """

    def __init__(self, dp_dim: str | tuple[str, ...] = "dp"):
        super().__init__()
        self.dp_dim = dp_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = type(self).__name__
        if not isinstance(module, MoE):
            raise TypeError(f"{style} applies to a moe_torch.MoE, got {type(module).__name__}")
        group = self._token_group(device_mesh, style)
        self._mark_aux(module, style)
        module.register_forward_hook(_aux_hook(group), with_kwargs=True)
        return module


# -------------------------------------------------------------------------- gradient reduction
def expert_data_mesh(mesh: DeviceMesh, ep_dim: str = "ep", tp_dim: str = "tp") -> DeviceMesh | None:
    """The expert-data-parallel ranks: the 1-D mesh of every dim but ``ep_dim`` and ``tp_dim``
    (flattened in mesh order), i.e. the ranks holding *the same experts* and different tokens
    (torchtitan's ``dp_shard_mod_ep`` / efsdp split of ``dp_shard``). None when there is none."""
    dims = tuple(n for n in _dim_names(mesh) if n not in (ep_dim, tp_dim))
    if not dims:
        return None
    return token_mesh(mesh[dims] if dims != _dim_names(mesh) else mesh, "")


def _is_fully_sharded(module: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in module.modules())


@torch.no_grad()
def all_reduce_dense_grads(module: nn.Module, group, expert_group=None) -> None:
    """Sum gradients over the ranks each parameter is replicated on (data parallelism without FSDP).

    Every non-expert parameter (router gate, shared expert) is summed over ``group``, all ranks that
    hold different tokens (``token_group(mesh)``: ``ep`` and any ``dp`` dims): each rank's gradient is
    only its own tokens' share, their sum the gradient of the whole batch. ``GroupedExperts``
    parameters are summed over ``expert_group`` only (``expert_data_mesh(mesh).get_group()``, the
    ``dp`` ranks holding the same experts; None: not at all): the all-to-all backward already summed
    every ``ep`` rank's tokens into them, so a reduction over ``ep`` would count them ``ep`` times.
    Sums, never means (the gradient of the sum of the ranks' losses). Parameters without a
    gradient are skipped; ``group=None`` skips the dense ones.
    Raises ``ValueError`` for a module under ``fully_shard``: FSDP reduces its gradients itself
    (``fully_shard_moe``), and reducing them here as well would count them twice.
    """
    if _is_fully_sharded(module):
        raise ValueError("all_reduce_dense_grads: the module is under fully_shard (FSDP2), which already "
                         "reduced its gradients (see fully_shard_moe); reducing them again would count them twice")
    experts = {id(p) for m in module.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    for p in module.parameters():
        g = None if p.grad is None else p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        target = expert_group if id(p) in experts else group
        if g is not None and target is not None:
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=target)


REDUCTIONS = ("sum", "mean")


def fully_shard_moe(moe: MoE, device_mesh: DeviceMesh, dp_dim: str | tuple[str, ...] = "dp", ep_dim: str = "ep",
                    tp_dim: str = "tp", reduce: str = "sum", **fsdp_kwargs) -> MoE:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) for an ``MoE`` on a mesh with data-parallel dims.

    Call it after the parallel style (``ExpertParallel(dp_dim=...)``, ``TensorParallel(dp_dim=...)``,
    ``ExpertTensorParallel(dp_dim=...)`` or ``DataParallel()`` for a mesh of ``dp_dim`` only), as
    torchtitan's ``apply_fsdp`` does for its MoE blocks:

    - ``moe.experts`` is sharded over the expert-data-parallel ranks (``expert_data_mesh``: the mesh
      minus ``ep_dim`` and ``tp_dim``): with ``ep`` its ``E / ep`` local experts are split again over
      ``dp`` (``_StridedShard`` placements), its gradient reduce-scattered over ``dp`` only;
    - the rest (router gate, shared expert) is sharded over every token-parallel rank
      (``token_mesh``: ``dp`` x ``ep`` flattened), its gradient reduce-scattered over all of them.

    ``reduce`` sets both groups' gradient divide factor (``set_gradient_divide_factor``):
    "sum" (factor 1, default) gives the gradient of the *sum* of the ranks' losses, which with a
    per-rank loss summed over its tokens is the single-device gradient of the whole batch (what
    ``moe-parity run --mesh dp=2xep=2`` checks); "mean" divides both by the token-parallel size
    (``dp * ep``; for a per-rank mean loss). NOTE: FSDP's default would divide the expert
    gradients by ``dp`` and the rest by ``dp * ep``, scaling the experts ``ep`` times too high.
    The whole-batch aux losses are on every rank, each rank's backward its share: with "mean",
    multiply them by ``dp * ep`` to keep their weight. Collectives use SUM only
    (``set_force_sum_reduction_for_comms``: gloo has no PREMUL_SUM). ``fsdp_kwargs`` go to
    ``fully_shard`` (``reshard_after_forward``, ``mp_policy``, ...). Returns ``moe``.

    Raises ``ValueError`` for a missing ``dp_dim``, an unknown ``reduce``, a mesh with ``ep_dim``
    whose experts are not yet sharded by ``ExpertParallel``; ``TypeError`` for a non-``MoE``.
    """
    from torch.distributed.fsdp import fully_shard

    if not isinstance(moe, MoE):
        raise TypeError(f"fully_shard_moe applies to a moe_torch.MoE, got {type(moe).__name__}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"fully_shard_moe: reduce={reduce!r} is not one of {REDUCTIONS}")
    names = _dim_names(device_mesh)
    for d in (dp_dim,) if isinstance(dp_dim, str) else dp_dim:
        mesh_dim_size(device_mesh, d, "fully_shard_moe")
    if ep_dim in names and not isinstance(moe.experts.w1, DTensor):
        raise ValueError(f"fully_shard_moe: the mesh has {ep_dim!r} but the experts are plain tensors; apply "
                         f"ExpertParallel(dp_dim=...) (parallelize_module) first")
    if not getattr(moe, "_moe_parallel_aux", None):
        raise ValueError("fully_shard_moe: apply a style with the data-parallel dims first (ExpertParallel(dp_dim="
                         "...), TensorParallel(dp_dim=...) or DataParallel()), so the aux losses are whole-batch")
    expert_mesh = expert_data_mesh(device_mesh, ep_dim, tp_dim)
    dense_mesh = token_mesh(device_mesh, tp_dim)
    fully_shard(moe.experts, mesh=expert_mesh, **fsdp_kwargs)
    fully_shard(moe, mesh=dense_mesh, **fsdp_kwargs)
    factor = 1.0 if reduce == "sum" else float(dense_mesh.size())
    for m in (moe.experts, moe):
        m.set_gradient_divide_factor(factor)
        m.set_force_sum_reduction_for_comms(True)
    return moe
