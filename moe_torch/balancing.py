"""Load balancing: auxiliary losses and the auxiliary-loss-free expert-bias update (DESIGN.md).

NOTE on the module this kit grew from: it took a softmax over the k *selected* scores, so
``sum(mean_score) * sum(fraction)`` was always 1, the loss the constant ``num_experts`` and its
gradient zero. The losses below follow the papers: the router probabilities ``P_i`` are over all E
experts, and only ``P`` carries a gradient.
"""

from __future__ import annotations

import math

import torch

from moe_torch.feed_forward import local_tensor


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) over ``group`` forward, identity backward: every rank computes the same global
    loss, and each rank's backward gives that loss's gradient for its own tokens."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over the ranks of ``group`` (a ProcessGroup); the gradient passes through unchanged.

    Megatron's "g" operator (Shoeybi et al. 2019): each rank's backward gives the gradient of the global
    sum for its own share. Any shape and float dtype; returns a new tensor like ``x``.
    """
    return _SumOverGroup.apply(x, group)


def load_balance_loss(scores: torch.Tensor, selected_experts: torch.Tensor, num_experts: int, coeff: float,
                      kind: str = "switch", batch: int = 1, group=None,
                      kept: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style balance loss ``coeff * E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    Args:
        scores: (N, E) float32 router scores (softmax or sigmoid), differentiable.
        selected_experts: (N, k) int64.
        kept: optional (N, k) bool (step 6a, ``capacity_stats="kept"``, Megatron-Core): only kept
            slots count in ``f_i``, still divided by N*k.
        kind: "switch" (whole batch) or "sequence" (DeepSeek-V3 sequence-wise loss, arXiv:2412.19437
            eqs. 17-20: per sequence of N/batch tokens, averaged over the ``batch`` sequences).
        group: a ``torch.distributed`` process group over which the tokens are split (None: all
            here). With "sequence", the context-parallel ranks: each holds a part of every one of the
            same ``batch`` sequences (any split; N/batch tokens of each here); with "switch", any
            ranks sharing one batch. The per-(sequence, expert) counts and probability sums and the
            token count are summed over ``group`` (the probabilities with an identity backward), so
            every rank returns the loss of the whole sequences and its backward the gradient for its
            own tokens (Megatron-Core's ``sequence_partition_group`` serves the same purpose).

    ``f_i`` = fraction of the routed slots (N*k, or S*k per sequence) that chose expert i (no
    gradient); ``P_i`` = mean over tokens of ``scores[:, i] / scores.sum(-1)``.
    Returns a float32 scalar (float64 for float64 scores); 0 (with a zero gradient) when there are no tokens.
    Raises ``ValueError`` for an unknown ``kind`` or a batch that does not divide N.
    """
    if kind == "switch":
        batch = 1
    elif kind != "sequence":
        raise ValueError(f"load_balance_loss={kind!r} is not one of ('switch', 'sequence')")
    n, k = selected_experts.shape
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if n == 0 and group is None:  # no tokens (B = 0 too): the mean over no tokens is 0 (DESIGN.md)
        return scores.sum() * 0.0
    if batch <= 0 or n % batch:
        raise ValueError(f"batch={batch} does not divide the {n} tokens")
    probs = (scores / scores.sum(-1, keepdim=True)).view(batch, n // batch, num_experts)
    with torch.no_grad():
        onehot = torch.zeros(n, num_experts, dtype=scores.dtype, device=scores.device)
        ones = torch.ones_like(selected_experts, dtype=scores.dtype) if kept is None else kept.to(scores.dtype)
        onehot.scatter_add_(1, selected_experts, ones)
        counts = onehot.view(batch, n // batch, num_experts).sum(1)  # (B, E)
    if group is None:
        frac = counts / (n // batch * k)
        return coeff * num_experts * (frac * probs.mean(1)).sum(-1).mean()
    import torch.distributed as dist

    with torch.no_grad():
        seq_len = torch.tensor(float(n // batch), dtype=scores.dtype, device=scores.device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(seq_len, op=dist.ReduceOp.SUM, group=group)
    prob_sums = sum_over_group(probs.sum(1), group)  # (B, E)
    frac = counts / (seq_len * k)
    return coeff * num_experts * (frac * prob_sums / seq_len).sum(-1).mean()


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """``MoEAuxLossAutoScaler.apply(output, aux_loss)`` returns ``output`` unchanged; in backward it
    also gives ``aux_loss`` the gradient ``scale`` (a ones-like tensor times the per-step scale), so
    the auxiliary loss trains the router without being added to the loss the caller returns or logs.

    The idea is Megatron-Core's ("MoEAuxLossAutoScaler"); this is an independent implementation.
    ``scale`` defaults to 1.0; ``set_loss_scale(s)`` sets it for the following backward passes (each
    step, e.g. the main loss's own backward scale: a grad scaler's factor divided by the number of
    micro-batches, so both losses get the same scaling). The scale is one float32 tensor shared by
    every layer of the process (class state, updated in place).

    output: any tensor (the layer's output); aux_loss: a differentiable scalar (any float dtype).
    """

    main_loss_backward_scale: torch.Tensor | None = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        grad_aux = torch.ones_like(aux_loss)
        if scale is not None:
            grad_aux = grad_aux * scale.to(device=aux_loss.device, dtype=aux_loss.dtype)
        return grad_output, grad_aux

    @staticmethod
    def set_loss_scale(scale) -> None:
        """Set the aux loss's backward scale (a finite number or a 1-element tensor) in place."""
        value = torch.as_tensor(scale, dtype=torch.float32).detach()
        if value.numel() != 1 or not bool(torch.isfinite(value).all()):
            raise ValueError(f"scale={scale!r} must be one finite number")
        if MoEAuxLossAutoScaler.main_loss_backward_scale is None:
            MoEAuxLossAutoScaler.main_loss_backward_scale = value.reshape(()).clone()
        else:
            MoEAuxLossAutoScaler.main_loss_backward_scale.copy_(value.reshape(()))


def router_z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): ``coeff * mean(logsumexp(logits, -1) ** 2)``.

    logits: (N, E) -> float32 scalar (float64 for float64 logits); 0 (zero gradient) when N = 0.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return coeff * torch.logsumexp(logits, dim=-1).square().mean()


def _groups(group) -> list:
    if group is None:
        return []
    return list(group) if isinstance(group, (list, tuple)) else [group]


@torch.no_grad()
def update_expert_bias(moe, lr: float = 1e-3, group=None, center: bool = False,
                       num_recomputations: int = 1) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2; Wang et al. 2024).

    ``expert_bias += lr * sign(mean(c) - c)`` with ``c = moe.tokens_per_expert`` (counts of the
    training-mode forwards since the last update), divided by ``num_recomputations`` and then summed
    over ``group`` when given. ``center=True`` makes the update zero-mean first (torchtitan's
    variant). Then ``tokens_per_expert`` is zeroed.

    Computed in float32 in the order of ``parity.reference.update_expert_bias`` (mean as sum / E,
    integer signs centred before scaling by ``float32(lr)``), so the new bias is bit-identical to it
    for the same counts (exactly so while the summed counts are below 2**24, where float32 sums of
    integers are exact in any order).

    Args:
        moe: a ``moe_torch.MoE`` (anything with float32 buffers ``expert_bias`` and ``tokens_per_expert``).
        lr: the bias update rate (finite, >= 0); default 1e-3, the original module's.
        group: None, a ``torch.distributed`` ProcessGroup, or a list/tuple of them (e.g. the tensor-,
            context- and data-parallel groups of a mesh: every rank that routed different tokens of
            the global batch, as Megatron-Core sums over TP x CP x DP). The counts are summed over
            each group in turn, which for the orthogonal groups of one mesh is the sum over all of them.
        num_recomputations: how many times each forward of the step ran the router (1 + the
            activation-recomputation passes: a checkpointed layer runs its forward again in backward
            and counts its tokens again). The rule, from the later version of the original module
            (its ``update_expert_bias(moe, lr, num_recomputations)``, "corrects double-counting"): the
            counts are divided by it before anything else, so ``tokens_per_expert`` must hold
            ``num_recomputations`` identical passes (each count a multiple of it, else ``ValueError``:
            a routing that changed between the passes). NOTE: a sign update does not change when every
            count is divided by the same factor; the division matters for ranks with different
            factors summed over ``group``, and keeps the counts honest.
    Returns None (as the original; the new bias is ``moe.expert_bias``). Raises ``ValueError`` for a bad ``lr``,
    ``num_recomputations`` or counts, ``TypeError`` for a ``group`` that is not a process group.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr={lr!r} must be a finite number >= 0")
    if isinstance(num_recomputations, bool) or not isinstance(num_recomputations, int) or num_recomputations < 1:
        raise ValueError(f"num_recomputations={num_recomputations!r} must be an integer >= 1")
    groups = _groups(group)
    if groups:
        import torch.distributed as dist

        bad = [type(g).__name__ for g in groups if not isinstance(g, dist.ProcessGroup)]
        if bad:
            raise TypeError(f"group must be a ProcessGroup or a list of them, got {bad}")
    bias, counts_buf = local_tensor(moe.expert_bias), local_tensor(moe.tokens_per_expert)
    counts = counts_buf.float()
    if num_recomputations > 1:
        if bool((torch.remainder(counts, num_recomputations) != 0).any()):
            raise ValueError(f"tokens_per_expert={counts.tolist()} is not a multiple of "
                             f"num_recomputations={num_recomputations}: the router's passes of one step "
                             f"did not count the same tokens")
        counts = counts / num_recomputations  # exact: multiples of an integer
    if groups:
        counts = counts.clone()
        for g in groups:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=g)
    e = counts.numel()
    sign = torch.sign(counts.sum() / e - counts)
    if center:
        sign = sign - sign.sum() / e
    lr32 = torch.tensor(lr, dtype=torch.float32, device=bias.device)
    bias.copy_(bias.float() + lr32 * sign)
    counts_buf.zero_()
