"""Capacity and token dropping, DESIGN.md step (6a), between the router (1)-(5) and dispatch (6).

The same functions, in the same order, as ``moe_torch.capacity`` and ``parity.reference`` (the written
form): ``slot_priority`` (who is served first), ``capacity_ranks`` (each slot's place in its
expert's buffer), ``drop_tokens`` (keep the first ``C``, zero the rest, optionally renormalise), and
``run_experts`` (the experts on the kept rows only; fixed ``[E, G*C]`` buffers with
``capacity_pad`` or the "static" kernel). ``C`` itself is ``parity.config.capacity_per_expert``: a
Python integer computed from the shapes, so it is static under ``jit``.

Shapes: ``N`` tokens (``B*S``), ``k`` = top_k, ``E`` experts, ``G`` groups of ``T`` tokens.
Every order is a stable sort, so ties break by the stated rule and never by an unordered top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.kernels import buffer_layout, static_kernel
from parity.config import MoEConfig, capacity_groups, capacity_per_expert


def slot_priority(w: jax.Array, policy: str, num_groups: int) -> jax.Array:
    """(6a) The N*k flat slots (``token * k + slot``) from first served to last, group by group.

    w (N, k) float routing weights -> (N*k,) int32. "position": ``(token, slot)`` order (Megatron-Core
    "position", MaxText, Switch); "slot_major": ``(slot, token)`` (GShard); "probs": weight
    descending, ties by token then slot (Megatron-Core "probs"; NaN ranks after every number).
    """
    n, k = w.shape
    flat = jnp.arange(n * k, dtype=jnp.int32)
    group = flat // max(n // max(num_groups, 1) * k, 1)
    if policy == "position":
        return flat
    if policy == "slot_major":
        return jnp.argsort(group * k + flat % k, stable=True).astype(jnp.int32)
    by_weight = jnp.argsort(-jax.lax.stop_gradient(w).reshape(-1), stable=True)  # ties keep (token, slot)
    return by_weight[jnp.argsort(group[by_weight], stable=True)].astype(jnp.int32)


def capacity_ranks(idx: jax.Array, w: jax.Array, cfg: MoEConfig, num_groups: int,
                   candidates: jax.Array | None = None) -> jax.Array:
    """(6a) Each slot's rank among the slots of its group sent to its expert, in priority order.

    idx (N, k) int, w (N, k) -> (N, k) int32; a slot is kept when its rank is below ``C``. With
    ``candidates`` (N, k) bool only those slots are ranked (``parity.reference.capacity_ranks``).
    """
    n, k = idx.shape
    e = cfg.num_experts
    flat = idx.reshape(-1).astype(jnp.int32)
    if candidates is not None:
        flat = jnp.where(candidates.reshape(-1), flat, e)
    prio = slot_priority(w, cfg.capacity_policy, num_groups)
    group = jnp.arange(n * k, dtype=jnp.int32) // max(n // max(num_groups, 1) * k, 1)
    key = (group * (e + 1) + flat)[prio]
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    rank_sorted = jnp.arange(n * k, dtype=jnp.int32) - jnp.searchsorted(sorted_key, sorted_key,
                                                                         side="left").astype(jnp.int32)
    rank = jnp.zeros(n * k, jnp.int32).at[prio[order]].set(rank_sorted)
    return rank.reshape(n, k)


def drop_tokens(idx: jax.Array, w: jax.Array, cfg: MoEConfig, batch: int,
                kept: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(6a) ``(kept (N,k) bool, w (N,k), ranks (N,k) int32)``: each expert keeps its first ``C`` slots
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
        kept = jnp.asarray(kept).astype(bool)
    ranks = capacity_ranks(idx, w, cfg, groups, kept)
    if kept is None:
        kept = ranks < capacity_per_expert(cfg, tokens)
    zero = jnp.zeros((), w.dtype)
    w = jnp.where(kept, w, zero)
    if cfg.capacity_renorm:
        total = w.sum(-1, keepdims=True)
        w = jnp.where(kept, w / jnp.where(total > 0, total, jnp.ones_like(total)), zero) * cfg.route_scale
    return kept, w, ranks


def run_experts(experts, routed: jax.Array, counts: jax.Array, cfg: MoEConfig, batch: int,
                seq_len: int) -> jax.Array:
    """(6a)-(7) The experts on the kept rows only: routed (N*k, D) expert-major with the dropped rows
    last, counts (E,) kept rows per expert -> (N*k, D), the dropped rows exactly 0 (selects on the
    way in and out, so no dropped row's value or NaN reaches an expert or the output).

    The "static" kernel runs fixed ``[E, G*C, D]`` buffers (``moe_jax.kernels.static_kernel``); with
    ``cfg.capacity_pad`` any other kernel runs the same padded layout (``E * G*C`` rows, ``G*C`` per
    expert; Megatron-Core's ``moe_pad_expert_input_to_capacity``): the same outputs, fixed shapes.
    A locked ``kept_slots`` holding more than ``G*C`` rows of one expert loses the excess rows in
    these two layouts (not checked under ``jit``).
    """
    rows = routed.shape[0]
    groups, tokens = capacity_groups(cfg.capacity_group, batch, seq_len)
    cap = groups * capacity_per_expert(cfg, tokens)
    zero = jnp.zeros((), routed.dtype)
    in_use = (jnp.arange(rows) < counts.sum())[:, None]
    routed = jnp.where(in_use, routed, zero)
    if experts.kernel_name(routed.dtype) == "static":
        # the experts' own options (biases, activation: DESIGN.md step 7) go with them
        y = static_kernel(experts.w1[...], experts.w2[...], experts.w3[...], routed, counts, capacity=cap,
                          **experts.kernel_options())
    elif cfg.capacity_pad:
        dest, placed = buffer_layout(counts, rows, cap)
        padded = jnp.zeros((counts.shape[0] * cap, routed.shape[1]), routed.dtype).at[dest].set(routed, mode="drop")
        y_pad = experts(padded, jnp.full_like(counts, cap))
        y = jnp.where(placed[:, None], y_pad.at[dest].get(mode="fill", fill_value=0), zero)
    else:
        y = experts(routed, counts)
    return jnp.where(in_use, y, zero)
