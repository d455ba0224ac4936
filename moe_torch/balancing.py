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


def load_balance_loss(scores: torch.Tensor, selected_experts: torch.Tensor, num_experts: int, coeff: float,
                      kind: str = "switch", batch: int = 1) -> torch.Tensor:
    """Switch-style balance loss ``coeff * E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    Args:
        scores: (N, E) float32 router scores (softmax or sigmoid), differentiable.
        selected_experts: (N, k) int64.
        kind: "switch" (whole batch) or "sequence" (DeepSeek-V3 sequence-wise loss, arXiv:2412.19437
            eqs. 17-20: per sequence of N/batch tokens, averaged over the ``batch`` sequences).

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
    if batch <= 0 or n % batch:
        raise ValueError(f"batch={batch} does not divide the {n} tokens")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if n == 0:
        return scores.sum() * 0.0
    probs = (scores / scores.sum(-1, keepdim=True)).view(batch, n // batch, num_experts)
    with torch.no_grad():
        onehot = torch.zeros(n, num_experts, dtype=scores.dtype, device=scores.device)
        onehot.scatter_add_(1, selected_experts, torch.ones_like(selected_experts, dtype=scores.dtype))
        frac = onehot.view(batch, n // batch, num_experts).sum(1) / (n // batch * k)  # (B, E)
    return coeff * num_experts * (frac * probs.mean(1)).sum(-1).mean()


def router_z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): ``coeff * mean(logsumexp(logits, -1) ** 2)``.

    logits: (N, E) -> float32 scalar (float64 for float64 logits); 0 (zero gradient) when N = 0.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return coeff * torch.logsumexp(logits, dim=-1).square().mean()


@torch.no_grad()
def update_expert_bias(moe, lr: float, group=None, center: bool = False) -> torch.Tensor:
    """Auxiliary-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2; Wang et al. 2024).

    ``expert_bias += lr * sign(mean(c) - c)`` with ``c = moe.tokens_per_expert`` (counts of the
    training-mode forwards since the last update), all-reduced (sum) over ``group`` (a
    ``torch.distributed`` ProcessGroup, e.g. the data-parallel ranks) when given. ``center=True``
    makes the update zero-mean first (torchtitan's variant). Then ``tokens_per_expert`` is zeroed.

    Computed in float32 in the order of ``parity.reference.update_expert_bias`` (mean as sum / E,
    integer signs centred before scaling by ``float32(lr)``), so the new bias is bit-identical to it
    for the same counts (exactly so while the summed counts are below 2**24, where float32 sums of
    integers are exact in any order).

    Args:
        moe: a ``moe_torch.MoE`` (anything with float32 buffers ``expert_bias`` and ``tokens_per_expert``).
        lr: the bias update rate (finite, >= 0).
    Returns the new ``expert_bias`` (the buffer itself). Raises ``ValueError`` for a bad ``lr``.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr={lr!r} must be a finite number >= 0")
    bias, counts_buf = local_tensor(moe.expert_bias), local_tensor(moe.tokens_per_expert)
    counts = counts_buf.float()
    if group is not None:
        import torch.distributed as dist

        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    e = counts.numel()
    sign = torch.sign(counts.sum() / e - counts)
    if center:
        sign = sign - sign.sum() / e
    lr32 = torch.tensor(lr, dtype=torch.float32, device=bias.device)
    bias.copy_(bias.float() + lr32 * sign)
    counts_buf.zero_()
    return bias
