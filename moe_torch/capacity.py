"""Capacity and token dropping, DESIGN.md step (6a), between the router (1)-(5) and dispatch (6).

The same functions, in the same order, as ``moe_jax.capacity`` and ``parity.reference`` (the written
form): ``slot_priority`` (who is served first), ``capacity_ranks`` (each slot's place in its
expert's buffer), ``drop_tokens`` (keep the first ``C``, zero the rest, optionally renormalise), and
``run_experts`` (the experts on the kept rows only, optionally padded to ``C`` rows per group).
``C`` itself is ``parity.config.capacity_per_expert``: a Python integer computed once for all three.

Shapes: ``N`` tokens (``B*S``), ``k`` = top_k, ``E`` experts, ``G`` groups of ``T`` tokens.
Every order is a stable sort, so ties break by the stated rule and never by an unordered top-k.
"""

from __future__ import annotations

import torch

from parity.config import MoEConfig, capacity_groups, capacity_per_expert


def slot_priority(w: torch.Tensor, policy: str, num_groups: int) -> torch.Tensor:
    """(6a) The N*k flat slots (``token * k + slot``) from first served to last, group by group.

    w (N, k) float routing weights -> (N*k,) int64. "position": ``(token, slot)`` order (Megatron-Core
    "position", MaxText, Switch); "slot_major": ``(slot, token)`` (GShard); "probs": weight
    descending, ties by token then slot (Megatron-Core "probs"; NaN ranks after every number).
    """
    n, k = w.shape
    flat = torch.arange(n * k, device=w.device)
    group = flat // max(n // max(num_groups, 1) * k, 1)
    if policy == "position":
        return flat
    if policy == "slot_major":
        return torch.argsort(group * k + flat % k, stable=True)
    by_weight = torch.argsort(-w.detach().reshape(-1), stable=True)  # ties keep (token, slot) order
    return by_weight[torch.argsort(group[by_weight], stable=True)]


def capacity_ranks(idx: torch.Tensor, w: torch.Tensor, cfg: MoEConfig, num_groups: int,
                   candidates: torch.Tensor | None = None) -> torch.Tensor:
    """(6a) Each slot's rank among the slots of its group sent to its expert, in priority order.

    idx (N, k) int64, w (N, k) -> (N, k) int64; a slot is kept when its rank is below ``C``. With
    ``candidates`` (N, k) bool only those slots are ranked (``parity.reference.capacity_ranks``).
    """
    n, k = idx.shape
    e = cfg.num_experts
    flat = idx.reshape(-1).to(torch.int64)
    if candidates is not None:
        flat = torch.where(candidates.reshape(-1), flat, torch.full_like(flat, e))
    prio = slot_priority(w, cfg.capacity_policy, num_groups)
    group = torch.arange(n * k, device=idx.device) // max(n // max(num_groups, 1) * k, 1)
    key = (group * (e + 1) + flat)[prio]
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank_sorted = torch.arange(n * k, device=idx.device) - torch.searchsorted(sorted_key, sorted_key, side="left")
    rank = torch.empty_like(rank_sorted).scatter_(0, prio[order], rank_sorted)
    return rank.view(n, k)


def drop_tokens(idx: torch.Tensor, w: torch.Tensor, cfg: MoEConfig, batch: int,
                kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(6a) ``(kept (N,k) bool, w (N,k), ranks (N,k) int64)``: each expert keeps its first ``C`` slots
    per group; dropped slots weigh exactly 0 (a select, so their gradient is 0); with
    ``cfg.capacity_renorm`` survivors are divided by their sum and multiplied by ``route_scale``
    (a token with no survivor keeps zeros). ``kept`` given (locked) replaces the decision.
    Raises ``ValueError`` for a ``kept`` of another shape than ``idx``.
    """
    n = idx.shape[0]
    groups, tokens = capacity_groups(cfg.capacity_group, batch, n // batch if batch else 0)
    if kept is not None:
        if tuple(kept.shape) != tuple(idx.shape):
            raise ValueError(f"kept_slots has shape {tuple(kept.shape)}; expected {tuple(idx.shape)}")
        kept = kept.to(device=idx.device, dtype=torch.bool)
    ranks = capacity_ranks(idx, w, cfg, groups, kept)
    if kept is None:
        kept = ranks < capacity_per_expert(cfg, tokens)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    w = torch.where(kept, w, zero)
    if cfg.capacity_renorm:
        total = w.sum(-1, keepdim=True)
        w = torch.where(kept, w / torch.where(total > 0, total, torch.ones_like(total)), zero) * cfg.route_scale
    return kept, w, ranks


def run_experts(experts, x_routed: torch.Tensor, counts: torch.Tensor, cfg: MoEConfig, batch: int,
                seq_len: int) -> torch.Tensor:
    """(6a)-(7) The experts on the kept rows only: x_routed (N*k, D) expert-major with the dropped rows
    last, counts (E,) kept rows per expert -> (N*k, D), the dropped rows exactly 0.

    With ``cfg.capacity_pad`` each expert runs on exactly ``G*C`` rows (its kept rows, then zero rows;
    Megatron-Core's ``moe_pad_expert_input_to_capacity``): the same outputs, a fixed shape.
    NOTE: eagerly the number of kept rows is read on the host (one sync), so that an expert-parallel
    exchange around ``experts`` sees exactly the rows its counts describe. Under ``torch.compile``
    (``_run_experts_traced``) nothing is read on the host: the experts get every row with counts that
    describe the kept ones, and a ``torch.where`` on a row mask zeroes the rest. Raises ``ValueError``
    when a locked ``kept_slots`` holds more than ``G*C`` rows of one expert (it cannot be padded to
    ``C``; under compile a ``RuntimeError`` from ``torch._assert_async``, same message).
    """
    if torch.compiler.is_compiling():
        return _run_experts_traced(experts, x_routed, counts, cfg, batch, seq_len)
    kept_rows = int(counts.sum())
    x_kept = x_routed[:kept_rows]
    if cfg.capacity_pad:
        groups, tokens = capacity_groups(cfg.capacity_group, batch, seq_len)
        rows = groups * capacity_per_expert(cfg, tokens)
        if kept_rows and int(counts.max()) > rows:
            raise ValueError(f"an expert holds {int(counts.max())} kept rows, more than its {rows} padded "
                             f"rows (G*C); kept_slots does not fit the capacity")
        starts = torch.cumsum(counts, 0) - counts
        expert = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                         output_size=kept_rows)
        dest = expert * rows + torch.arange(kept_rows, device=counts.device) - starts[expert]
        padded = x_kept.new_zeros((counts.numel() * rows, x_kept.shape[-1])).index_copy(0, dest, x_kept)
        y_kept = experts(padded, torch.full_like(counts, rows)).index_select(0, dest)
    else:
        y_kept = experts(x_kept, counts)
    return torch.cat([y_kept, y_kept.new_zeros((x_routed.shape[0] - kept_rows, y_kept.shape[-1]))])


def _run_experts_traced(experts, x_routed: torch.Tensor, counts: torch.Tensor, cfg: MoEConfig, batch: int,
                        seq_len: int) -> torch.Tensor:
    """``run_experts`` without a host read (for ``torch.compile``: no graph break, no recompile when the
    counts change): the same rows through the same kernels, so the same bits.

    All ``R = N*k`` rows go to the kernel with ``counts`` describing the kept rows only (every kernel
    leaves the rows past ``sum(counts)`` out and returns zeros there); a ``torch.where`` on the row
    mask (a select, not a product: NaN cannot leak) makes the dropped rows exactly 0. With
    ``capacity_pad`` the buffer is ``E*G*C`` padded rows followed by one spare row per routed row: a
    kept row goes to its expert's slot, a dropped row to its own spare row, past the counts.
    """
    n_rows = x_routed.shape[0]
    ar = torch.arange(n_rows, device=counts.device)
    keep = (ar < counts.sum())[:, None]
    if cfg.capacity_pad:
        groups, tokens = capacity_groups(cfg.capacity_group, batch, seq_len)
        rows = groups * capacity_per_expert(cfg, tokens)
        torch._assert_async(counts.max() <= rows, f"an expert holds more kept rows than its {rows} padded rows "
                                                  f"(G*C); kept_slots does not fit the capacity")
        ends = torch.cumsum(counts, 0)
        expert = torch.searchsorted(ends, ar, right=True)  # E for the dropped rows
        starts = torch.cat([ends.new_zeros(1), ends])[expert]
        spare = counts.numel() * rows + ar
        dest = torch.where(keep[:, 0], expert.clamp(max=counts.numel() - 1) * rows + ar - starts, spare)
        padded = x_routed.new_zeros((counts.numel() * rows + n_rows, x_routed.shape[-1])).index_copy(0, dest,
                                                                                                    x_routed)
        y = experts(padded, torch.full_like(counts, rows)).index_select(0, dest)
    else:
        y = experts(x_routed, counts)
    return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
