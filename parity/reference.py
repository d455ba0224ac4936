"""The MoE layer in float64 NumPy: the written form of DESIGN.md's semantics.

Every function follows one numbered step of DESIGN.md ("Forward semantics"); the comments carry the
step numbers, as do ``moe_torch`` and ``moe_jax``, so a reader can jump between the three.

Everything is computed in float64 unless a function says otherwise. Shapes use ``N`` tokens
(``B*S``), ``D`` model dim, ``H`` expert hidden dim, ``E`` experts, ``k`` = top_k.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from parity.config import MoEConfig

ROUTE_NORM_EPS = 1e-20


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def topk_lower_index(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, in descending order, ties to the lower index.

    values: [N, E] -> [N, k] int64. A stable sort of ``-values`` keeps equal entries in index order.
    """
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]


def feed_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray) -> np.ndarray:
    """SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): ``(silu(x W1^T) * x W3^T) W2^T``.

    x: [n, D]; w1, w3: [H, D]; w2: [D, H] -> [n, D].
    """
    return (silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def group_limited_mask(sel: np.ndarray, num_groups: int, num_limited_groups: int, group_score: str) -> np.ndarray:
    """(3) Boolean [N, E]: True for experts in the ``num_limited_groups`` best groups of each token.

    Group score: "max" of ``sel`` in the group (DeepSeek-V2) or the sum of its two largest entries
    (DeepSeek-V3, where ``sel`` includes the expert bias). Ties between groups go to the lower group.
    """
    n, e = sel.shape
    grouped = sel.reshape(n, num_groups, e // num_groups)
    if group_score == "max":
        gscore = grouped.max(-1)
    elif group_score == "top2_sum":
        gscore = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
    else:
        raise ValueError(f"group_score={group_score!r} is not one of ('max', 'top2_sum')")
    kept = topk_lower_index(gscore, num_limited_groups)  # [N, num_limited_groups]
    group_mask = np.zeros((n, num_groups), dtype=bool)
    np.put_along_axis(group_mask, kept, True, axis=-1)
    return np.repeat(group_mask, e // num_groups, axis=-1)


def selection_scores(cfg: MoEConfig, scores: np.ndarray, expert_bias: np.ndarray | None) -> np.ndarray:
    """Steps (2)-(3): what top-k selects on, ``[N, E]``: the expert bias added (when ``use_expert_bias``
    and a bias is given) and the dropped groups at -inf, in ``cfg.route_order``.

    - "bias_first" (DeepSeek-V3, torchtitan): ``sel = scores + bias``; the group scores
      are taken from ``sel`` (bias included).
    - "scale_first" (the original PyTorch module): ``scaled = scores * route_scale``; the group scores
      are taken from ``scaled`` (no bias); ``sel = scaled + bias``.

    In exact arithmetic the two select alike without a bias, or with ``route_scale == 1`` and no
    groups; the routing weights (step 5) do not depend on the order.
    """
    bias = _f64(expert_bias) if (cfg.use_expert_bias and expert_bias is not None) else None
    if cfg.route_order == "scale_first":
        # (2) scaled, unbiased scores pick the groups; the bias is added for selection only
        group_src = scores * cfg.route_scale
        sel = group_src + bias if bias is not None else group_src.copy()
    else:
        # (2) expert bias steers selection only, the groups included
        sel = scores + bias if bias is not None else scores.copy()
        group_src = sel
    # (3) group-limited routing
    if cfg.num_expert_groups is not None:
        keep = group_limited_mask(group_src, cfg.num_expert_groups, cfg.num_limited_groups, cfg.group_score)
        sel = np.where(keep, sel, -np.inf)
    return sel


def route(x: np.ndarray, gate: np.ndarray, cfg: MoEConfig, expert_bias: np.ndarray | None = None) -> dict:
    """Steps 1-6 of DESIGN.md for tokens ``x [N, D]`` and router weight ``gate [E, D]``.

    Returns a dict with ``router_logits [N,E]``, ``scores [N,E]``, ``selected_experts [N,k]`` (int64,
    descending selection score, ties to the lower index), ``routing_weights [N,k]`` and
    ``tokens_per_expert [E]`` (float64 counts).
    """
    # (1) float32-or-wider router logits and scores
    logits = _f64(x) @ _f64(gate).T
    scores = softmax(logits) if cfg.score_func == "softmax" else sigmoid(logits)
    # (2)-(3) selection scores: expert bias (selection only) and group-limited routing
    sel = selection_scores(cfg, scores, expert_bias)
    # (4) top-k, ties to the lower expert index
    idx = topk_lower_index(sel, cfg.top_k)
    # (5) unbiased routing weights
    w = np.take_along_axis(scores, idx, axis=-1)
    if cfg.route_norm:
        total = w.sum(-1, keepdims=True)
        w = w / (np.maximum(total, cfg.route_norm_eps) if cfg.route_norm_mode == "clamp" else total + cfg.route_norm_eps)
    w = w * cfg.route_scale
    # (6) per-expert counts
    counts = np.bincount(idx.reshape(-1), minlength=cfg.num_experts).astype(np.float64)
    return {
        "router_logits": logits,
        "scores": scores,
        "selected_experts": idx,
        "routing_weights": w,
        "tokens_per_expert": counts,
    }


def experts_forward(
    x: np.ndarray,
    idx: np.ndarray,
    w: np.ndarray,
    weights: Mapping[str, np.ndarray],
    score_before_experts: bool,
) -> np.ndarray:
    """Steps 6-8: run each token through its k experts and combine. x [N,D], idx/w [N,k] -> [N,D]."""
    w1, w2, w3 = (_f64(weights[f"experts.{n}"]) for n in ("w1", "w2", "w3"))
    n_tokens, k = idx.shape
    out = np.zeros((n_tokens, x.shape[-1]))
    for e in range(w1.shape[0]):  # (6) expert-major order
        tok, slot = np.nonzero(idx == e)
        if tok.size == 0:
            continue
        scale = w[tok, slot][:, None]
        xe = x[tok] * scale if score_before_experts else x[tok]
        # (7) SwiGLU expert
        ye = feed_forward(xe, w1[e], w2[e], w3[e])
        # (8) routing weight before or after the expert; sum over the k slots
        np.add.at(out, tok, ye if score_before_experts else ye * scale)
    return out


def shared_experts(x: np.ndarray, weights: Mapping[str, np.ndarray], cfg: MoEConfig) -> np.ndarray:
    """Step 9: the shared SwiGLU expert on every token, x [N, D] -> [N, D]; with
    ``cfg.shared_expert_gate`` scaled per token by ``sigmoid(x @ shared_expert_gate.weight.T)`` ([1, D]
    weight: Qwen2-MoE's ``shared_expert_gate``, a Linear D -> 1)."""
    y = feed_forward(x, *(_f64(weights[f"shared_expert.{n}.weight"]) for n in ("w1", "w2", "w3")))
    if cfg.shared_expert_gate:
        y = sigmoid(x @ _f64(weights["shared_expert_gate.weight"]).T) * y
    return y


def load_balance_loss(scores: np.ndarray, idx: np.ndarray, num_experts: int, coeff: float,
                      kind: str, batch: int = 1) -> float:
    """Switch-style balance loss ``coeff * E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    ``f_i``: fraction of the N*k routed slots that chose expert i (not differentiable);
    ``P_i``: mean over tokens of ``scores[:, i] / scores.sum(-1)``.
    kind="switch" uses the whole batch; kind="sequence" (DeepSeek-V3 sequence-wise balance loss,
    arXiv:2412.19437 eqs. 17-20) computes it per sequence (``batch`` sequences of N/batch tokens)
    and averages over the batch.

    No tokens (N = 0: B = 0 or S = 0): 0.0, the mean over no tokens (or no sequences) taken as 0
    (DESIGN.md, "Degenerate inputs"); its gradient is zero.
    """
    n, k = idx.shape
    if kind == "switch":
        batch = 1
    elif kind != "sequence":
        raise ValueError(f"load_balance_loss={kind!r} is not one of ('switch', 'sequence')")
    if n == 0:
        return 0.0
    probs = (scores / scores.sum(-1, keepdims=True)).reshape(batch, n // batch, num_experts)
    onehot = np.zeros((n, num_experts))
    np.add.at(onehot, (np.repeat(np.arange(n), k), idx.reshape(-1)), 1.0)
    frac = onehot.reshape(batch, n // batch, num_experts).sum(1) / (n // batch * k)  # [B, E]
    return float(coeff * num_experts * (frac * probs.mean(1)).sum(-1).mean())


def router_z_loss(logits: np.ndarray, coeff: float) -> float:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): ``coeff * mean(logsumexp(logits)^2)``; 0.0
    for no tokens (the mean over no tokens taken as 0)."""
    if logits.shape[0] == 0:
        return 0.0
    return float(coeff * np.mean(logsumexp(logits) ** 2))


def moe_forward(
    weights: Mapping[str, np.ndarray], x: np.ndarray, cfg: MoEConfig
) -> tuple[np.ndarray, dict]:
    """The whole layer. weights: canonical mapping (DESIGN.md); x: [B, S, D] -> (out [B,S,D], aux).

    ``aux`` has the DESIGN.md keys; ``load_balance_loss`` / ``router_z_loss`` only when enabled.
    """
    x = _f64(x)
    if x.ndim != 3 or x.shape[-1] != cfg.dim:
        raise ValueError(f"x has shape {x.shape}; expected [batch, seq_len, dim={cfg.dim}]")
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    aux = route(tokens, weights["router.gate.weight"], cfg, weights.get("expert_bias"))
    out = experts_forward(tokens, aux["selected_experts"], aux["routing_weights"], weights,
                          cfg.score_before_experts)
    # (9) shared experts see every token
    if cfg.num_shared_experts:
        out = out + shared_experts(tokens, weights, cfg)
    if cfg.load_balance_loss is not None:
        aux["load_balance_loss"] = load_balance_loss(
            aux["scores"], aux["selected_experts"], cfg.num_experts, cfg.load_balance_coeff,
            cfg.load_balance_loss, batch=b)
    if cfg.router_z_loss_coeff > 0:
        aux["router_z_loss"] = router_z_loss(aux["router_logits"], cfg.router_z_loss_coeff)
    return out.reshape(b, s, d), aux


def update_expert_bias(expert_bias: np.ndarray, tokens_per_expert: np.ndarray, lr: float,
                       center: bool = False) -> np.ndarray:
    """Auxiliary-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2; Wang et al. 2024).

    ``expert_bias + lr * sign(mean(counts) - counts)``; with ``center=True`` the update is made
    zero-mean first (torchtitan's variant). Computed in float32, the dtype ``expert_bias`` keeps in
    both backends, in an order that is exact (integer signs centred before scaling) so that the
    backends agree bit for bit. Returns the new bias; the caller zeroes its counts.
    """
    bias = np.asarray(expert_bias, dtype=np.float32)
    counts = np.asarray(tokens_per_expert, dtype=np.float32)
    sign = np.sign(counts.mean(dtype=np.float32) - counts).astype(np.float32)
    if center:
        sign = sign - sign.mean(dtype=np.float32)
    return (bias + np.float32(lr) * sign).astype(np.float32)
