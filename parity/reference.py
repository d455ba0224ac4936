"""The MoE layer in float64 NumPy: the written form of DESIGN.md's semantics.

Every function follows one numbered step of DESIGN.md ("Forward semantics"); the comments carry the
step numbers, as do ``moe_torch`` and ``moe_jax``, so a reader can jump between the three.

Everything is computed in float64 unless a function says otherwise. Shapes use ``N`` tokens
(``B*S``), ``D`` model dim, ``H`` expert hidden dim, ``E`` experts, ``k`` = top_k.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from parity.config import MoEConfig, capacity_groups, capacity_per_expert

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


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016, eq. 2; ``F.gelu(approximate="tanh")``):
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def gated_activation(a1: np.ndarray, a3: np.ndarray, activation: str, alpha: float = 1.702,
                     limit: float = 7.0) -> np.ndarray:
    """(7) The expert's gated activation of its gate (``a1``) and up (``a3``) projections, [n, H] each.

    - "silu": SwiGLU (Shazeer 2020): ``silu(a1) * a3``;
    - "gelu_tanh": GeGLU with tanh-approximate GELU (Gemma 4's ``gelu_pytorch_tanh``): ``gelu_tanh(a1) * a3``;
    - "clamped_swiglu" (GPT-OSS, transformers' ``GptOssExperts._apply_gate``): ``g = min(a1, limit)``,
      ``u = clip(a3, -limit, limit)``, ``(u + 1) * g * sigmoid(alpha * g)``.
    """
    if activation == "silu":
        return silu(a1) * a3
    if activation == "gelu_tanh":
        return gelu_tanh(a1) * a3
    if activation == "clamped_swiglu":
        g = np.minimum(a1, limit)
        return (np.clip(a3, -limit, limit) + 1.0) * (g * sigmoid(alpha * g))
    raise ValueError(f"expert_activation={activation!r} is not one of ('silu', 'gelu_tanh', 'clamped_swiglu')")


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


def rms_norm(x: np.ndarray, eps: float, weight: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm (Zhang & Sennrich 2019) as Gemma 4 writes it: ``x * (mean(x**2, -1) + eps) ** -0.5``,
    times ``weight [D]`` when given (Gemma 4's weight multiplies as is, no ``1 +``). x: [N, D]."""
    y = x * (np.mean(x * x, axis=-1, keepdims=True) + eps) ** -0.5
    return y if weight is None else y * _f64(weight)


def router_tensors(weights: Mapping[str, np.ndarray]) -> dict:
    """``route``'s keyword tensors from a canonical mapping (absent ones None)."""
    return {"router_scale": weights.get("router.scale"), "per_expert_scale": weights.get("router.per_expert_scale"),
            "router_bias": weights.get("router.gate.bias")}


def expert_tokens(tokens: np.ndarray, weights: Mapping[str, np.ndarray], cfg: MoEConfig) -> np.ndarray:
    """(6) What the routed experts see: ``tokens [N, D]``, or with ``cfg.expert_input_norm`` (Gemma 4's
    ``pre_feedforward_layernorm_2``) ``rms_norm(tokens) * expert_input_norm.weight``."""
    if not cfg.expert_input_norm:
        return tokens
    return rms_norm(_f64(tokens), cfg.input_norm_eps, weights["expert_input_norm.weight"])


def route(x: np.ndarray, gate: np.ndarray, cfg: MoEConfig, expert_bias: np.ndarray | None = None, *,
          router_scale: np.ndarray | None = None, per_expert_scale: np.ndarray | None = None,
          router_bias: np.ndarray | None = None, selected_experts: np.ndarray | None = None) -> dict:
    """Steps 1-6 of DESIGN.md for tokens ``x [N, D]`` and router weight ``gate [E, D]``.

    ``router_scale [D]`` (``router.scale``) is needed with ``cfg.router_input_norm``,
    ``per_expert_scale [E]`` (``router.per_expert_scale``) with ``cfg.per_expert_scale`` (Gemma 4);
    ``router_bias [E]`` (``router.gate.bias``) with ``cfg.router_bias`` (GPT-OSS);
    ``selected_experts [N, k]`` given (the harness's ``--lock-routing``) replaces steps 2-4.

    Returns a dict with ``router_logits [N,E]``, ``scores [N,E]``, ``selected_experts [N,k]`` (int64,
    descending selection score, ties to the lower index), ``routing_weights [N,k]`` and
    ``tokens_per_expert [E]`` (float64 counts).
    """
    x = _f64(x)
    if cfg.router_input_norm:
        # (1) Gemma 4's router input: RMS-normalised without a weight, times router.scale and dim**-0.5
        x = rms_norm(x, cfg.input_norm_eps) * _f64(router_scale) * cfg.dim ** -0.5
    # (1) float32-or-wider router logits and scores
    logits = x @ _f64(gate).T
    if cfg.router_bias:  # GPT-OSS: the router is a Linear with a bias
        logits = logits + _f64(router_bias)
    scores = softmax(logits) if cfg.score_func == "softmax" else sigmoid(logits)
    # (2)-(3) selection scores: expert bias (selection only) and group-limited routing
    if selected_experts is None:
        sel = selection_scores(cfg, scores, expert_bias)
        # (4) top-k, ties to the lower expert index
        idx = topk_lower_index(sel, cfg.top_k)
    else:
        idx = np.asarray(selected_experts, np.int64)
    # (5) unbiased routing weights
    w = np.take_along_axis(scores, idx, axis=-1)
    if cfg.route_norm:
        if cfg.route_norm_p is None:
            total = w.sum(-1, keepdims=True)
        else:  # DBRX: the p-norm of the k weights (torch.norm(p=moe_normalize_expert_weights))
            total = (np.abs(w) ** cfg.route_norm_p).sum(-1, keepdims=True) ** (1.0 / cfg.route_norm_p)
        w = w / (np.maximum(total, cfg.route_norm_eps) if cfg.route_norm_mode == "clamp" else total + cfg.route_norm_eps)
    w = w * cfg.route_scale
    if cfg.per_expert_scale:  # Gemma 4: a learned scale per chosen expert
        w = w * _f64(per_expert_scale)[idx]
    # (6) per-expert counts
    counts = np.bincount(idx.reshape(-1), minlength=cfg.num_experts).astype(np.float64)
    return {
        "router_logits": logits,
        "scores": scores,
        "selected_experts": idx,
        "routing_weights": w,
        "tokens_per_expert": counts,
    }


def slot_priority(w: np.ndarray, policy: str, num_groups: int) -> np.ndarray:
    """(6a) The N*k flat slots (``token * k + slot``) listed from first served to last, group by group.

    w: [N, k] routing weights (step 5); the N tokens form ``num_groups`` contiguous groups.
    - "position" (Megatron-Core "position", MaxText, Switch): first come, first served, token-major:
      ``(token, slot)`` order;
    - "slot_major" (GShard): every token's first choice, in token order, before any second choice:
      ``(slot, token)`` order;
    - "probs" (Megatron-Core's default "probs"): routing weight descending, ties by token, then slot
      (a NaN weight ranks after every number).
    Every order is a stable sort (never an unordered top-k), so ties break by the stated rule.
    """
    n, k = w.shape
    flat = np.arange(n * k)
    group = flat // max(n // max(num_groups, 1) * k, 1)
    if policy == "position":
        return flat
    if policy == "slot_major":
        return np.argsort(group * k + flat % k, kind="stable")
    by_weight = np.argsort(-w.reshape(-1), kind="stable")  # ties keep (token, slot) order
    return by_weight[np.argsort(group[by_weight], kind="stable")]


def capacity_ranks(idx: np.ndarray, w: np.ndarray, cfg: MoEConfig, num_groups: int,
                   candidates: np.ndarray | None = None) -> np.ndarray:
    """(6a) Each slot's place in its expert's buffer for its group: [N, k] int64.

    The rank of slot ``(n, j)`` among the slots of the same group sent to the same expert, in the
    order of ``slot_priority``; a slot is kept when its rank is below the capacity ``C``. With
    ``candidates`` ([N, k] bool, e.g. a locked drop decision) only those slots are ranked (the others'
    ranks count among themselves and are not used). Computed by a stable sort of the priority-ordered
    slots by ``(group, expert)`` and a search for each segment's start.
    """
    n, k = idx.shape
    e = cfg.num_experts
    flat = idx.reshape(-1).astype(np.int64)
    if candidates is not None:
        flat = np.where(candidates.reshape(-1), flat, e)
    prio = slot_priority(w, cfg.capacity_policy, num_groups)
    group = np.arange(n * k) // max(n // max(num_groups, 1) * k, 1)
    key = (group * (e + 1) + flat)[prio]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    rank_sorted = np.arange(n * k) - np.searchsorted(sorted_key, sorted_key, side="left")
    rank = np.empty(n * k, np.int64)
    rank[prio[order]] = rank_sorted
    return rank.reshape(n, k)


def drop_tokens(idx: np.ndarray, w: np.ndarray, cfg: MoEConfig, batch: int,
                kept: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(6a) Capacity and token dropping: ``(kept [N,k] bool, w [N,k], ranks [N,k])``.

    Each expert keeps, per group (``cfg.capacity_group``), its first ``C = capacity_per_expert``
    slots in the order of ``cfg.capacity_policy``; a dropped slot's weight is 0 (it reaches no
    expert and adds nothing); a token dropped from all its experts gets only the shared expert (or
    zero). With ``cfg.capacity_renorm`` (GShard) the survivors' weights are divided by their sum and
    multiplied by ``route_scale`` (a token with no survivor keeps zeros). ``kept`` given (a locked
    decision) replaces the choice; ``ranks`` then count among the kept slots.
    """
    groups, tokens = capacity_groups(cfg.capacity_group, batch, idx.shape[0] // batch if batch else 0)
    ranks = capacity_ranks(idx, w, cfg, groups, kept)
    if kept is None:
        kept = ranks < capacity_per_expert(cfg, tokens)
    kept = np.asarray(kept, bool)
    w = np.where(kept, w, 0.0)
    if cfg.capacity_renorm:
        total = w.sum(-1, keepdims=True)
        w = np.where(kept, w / np.where(total > 0, total, 1.0), 0.0) * cfg.route_scale
    return kept, w, ranks


def apply_capacity(aux: dict, cfg: MoEConfig, batch: int, kept: np.ndarray | None = None) -> np.ndarray | None:
    """(6a) in the layer: ``drop_tokens`` on ``aux`` (``route``'s dict), in place. Returns the kept
    mask for the balance loss (None when it sees every selected slot), and the experts' index.

    Sets ``aux["kept_slots"]`` [N,k] bool, ``aux["routing_weights"]`` to the weights the combine
    uses (0 at dropped slots) and, with ``capacity_stats="kept"``, ``tokens_per_expert`` to the
    kept slots' counts. Without capacity: nothing (returns None).
    """
    if cfg.capacity_factor is None and cfg.expert_capacity is None:
        if kept is not None:
            raise ValueError("kept_slots given but the layer is dropless (capacity_factor and "
                             "expert_capacity are None)")
        return None
    idx = aux["selected_experts"]
    kept, aux["routing_weights"], _ = drop_tokens(idx, aux["routing_weights"], cfg, batch, kept)
    aux["kept_slots"] = kept
    if cfg.capacity_stats == "selected":
        return None
    aux["tokens_per_expert"] = np.bincount(idx[kept], minlength=cfg.num_experts).astype(np.float64)
    return kept


def experts_forward(
    x: np.ndarray,
    idx: np.ndarray,
    w: np.ndarray,
    weights: Mapping[str, np.ndarray],
    score_before_experts: bool,
    cfg: MoEConfig | None = None,
) -> np.ndarray:
    """Steps 6-8: run each token through its k experts and combine. x [N,D], idx/w [N,k] -> [N,D].

    ``cfg`` (None: SwiGLU, no biases) gives step 7's ``expert_activation`` (``gated_activation``) and,
    with ``expert_proj_bias``, the biases ``experts.b1``, ``experts.b3`` [E, H] and ``experts.b2``
    [E, D] added to the gate, up and down projections:
    ``y = act(x W1[e]^T + b1[e], x W3[e]^T + b3[e]) W2[e]^T + b2[e]``.
    """
    w1, w2, w3 = (_f64(weights[f"experts.{n}"]) for n in ("w1", "w2", "w3"))
    act = cfg.expert_activation if cfg is not None else "silu"
    biased = cfg is not None and cfg.expert_proj_bias
    if biased:
        b1, b2, b3 = (_f64(weights[f"experts.{n}"]) for n in ("b1", "b2", "b3"))
    n_tokens, k = idx.shape
    out = np.zeros((n_tokens, x.shape[-1]))
    for e in range(w1.shape[0]):  # (6) expert-major order
        tok, slot = np.nonzero(idx == e)
        if tok.size == 0:
            continue
        scale = w[tok, slot][:, None]
        xe = x[tok] * scale if score_before_experts else x[tok]
        # (7) gated expert MLP (SwiGLU by default)
        if act == "silu" and not biased:
            ye = feed_forward(xe, w1[e], w2[e], w3[e])
        else:
            a1, a3 = xe @ w1[e].T, xe @ w3[e].T
            if biased:
                a1, a3 = a1 + b1[e], a3 + b3[e]
            ye = gated_activation(a1, a3, act, cfg.swiglu_alpha, cfg.swiglu_limit) @ w2[e].T
            if biased:
                ye = ye + b2[e]
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
                      kind: str, batch: int = 1, kept: np.ndarray | None = None) -> float:
    """Switch-style balance loss ``coeff * E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    ``f_i``: fraction of the N*k routed slots that chose expert i (not differentiable); with
    ``kept`` ([N, k] bool, step 6a, ``capacity_stats="kept"``: Megatron-Core) only kept slots count,
    still over N*k;
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
    np.add.at(onehot, (np.repeat(np.arange(n), k), idx.reshape(-1)),
              1.0 if kept is None else np.asarray(kept, np.float64).reshape(-1))
    frac = onehot.reshape(batch, n // batch, num_experts).sum(1) / (n // batch * k)  # [B, E]
    return float(coeff * num_experts * (frac * probs.mean(1)).sum(-1).mean())


def router_z_loss(logits: np.ndarray, coeff: float) -> float:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): ``coeff * mean(logsumexp(logits)^2)``; 0.0
    for no tokens (the mean over no tokens taken as 0)."""
    if logits.shape[0] == 0:
        return 0.0
    return float(coeff * np.mean(logsumexp(logits) ** 2))


def moe_forward(
    weights: Mapping[str, np.ndarray], x: np.ndarray, cfg: MoEConfig, kept_slots: np.ndarray | None = None
) -> tuple[np.ndarray, dict]:
    """The whole layer. weights: canonical mapping (DESIGN.md); x: [B, S, D] -> (out [B,S,D], aux).

    ``aux`` has the DESIGN.md keys; ``load_balance_loss`` / ``router_z_loss`` only when enabled;
    ``kept_slots`` [N,k] bool with capacity on (step 6a). ``kept_slots`` given replaces the drop
    decision of step 6a (``--lock-routing``).
    """
    x = _f64(x)
    if x.ndim != 3 or x.shape[-1] != cfg.dim:
        raise ValueError(f"x has shape {x.shape}; expected [batch, seq_len, dim={cfg.dim}]")
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    aux = route(tokens, weights["router.gate.weight"], cfg, weights.get("expert_bias"), **router_tensors(weights))
    # (6a) capacity: dropped slots go to no expert (index -1) and weigh 0
    loss_kept = apply_capacity(aux, cfg, b, kept_slots)
    idx = aux["selected_experts"] if "kept_slots" not in aux else np.where(aux["kept_slots"], aux["selected_experts"], -1)
    # (6) Gemma 4: the routed experts see their own RMS-normalised input (the router does not)
    out = experts_forward(expert_tokens(tokens, weights, cfg), idx, aux["routing_weights"], weights, cfg.score_before_experts, cfg)
    # (9) shared experts see every token
    if cfg.num_shared_experts:
        out = out + shared_experts(tokens, weights, cfg)
    if cfg.load_balance_loss is not None:
        aux["load_balance_loss"] = load_balance_loss(
            aux["scores"], aux["selected_experts"], cfg.num_experts, cfg.load_balance_coeff,
            cfg.load_balance_loss, batch=b, kept=loss_kept)
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
