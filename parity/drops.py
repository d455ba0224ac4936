"""Dropped tokens (DESIGN.md step 6a) as a finding of its own, next to the routing divergence.

With a capacity, two implementations that agree on the routing may still keep different slots: under
the "probs" policy a near-tie of two routing weights at an expert's capacity edge decides which slot
is the C-th. ``compare_kept`` reports, per backend, the tokens whose *kept* expert sets differ, the
experts on each side, and the float64 reference's priority margin at the capacity edge of the
experts involved; the harness masks those tokens out of the token-indexed comparisons, as it does
for diverged routing. Under "position" and "slot_major" the order is by index, so the margin is
infinite: a difference there either follows from a routing divergence or is a bug.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np

from parity import reference as ref
from parity.config import MoEConfig, capacity_groups, capacity_per_expert
from parity.report import FAIL, PASS, WARN, Check


def edge_margins(cfg: MoEConfig, idx: np.ndarray, w: np.ndarray, batch: int) -> np.ndarray:
    """Per slot, the priority margin at its (group, expert)'s capacity edge: [N, k] float64.

    idx, w: [N, k] routing and step-5 weights (before dropping). "probs": the weight of the last kept
    slot minus that of the first dropped one, in that group and expert (``inf`` where the expert
    kept every slot it was sent); "position" / "slot_major": ``inf`` (index order has no ties).
    """
    n, k = idx.shape
    margins = np.full((n, k), np.inf)
    if cfg.capacity_policy != "probs" or n == 0:
        return margins
    groups, tokens = capacity_groups(cfg.capacity_group, batch, n // batch)
    cap = capacity_per_expert(cfg, tokens)
    ranks = ref.capacity_ranks(idx, w, cfg, groups)
    group = np.arange(n)[:, None].repeat(k, 1) // (n // groups)
    for g, e in set(zip(group[ranks == cap].tolist(), idx[ranks == cap].tolist(), strict=True)):
        seg = (group == g) & (idx == e)
        last_kept = w[seg & (ranks == cap - 1)] if cap > 0 else np.array([np.inf])
        first_dropped = w[seg & (ranks == cap)]
        margins[seg] = float(last_kept[0] - first_dropped[0])
    return margins


def reference_edge_margins(cfg: MoEConfig, weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray | None:
    """``edge_margins`` of the float64 reference's own routing of ``x`` [B, S, D]; None without a capacity."""
    if cfg.capacity_factor is None and cfg.expert_capacity is None:
        return None
    x = np.asarray(x, np.float64)
    b, s, d = x.shape
    aux = ref.route(x.reshape(b * s, d), weights["router.gate.weight"], cfg, weights.get("expert_bias"),
                    **ref.router_tensors(weights))
    return edge_margins(cfg, aux["selected_experts"], aux["routing_weights"], b)


def locked_kept(tensors: Mapping) -> dict:
    """``{"kept_slots": [N, k] bool}`` of a backend's forward (to lock step 6a), or ``{}`` without a capacity."""
    if "kept_slots" not in tensors:
        return {}
    return {"kept_slots": np.asarray(tensors["kept_slots"]).astype(bool)}


def lock_kwargs(method, kept: dict) -> dict:
    """``kept`` (``locked_kept``'s dict) when the runner's ``method`` takes ``kept_slots``, else ``{}``:
    a column that cannot lock step 6a (a mesh column, a peer) decides its drops itself."""
    if not kept:
        return {}
    params = inspect.signature(method).parameters
    takes = "kept_slots" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return kept if takes else {}


def counted_slots(cfg: MoEConfig, tensors: Mapping) -> np.ndarray | None:
    """The slots a backend's counts and balance loss see: its ``kept_slots`` with
    ``capacity_stats="kept"``, else None (every selected slot)."""
    if "kept_slots" not in tensors or cfg.capacity_stats != "kept":
        return None
    return np.asarray(tensors["kept_slots"]).astype(bool)


def _kept_sets(idx: np.ndarray, kept: np.ndarray) -> list[list[int]]:
    return [sorted(int(e) for e, keep in zip(row, mask, strict=True) if keep)
            for row, mask in zip(idx, kept, strict=True)]


def compare_kept(cfg: MoEConfig, name: str, against: str, actual: Mapping, expected: Mapping,
                 margins: np.ndarray, tie_tol: float, recomputed: np.ndarray | None = None,
                 routing_diverged: np.ndarray | None = None) -> tuple[np.ndarray, Check]:
    """The drop finding of ``name`` against ``against``: (tokens whose kept expert sets differ, a Check).

    actual / expected: forward tensors holding ``selected_experts`` and ``kept_slots``; margins: [N, k]
    ``edge_margins`` of the reference; recomputed: the reference's ``kept_slots`` for ``name``'s own
    routing (None for a pairwise row). A token counts as a near-tie (WARN) when its routing diverged
    (``routing_diverged``), when ``name`` dropped exactly what the reference drops for that routing
    (``recomputed``: the difference follows from the routing), or when the margin of its experts'
    capacity edge is at most ``tie_tol``; any other difference is a FAIL.
    """
    ia = np.asarray(actual["selected_experts"], np.int64)
    ie = np.asarray(expected["selected_experts"], np.int64)
    ka = np.asarray(actual["kept_slots"]).astype(bool)
    ke = np.asarray(expected["kept_slots"]).astype(bool)
    sa, se = _kept_sets(ia, ka), _kept_sets(ie, ke)
    tokens = np.array([t for t in range(len(sa)) if sa[t] != se[t]], np.int64)
    token_margin = margins.min(-1, initial=np.inf) if margins.size else np.zeros(0)
    explained = np.zeros(len(sa), bool)
    if routing_diverged is not None and len(routing_diverged):
        explained[routing_diverged] = True
    if recomputed is not None:
        explained |= (np.asarray(recomputed, bool) == ka).all(-1)
    near = [bool(explained[t] or token_margin[t] <= tie_tol) for t in tokens]
    status = PASS if not len(tokens) else (WARN if all(near) else FAIL)
    shown = "; ".join(f"token {t}: kept {sa[t]} vs {se[t]} (edge margin {token_margin[t]:.2e}"
                      f"{', follows the routing' if explained[t] else ''})" for t in tokens[:5])
    more = f"; +{len(tokens) - 5} more" if len(tokens) > 5 else ""
    dropped = int((~ka).sum())
    note = (f"{dropped} of {ka.size} slot(s) dropped by {name}; " +
            (f"kept sets agree on all {len(sa)} tokens" if not len(tokens) else
             f"{len(tokens)}/{len(sa)} token(s) kept differently "
             f"({'near-tie or routing' if status == WARN else f'margin above tie_tol={tie_tol:g}'}): {shown}{more}"))
    check = Check(id=f"routing/kept_slots/{name}~{against}", kind="routing", tensor="kept_slots", backend=name,
                  against=against, dtype="bool", status=status, numel=int(ka.size),
                  masked_tokens=int(len(tokens)), note=note)
    return tokens, check
