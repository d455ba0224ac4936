"""The MoE layer: router, dispatch, experts, combine, shared expert (DESIGN.md steps 1-9)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_torch.balancing import load_balance_loss, router_z_loss
from moe_torch.capacity import drop_tokens, run_experts
from moe_torch.experts import GroupedExperts
from moe_torch.feed_forward import FeedForward, dtensor_class, is_dtensor, local_tensor
from moe_torch.norm import RMSNorm
from moe_torch.router import TokenChoiceTopKRouter
from moe_torch.weights import check_state_dict
from parity.config import BALANCE_FROM_COEFF, CAPACITY_FIELDS, TORCH_KERNELS, MoEConfig, layer_config

_FLOAT32_BUFFERS = ("expert_bias", "tokens_per_expert")


# ------------------------------------------------------------------------------ dispatch / combine
def _slot_rows(inverse: torch.Tensor, k: int) -> torch.Tensor:
    """(k, N) int64: row ``[j, n]`` is the sorted row holding slot j of token n (``inverse`` (N*k,))."""
    return inverse.view(-1, k).t().contiguous()


def _chunked_on(t: torch.Tensor) -> bool:
    """Whether dispatch / combine run chunk by chunk for ``t``: eagerly on CPU (where fresh large buffers
    are page-faulted in on every call and mixed-dtype ops take a scalar path); not on accelerators, and
    not under torch.compile, where inductor fuses the unchunked expressions. Both give the same bits."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


#: rows per chunk when low-precision rows are scaled through float32 on CPU (8 MiB at D=1024)
_SCALE_CHUNK = 2048


def _scale_rows_(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``rows`` (M, D) any float dtype times ``scale`` (M,), in place: each product in float32 (float64
    for float64 rows), rounded once to ``rows.dtype``, the bits of ``(rows.float() * scale).to(dtype)``.

    NOTE: bf16/fp16 rows on CPU go chunk by chunk through a float32 copy: a mixed-dtype in-place
    ``mul_`` takes PyTorch's scalar CPU path (measured for 65536 x 1024 bf16 rows: 300-590 ms, against
    17 ms chunked; the same bits). Under torch.compile inductor fuses the one expression instead.
    """
    acc = torch.promote_types(rows.dtype, torch.float32)
    scale = scale.to(acc).unsqueeze(-1)
    if rows.dtype == acc or rows.device.type != "cpu":
        return rows.mul_(scale)
    if not _chunked_on(rows):
        return rows.copy_(rows.to(acc) * scale)
    for start in range(0, rows.shape[0], _SCALE_CHUNK):
        chunk = rows[start:start + _SCALE_CHUNK]
        chunk.copy_(chunk.to(acc).mul_(scale[start:start + _SCALE_CHUNK]))
    return rows


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` of axis 0 (``inverse[perm] == arange``).

    NOTE: the gradient is the inverse gather ``g[inverse]``, not the accumulating ``index_put`` autograd
    derives for an index (a scatter-add: slower, and not deterministic on CUDA).
    """

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g[inverse], None, None


def _gather_backward_chunked(g: torch.Tensor, tokens: torch.Tensor | None, scale: torch.Tensor | None,
                             order: torch.Tensor, inverse: torch.Tensor, k: int, need_tokens: bool,
                             need_scale: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``_GatherTokens.backward`` on CPU, in chunks of rows (then of tokens): the same float32 products,
    row sums and j = 0..k-1 sums as the unchunked code below it (the same bits), with no mixed-dtype
    op (bf16 * float32 takes the scalar CPU path) and no fresh (N*k, D) float32 buffer.
    Returns ``(dtokens (N, D) g.dtype or None, dscale (N*k,) float32/float64 or None)``."""
    acc = torch.promote_types(g.dtype, torch.float32)
    rows = g.shape[0]
    dscale = g.new_empty(rows, dtype=acc) if scale is not None and need_scale else None
    gs = g
    if scale is not None:
        gs, scale = torch.empty_like(g), scale.to(acc)
        for start in range(0, rows, _SCALE_CHUNK):
            stop = min(start + _SCALE_CHUNK, rows)
            gc = g[start:stop].to(acc, copy=True)
            if dscale is not None:
                dscale[start:stop] = (gc * tokens[order[start:stop] // k].to(acc)).sum(-1)
            gs[start:stop] = gc.mul_(scale[start:stop, None])
    if not need_tokens:
        return None, dscale
    slot_rows = _slot_rows(inverse, k)
    n = slot_rows.shape[1]
    dtokens = g.new_empty((n, g.shape[-1]))
    for start in range(0, n, _COMBINE_CHUNK):
        stop = min(start + _COMBINE_CHUNK, n)
        total = gs.index_select(0, slot_rows[0, start:stop]).to(acc)
        for j in range(1, k):
            total.add_(gs.index_select(0, slot_rows[j, start:stop]).to(acc))
        dtokens[start:stop] = total
    return dtokens, dscale


class _GatherTokens(torch.autograd.Function):
    """``tokens[order // k]``: each sorted row's token, (N, D) -> (N*k, D), optionally scaled by a
    per-row weight in float32 (float64 for float64 tokens) and cast back to the tokens' dtype.

    NOTE: gradient by the inverse gather and a sum over each token's k slots, not by a scatter-add.
    Nothing of size N*k is saved: the weight gradient re-gathers the rows from ``tokens`` (autograd
    through ``rows.float() * w`` would keep a float32 copy of every routed row).
    """

    @staticmethod
    def forward(ctx, tokens, scale, order, inverse, k):
        rows = tokens[order // k]
        if scale is not None:
            # NOTE: in place on the fresh gather: TensorIterator multiplies in the promoted dtype (float32)
            # and rounds once to the tokens' dtype, the bits of ``(rows.float() * scale).to(dtype)``
            # without a float32 copy of every routed row (measured: 23% of the bf16 layer's forward)
            _scale_rows_(rows, scale)
        ctx.k = k
        ctx.save_for_backward(tokens if scale is not None and ctx.needs_input_grad[1] else None,
                              scale, order, inverse)
        return rows

    @staticmethod
    def backward(ctx, g):
        tokens, scale, order, inverse = ctx.saved_tensors
        if _chunked_on(g):
            return (*_gather_backward_chunked(g, tokens, scale, order, inverse, ctx.k, ctx.needs_input_grad[0],
                                              ctx.needs_input_grad[1]), None, None, None)
        dtokens = dscale = None
        acc = torch.promote_types(g.dtype, torch.float32)
        gs = g
        if scale is not None:
            gf = g.to(acc, copy=True)  # one float32 copy for both products (multiplied in place below)
            if ctx.needs_input_grad[1]:
                dscale = (gf * tokens[order // ctx.k]).sum(-1)  # the product promotes to float32
            gs = gf.mul_(scale.unsqueeze(-1).to(acc)).to(g.dtype)
        if ctx.needs_input_grad[0]:  # sum over each token's k slots, one slot at a time (no (N*k, D) copy)
            slot_rows = _slot_rows(inverse, ctx.k)
            dtokens = gs.index_select(0, slot_rows[0]).to(acc)  # accumulate as .sum does, round once
            for j in range(1, ctx.k):
                dtokens.add_(gs.index_select(0, slot_rows[j]))
            dtokens = dtokens.to(g.dtype)
        return dtokens, dscale, None, None, None


#: tokens per chunk of the CPU combine (2 MiB of float32 at D=1024: the chunk stays in cache)
_COMBINE_CHUNK = 512


def _combine_chunked(y: torch.Tensor, weights: torch.Tensor | None, slot_rows: torch.Tensor,
                     acc: torch.dtype) -> torch.Tensor:
    """(8) on CPU, ``_COMBINE_CHUNK`` tokens at a time: the same products and the same j = 0..k-1 sum per
    token as the loop in ``_Combine.forward`` (the same bits), with every temporary small enough to stay
    in cache instead of a fresh (N, D) buffer per slot. Measured for N=8192, k=8, D=1024: 0.27 s ->
    0.04-0.05 s in bf16, 0.26 s -> 0.08-0.09 s in float32."""
    k, n = slot_rows.shape
    out = torch.empty((n, y.shape[-1]), dtype=acc, device=y.device)
    for start in range(0, n, _COMBINE_CHUNK):
        stop = min(start + _COMBINE_CHUNK, n)
        total = None
        for j in range(k):
            term = y.index_select(0, slot_rows[j, start:stop]).to(acc)
            if weights is not None:
                term.mul_(weights[start:stop, j:j + 1])
            total = term if total is None else total.add_(term)
        out[start:stop] = total
    return out


class _Combine(torch.autograd.Function):
    """(8) ``out[n] = sum_j weights[n, j] * y[inverse[n * k + j]]`` in float32 (float64 for float64 y):
    y (N*k, D) expert-major in any float dtype, weights (N, k) float32/float64 or None (all ones),
    inverse (N*k,) the sorted row of each flat slot.

    NOTE: one slot at a time (an (N, D) gather, its product and a running sum over j = 0..k-1, the
    order of ``.sum(1)``), so no (N*k, D) copy is made: on CPU every fresh buffer above 32 MiB is
    page-faulted in again on each call (65536 faults per 256 MiB; measured, the layer's forward took
    8% less in float32 and 10% less in bf16 than with the (N*k, D) copy). The gradient writes each
    routed row once (``index_copy_`` on a permutation: deterministic). y is saved in its own dtype.
    """

    @staticmethod
    def forward(ctx, y, weights, inverse, k):
        acc = torch.promote_types(y.dtype, torch.float32)
        slot_rows = _slot_rows(inverse, k)
        out = None
        if _chunked_on(y):
            out = _combine_chunked(y, weights, slot_rows, acc)
        for j in range(k if out is None else 0):
            term = y.index_select(0, slot_rows[j])
            if weights is None:
                term = term.to(acc)
            elif term.dtype == acc:
                term.mul_(weights[:, j:j + 1])
            else:  # bf16 * float32 promotes: the float32 products in one pass
                term = term * weights[:, j:j + 1]
            out = term if out is None else out.add_(term)
        ctx.k, ctx.y_dtype = k, y.dtype
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, weights, slot_rows)
        return out

    @staticmethod
    def backward(ctx, g):
        y, weights, slot_rows = ctx.saved_tensors
        dy = dw = None
        if ctx.needs_input_grad[0]:
            dy = g.new_empty((slot_rows.numel(), g.shape[-1]), dtype=ctx.y_dtype)
            for j in range(ctx.k):
                gj = g if weights is None else g * weights[:, j:j + 1]
                dy.index_copy_(0, slot_rows[j], gj.to(ctx.y_dtype))
        if ctx.needs_input_grad[1]:
            dw = torch.stack([(g * y.index_select(0, slot_rows[j])).sum(-1) for j in range(ctx.k)], dim=1)
        return dy, dw, None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` along axis 0 for a permutation ``perm`` (int64 (M,), ``inverse[perm] == arange(M)``);
    x (M, ...) -> (M, ...). Differentiable in x (gradient ``g[inverse]``)."""
    return _PermuteRows.apply(x, perm, inverse)


def gather_tokens(tokens: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """``tokens[order // k]``: tokens (N, D) -> routed rows (N*k, D) in expert-major ``order`` (int64
    (N*k,), ``inverse`` its inverse), each times ``scale`` (N*k,) float32 if given (the product in
    float32, cast to the tokens' dtype). Differentiable in tokens and scale."""
    return _GatherTokens.apply(tokens, scale, order, inverse, k)


def combine_slots(y: torch.Tensor, weights: torch.Tensor | None, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's k expert outputs, weighted and summed: y (N*k, D) expert-major, any float dtype;
    weights (N, k) or None; inverse (N*k,) int64 (sorted row of each flat slot) -> (N, D) float32
    (float64 for float64 y). Differentiable in y and weights."""
    return _Combine.apply(y, weights, inverse, k)


def _router_option(name: str) -> property:
    def get(self):
        return getattr(self.router, name)

    def set_(self, value):
        setattr(self.router, name, value)  # validated by the router

    return property(get, set_, doc=f"The router's ``{name}``; assigning it re-validates the routing options.")


def _fixed(name: str, get) -> property:
    def set_(self, value):
        raise AttributeError(f"{name}={get(self)} is fixed by the weights' shapes; cannot set it to {value!r}: "
                             f"build a new MoE")

    return property(get, set_, doc=f"``{name}``, fixed at construction (read-only).")


# options held by the MoE itself; assigning one is validated as ``MoEConfig`` validates it
_LAYER_OPTIONS = ("score_before_experts", "use_expert_bias", "load_balance_loss", "router_z_loss_coeff")


class MoE(nn.Module):
    """Token-choice top-k Mixture-of-Experts layer with optional shared expert.

    The positional arguments are the original PyTorch module's (``dim, hidden_dim, num_experts,
    top_k=1, score_before_experts=True, load_balance_coeff=None, shared_expert=None,
    router_kwargs=None, use_grouped_mm=False``); every other field of ``parity.config.MoEConfig`` is a
    keyword. A field passed explicitly always wins, so ``MoE(**cfg.to_kwargs())`` builds ``cfg``; a
    field not given gets the original's behaviour (``parity.config.layer_config``): ``expert_bias``
    steers selection (``use_expert_bias=True``), ``route_order="scale_first"``, and
    ``load_balance_coeff`` a number turns the "switch" loss on (None: no loss).

    - ``router_kwargs``: a dict of router options (``parity.config.ROUTER_KWARGS``) merged over the
      keywords (the dict wins); another key is a ``ValueError``.
    - ``shared_expert``: an ``nn.Module`` used as the shared expert (it sees every token, input
      (N, D) -> (N, D)), or None. Passing one together with ``num_shared_experts > 0`` is a ``ValueError``.
    - ``use_grouped_mm``: when ``expert_kernel`` is not given, True -> "grouped_mm", False (default)
      -> "loop" (the original's for-loop); True also turns ``expert_kernel="auto"`` into "grouped_mm",
      keeps "grouped_mm" / "npu", and with "loop" is a ``ValueError``.
    - ``expert_kernel``: one of ``parity.config.TORCH_KERNELS`` ("auto", "loop", "grouped_mm", "npu").
    - ``sequence_partition_group``: a ``torch.distributed`` process group over which every sequence
      of the batch is split (context parallelism), or None: the balance loss is then that of the
      whole sequences (``moe_torch.balancing.load_balance_loss(group=...)``).

    Invalid values raise ``ValueError`` naming the field, the value and what is allowed.

    Attributes (the original's and the config's) are live: ``top_k``, ``score_func``, ``route_norm``,
    ``route_scale``, ``num_expert_groups``, ``num_limited_groups``, ``group_score``, ``route_order``
    (the router's), ``expert_kernel`` / ``use_grouped_mm`` (the experts'), ``score_before_experts``,
    ``use_expert_bias``, ``load_balance_loss``, ``load_balance_coeff`` (None when no balance loss is
    on; assigning a number turns "switch" on when none was, None turns it off), ``router_z_loss_coeff``
    take effect when assigned, validated (``ValueError``); ``dim``, ``hidden_dim``, ``num_experts``,
    ``num_shared_experts``, ``shared_hidden_dim`` are fixed (``AttributeError``). ``config`` is the
    ``MoEConfig`` of the live attributes.

    Submodules / parameters (canonical names): ``router.gate`` (``router.gate.weight`` (E, D); with
    ``router_bias`` also ``router.gate.bias`` (E,)), ``experts.w1`` / ``w3`` (E, H, D), ``experts.w2``
    (E, D, H) (with ``expert_proj_bias`` also ``experts.b1`` / ``b3`` (E, H), ``experts.b2`` (E, D);
    ``expert_activation`` / ``swiglu_alpha`` / ``swiglu_limit`` choose the experts' gated activation,
    DESIGN.md step 7; these four are fixed at construction), ``shared_expert`` (FeedForward
    ``w1.weight`` (Hs, D), ``w2.weight`` (D, Hs), ``w3.weight`` (Hs, D)) or None, ``shared_expert_gate``
    (``nn.Linear(D, 1, bias=False)``: ``shared_expert_gate.weight`` (1, D), with ``shared_expert_gate=True``)
    or None; Gemma 4's ``router.scale`` (D,) (``router_input_norm``), ``router.per_expert_scale`` (E,)
    (``per_expert_scale``) and ``expert_input_norm`` (``moe_torch.norm.RMSNorm``: ``expert_input_norm.weight``
    (D,), with ``expert_input_norm=True``) or None. ``route_norm_p`` and ``input_norm_eps`` are live
    router options; the three Gemma 4 flags are fixed (they add parameters).
    Buffers (persistent, always float32 whatever ``.to(dtype)`` does): ``expert_bias`` (E,),
    ``tokens_per_expert`` (E,) = counts accumulated by training-mode forwards only.

    ``forward(x, return_aux=False, selected_experts=None)``:
        x: (bs, slen, D), the expert weights' dtype (float32, bfloat16, float16, float64); may be a
        DTensor not sharded on D (computed on its local shard, returned as a DTensor alike).
        selected_experts: optional (bs*slen, top_k) integer tensor replacing the top-k (step 4).
        kept_slots: optional (bs*slen, top_k) bool tensor replacing the drop decision of step 6a
        (only with ``capacity_factor`` / ``expert_capacity``; a ``ValueError`` on a dropless layer).
        With a capacity, ``aux`` also holds ``kept_slots`` (N, k) bool and ``routing_weights`` are the
        weights the combine uses (0 at dropped slots; ``moe_torch.capacity``).
        Returns out (bs, slen, D) in x's dtype, or ``(out, aux)`` with ``aux``: ``router_logits``
        (N, E) f32, ``scores`` (N, E) f32, ``selected_experts`` (N, k) int64, ``routing_weights``
        (N, k) f32, ``tokens_per_expert`` (E,) f32, and ``load_balance_loss`` / ``router_z_loss``
        (f32 scalars, differentiable) when enabled. With a balance loss on, ``out`` also carries it
        as ``out._load_balance_loss`` (the original's interface; the same tensor as in ``aux``).
        Router, combine and losses run in float32, or float64 for a float64 module (so float64
        matches the reference to ~1e-12).
        Raises ``ValueError`` for a wrong rank or last dim, ``TypeError`` for a dtype mismatch.
        Degenerate inputs (DESIGN.md): zero tokens (bs = 0 or slen = 0) give an empty ``out``, zero
        ``tokens_per_expert`` and losses exactly 0 (zero gradient). A token holding NaN is not checked:
        its scores are NaN, so it goes to experts 0..k-1 (NaN ranks last, ties to the lower index), is
        counted in ``tokens_per_expert`` and gives a NaN output row; other tokens are unaffected.

    Example::
        >>> moe = MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2)
        >>> out = moe(torch.randn(2, 16, 64))
        >>> out.shape
        torch.Size([2, 16, 64])
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int = 1,
                 score_before_experts: bool = True, load_balance_coeff: float | None = None,
                 shared_expert: nn.Module | None = None, router_kwargs: dict[str, Any] | None = None,
                 use_grouped_mm: bool = False, *, expert_kernel: str | None = None,
                 load_balance_loss: Any = BALANCE_FROM_COEFF, sequence_partition_group=None, **kwargs: Any):
        super().__init__()
        if not isinstance(use_grouped_mm, bool):
            raise ValueError(f"use_grouped_mm={use_grouped_mm!r} must be True or False")
        if expert_kernel is None:
            expert_kernel = "grouped_mm" if use_grouped_mm else "loop"
        elif use_grouped_mm and expert_kernel == "loop":
            raise ValueError(f"use_grouped_mm=True contradicts expert_kernel={expert_kernel!r}")
        elif use_grouped_mm and expert_kernel == "auto":
            expert_kernel = "grouped_mm"
        cfg = layer_config(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k,
                           score_before_experts=score_before_experts, load_balance_coeff=load_balance_coeff,
                           load_balance_loss=load_balance_loss, router_kwargs=router_kwargs,
                           expert_kernel=expert_kernel, **kwargs)
        if cfg.expert_kernel not in TORCH_KERNELS:
            raise ValueError(f"expert_kernel={cfg.expert_kernel!r} is not a moe_torch kernel; "
                             f"allowed: {TORCH_KERNELS}")
        if shared_expert is not None:
            if not isinstance(shared_expert, nn.Module):
                raise TypeError(f"shared_expert must be an nn.Module or None, got {type(shared_expert).__name__}")
            if cfg.num_shared_experts:
                raise ValueError(f"shared_expert given together with num_shared_experts={cfg.num_shared_experts}; "
                                 f"pass one or the other")
        self.router = TokenChoiceTopKRouter(
            cfg.dim, cfg.num_experts, cfg.top_k, cfg.score_func, cfg.num_expert_groups, cfg.num_limited_groups,
            cfg.route_scale, route_norm=cfg.route_norm, group_score=cfg.group_score, route_order=cfg.route_order,
            route_norm_eps=cfg.route_norm_eps, route_norm_mode=cfg.route_norm_mode, route_norm_p=cfg.route_norm_p,
            router_input_norm=cfg.router_input_norm, per_expert_scale=cfg.per_expert_scale,
            input_norm_eps=cfg.input_norm_eps, router_bias=cfg.router_bias)
        self.experts = GroupedExperts(cfg.dim, cfg.hidden_dim, cfg.num_experts, expert_kernel=cfg.expert_kernel,
                                      expert_activation=cfg.expert_activation, swiglu_alpha=cfg.swiglu_alpha,
                                      swiglu_limit=cfg.swiglu_limit, expert_proj_bias=cfg.expert_proj_bias)
        if shared_expert is None and cfg.num_shared_experts:
            shared_expert = FeedForward(cfg.dim, cfg.shared_dim)
        self.shared_expert = shared_expert
        # (9) Qwen2-MoE's per-token sigmoid gate on the shared expert (a Linear D -> 1), or None
        self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None
        # (6) Gemma 4's RMSNorm of the routed experts' input (``expert_input_norm.weight`` (D,)), or None
        self.expert_input_norm = RMSNorm(cfg.dim) if cfg.expert_input_norm else None
        self._shared = (cfg.num_shared_experts, cfg.shared_hidden_dim)
        self._balance_coeff = cfg.load_balance_coeff
        # (6a) capacity options, fixed at construction (None: dropless)
        self._capacity = {f: getattr(cfg, f) for f in CAPACITY_FIELDS}
        self._capacity_on = cfg.capacity_factor is not None or cfg.expert_capacity is not None
        self.sequence_partition_group = sequence_partition_group
        for name in _LAYER_OPTIONS:
            super().__setattr__(name, getattr(cfg, name))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32),
                             persistent=True)

    # ------------------------------------------------------------------ live options (one source of truth)
    dim = _fixed("dim", lambda self: self.router.gate.in_features)
    hidden_dim = _fixed("hidden_dim", lambda self: self.experts.w1.shape[1])
    num_experts = _fixed("num_experts", lambda self: self.router.num_experts)
    num_shared_experts = _fixed("num_shared_experts", lambda self: self._shared[0])
    shared_hidden_dim = _fixed("shared_hidden_dim", lambda self: self._shared[1])
    top_k = _router_option("top_k")
    score_func = _router_option("score_func")
    route_norm = _router_option("route_norm")
    route_scale = _router_option("route_scale")
    num_expert_groups = _router_option("num_expert_groups")
    num_limited_groups = _router_option("num_limited_groups")
    group_score = _router_option("group_score")
    route_order = _router_option("route_order")
    route_norm_eps = _router_option("route_norm_eps")
    route_norm_mode = _router_option("route_norm_mode")
    route_norm_p = _router_option("route_norm_p")
    input_norm_eps = _router_option("input_norm_eps")

    @property
    def expert_kernel(self) -> str:
        """The experts' kernel name (``GroupedExperts.expert_kernel``); assignable, validated."""
        return self.experts.expert_kernel

    @expert_kernel.setter
    def expert_kernel(self, value: str) -> None:
        self.experts.expert_kernel = value

    @property
    def use_grouped_mm(self) -> bool:
        """The original's flag (``GroupedExperts.use_grouped_mm``): True sets ``expert_kernel="grouped_mm"``,
        False "loop"; read, whether the kernel that runs is a grouped one."""
        return self.experts.use_grouped_mm

    @use_grouped_mm.setter
    def use_grouped_mm(self, value: bool) -> None:
        self.experts.use_grouped_mm = value

    @property
    def load_balance_coeff(self) -> float | None:
        """The balance loss's coefficient, None when no balance loss is on (the original's meaning)."""
        return None if self.load_balance_loss is None else self._balance_coeff

    @load_balance_coeff.setter
    def load_balance_coeff(self, value: float | None) -> None:
        if value is None:
            self.load_balance_loss = None
            return
        self.config.replace(load_balance_coeff=value)  # ValueError for a bad value
        self._balance_coeff = value
        if self.load_balance_loss is None:
            self.load_balance_loss = "switch"

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAYER_OPTIONS and name in self.__dict__:
            self.config.replace(**{name: value})  # ValueError naming the field and the value
        super().__setattr__(name, value)

    @property
    def config(self) -> MoEConfig:
        """The ``MoEConfig`` of the live attributes (``MoE(**moe.config.to_kwargs())`` builds the same layer,
        a user ``shared_expert`` module aside)."""
        r = self.router
        return MoEConfig(
            dim=self.dim, hidden_dim=self.hidden_dim, num_experts=self.num_experts, top_k=r.top_k,
            score_func=r.score_func, route_norm=r.route_norm, route_scale=r.route_scale,
            num_expert_groups=r.num_expert_groups, num_limited_groups=r.num_limited_groups,
            group_score=r.group_score, route_order=r.route_order, route_norm_eps=r.route_norm_eps,
            route_norm_mode=r.route_norm_mode, route_norm_p=r.route_norm_p, input_norm_eps=r.input_norm_eps,
            router_input_norm=r.router_input_norm, per_expert_scale=r.per_expert_scale is not None,
            expert_input_norm=self.expert_input_norm is not None,
            router_bias=r.gate.bias is not None, expert_activation=self.experts.expert_activation,
            swiglu_alpha=self.experts.swiglu_alpha, swiglu_limit=self.experts.swiglu_limit,
            expert_proj_bias=self.experts.expert_proj_bias,
            score_before_experts=self.score_before_experts,
            num_shared_experts=self.num_shared_experts, shared_hidden_dim=self.shared_hidden_dim,
            shared_expert_gate=self.shared_expert_gate is not None,
            expert_kernel=self.expert_kernel, use_expert_bias=self.use_expert_bias,
            load_balance_loss=self.load_balance_loss, load_balance_coeff=self._balance_coeff,
            router_z_loss_coeff=self.router_z_loss_coeff, **self._capacity)

    # NOTE: `.to(torch.bfloat16)` / `.half()` / `.double()` must not touch the balancing buffers: the
    # bias update adds lr*sign in float32 (bf16 would round small steps away) and the counts exceed
    # bf16's 8-bit mantissa after 256 tokens. Device moves still apply.
    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.pop(name) for name in _FLOAT32_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                if buf is not None:
                    moved = fn(buf)
                    buf = moved.float() if buf.is_meta or moved.is_meta else buf.to(device=moved.device)
                self._buffers[name] = buf
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after the checks of ``moe_torch.weights.check_state_dict``.

        Raises ``parity.config.StateDictError`` (a ValueError, the class and message of
        ``moe_jax.load_state_dict``) listing every missing (unless ``strict=False``), unexpected,
        mis-shaped or non-float key with both shapes, before anything is copied. Float tensors of
        another float dtype are cast (float64 -> float32 rounds; DESIGN.md), unless a finite value
        would overflow to infinity.
        """
        check_state_dict(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def init_weights(self) -> None:
        """Normal init with std ``fan_in ** -0.5`` (as ``parity.weights.init_weights``); buffers zeroed."""
        self.router.init_weights()
        self.experts.init_weights()
        if isinstance(self.shared_expert, FeedForward):
            self.shared_expert.init_weights()
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, 0.0, self.dim ** -0.5)
        if self.expert_input_norm is not None:
            nn.init.ones_(self.expert_input_norm.weight)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.tokens_per_expert.zero_()

    # ------------------------------------------------------------------ steps of the forward pass
    def dispatch(self, tokens: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor):
        """(6) Sort the N*k routed slots expert-major with a stable sort (token order within an expert).

        tokens (N, D), selected / weights (N, k) -> ``(x_routed (N*k, D), order (N*k,), inverse (N*k,))``;
        ``order[j]`` is the flat slot (token * k + slot) of row j, ``inverse[order[j]] == j``. With
        ``score_before_experts`` the routing weight multiplies the routed input in float32 (cast back
        to the input dtype). A later expert-parallel style exchanges ``x_routed`` between ranks after
        this step.
        """
        order = torch.argsort(selected.reshape(-1), stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        scale = permute_rows(weights.reshape(-1), order, inverse) if self.score_before_experts else None
        return gather_tokens(tokens, order, inverse, self.top_k, scale), order, inverse

    def combine(self, y_routed: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
        """(8) Undo the sort and sum each token's k slots in float32 -> (N, D) float32 (float64 for float64).

        y_routed (N*k, D) sorted, weights (N, k). With ``score_before_experts=False`` the routing weight
        multiplies the expert output here, in float32. NOTE: a gather by the inverse permutation, then
        a sum over the k slots: no scatter-add, hence deterministic on every device.
        """
        weights = None if self.score_before_experts else weights
        return combine_slots(y_routed, weights, inverse, self.top_k)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [batch, seq_len, dim={self.dim}]")
        wdtype = self.experts.w1.dtype
        if x.dtype != wdtype:
            raise TypeError(f"x has dtype {x.dtype} but the expert weights have dtype {wdtype}; "
                            f"cast one to the other (e.g. moe.to({x.dtype}))")

    def forward(self, x: torch.Tensor, return_aux: bool = False, selected_experts: torch.Tensor | None = None,
                kept_slots: torch.Tensor | None = None):
        self._check_input(x)
        wrap = None
        if is_dtensor(x):
            if any(p.is_shard() and p.dim in (-1, x.ndim - 1) for p in x.placements):
                raise ValueError(f"x is a DTensor sharded on its last dim ({x.placements}); the MoE layer "
                                 f"needs whole token vectors")
            wrap = (x.device_mesh, x.placements)
            x = x.to_local()
        bs, slen, dim = x.shape
        tokens = x.reshape(bs * slen, dim)
        expert_bias = self.expert_bias if self.use_expert_bias else None
        # (1)-(5) router
        logits, scores, selected, weights = self.router.route(tokens, expert_bias, selected_experts)
        # (6a) capacity: each expert keeps its first C slots per group; dropped slots weigh 0
        kept, cap_cfg = None, self.config if self._capacity_on else None
        if cap_cfg is not None:
            kept, weights, _ = drop_tokens(selected, weights, cap_cfg, bs, kept_slots)
        elif kept_slots is not None:
            raise ValueError("kept_slots given but the layer is dropless (capacity_factor and expert_capacity "
                             "are None)")
        # (6) counts per expert; training-mode forwards feed the bias update
        # NOTE: a scatter-add of ones (integers: exact, in any order), not bincount, whose output length
        # depends on the data (max + 1): torch.compile could not trace it in one graph
        flat = selected.reshape(-1)
        counts = flat.new_zeros(self.num_experts).scatter_add_(0, flat, torch.ones_like(flat))
        expert_counts = counts
        if kept is not None:  # (6a) the experts run the kept slots; the stats count kept or all slots
            expert_counts = flat.new_zeros(self.num_experts).scatter_add_(0, flat, kept.reshape(-1).to(flat.dtype))
            counts = expert_counts if cap_cfg.capacity_stats == "kept" else counts
        if self.training:
            with torch.no_grad():
                local_tensor(self.tokens_per_expert).add_(counts.float())
        # (6) dropped slots sort after every expert's (index E)
        routed = selected if kept is None else torch.where(kept, selected, self.num_experts)
        # (6) Gemma 4: the routed experts see their own RMS-normalised input (the router does not)
        expert_tokens = tokens if self.expert_input_norm is None else self.expert_input_norm(tokens, self.input_norm_eps)
        x_routed, order, inverse = self.dispatch(expert_tokens, routed, weights)
        # (7) experts, in the input dtype
        if kept is None:
            y_routed = self.experts(x_routed, counts)
        else:
            y_routed = run_experts(self.experts, x_routed, expert_counts, cap_cfg, bs, slen)
        # (8) combine in float32, cast back
        out = self.combine(y_routed, weights, order, inverse).to(x.dtype)
        # (9) shared expert sees every token (scaled by its sigmoid gate when there is one)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared
        out = out.view(bs, slen, dim)
        if wrap is not None:
            out = dtensor_class().from_local(out, *wrap)
        balance = None
        if self.load_balance_loss is not None:
            balance = load_balance_loss(scores, selected, self.num_experts, self._balance_coeff,
                                        self.load_balance_loss, batch=bs, group=self.sequence_partition_group,
                                        kept=kept if cap_cfg is not None and cap_cfg.capacity_stats == "kept" else None)
            out._load_balance_loss = balance  # the original module's interface
        if not return_aux:
            return out
        aux = {
            "router_logits": logits,
            "scores": scores,
            "selected_experts": selected,
            "routing_weights": weights,
            "tokens_per_expert": counts.float(),
        }
        if kept is not None:
            aux["kept_slots"] = kept
        if balance is not None:
            aux["load_balance_loss"] = balance
        if self.router_z_loss_coeff > 0:
            aux["router_z_loss"] = router_z_loss(logits, self.router_z_loss_coeff)
        return out, aux
