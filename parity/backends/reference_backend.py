"""The float64 NumPy reference as the harness uses it, and a runner that wraps it.

``reference_forward`` is ``parity.reference.moe_forward`` plus one option the harness needs for
``--lock-routing``: ``selected_experts`` replaces step (4) (top-k), exactly as the backends' keyword
of the same name does; steps (5)-(9) are the reference's own functions.

``ReferenceRunner`` is a fake backend (float64 maths, results rounded to the run's dtype): the
harness's tests use it to check the harness's own logic without torch or JAX.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from parity import reference as ref
from parity.backends.base import Runner, Tensors
from parity.config import MoEConfig
from parity.metrics import round_to


def selection_scores(cfg: MoEConfig, scores: np.ndarray, expert_bias: np.ndarray | None) -> np.ndarray:
    """Steps (2)-(3): the scores top-k selects on (bias added, dropped groups at -inf, in
    ``cfg.route_order``: ``parity.reference.selection_scores``). [N,E] float64."""
    return ref.selection_scores(cfg, scores, expert_bias)


def selection_margins(cfg: MoEConfig, scores: np.ndarray, expert_bias: np.ndarray | None) -> np.ndarray:
    """Per token, how far step (4) (and step (3)'s group choice) was from a tie. [N] float64.

    The gap between the k-th and (k+1)-th selection scores; with groups, also the gap between the
    last kept and the first dropped group score (the smaller gap counts). ``inf`` when nothing competes.
    """
    sel = scores + np.asarray(expert_bias, np.float64) if (cfg.use_expert_bias and expert_bias is not None) \
        else scores.copy()
    if cfg.route_order == "scale_first":  # the groups are chosen on the scaled, unbiased scores
        sel = scores * cfg.route_scale
    margins = np.full(sel.shape[0], np.inf)
    if cfg.num_expert_groups is not None:
        n, e = sel.shape
        grouped = sel.reshape(n, cfg.num_expert_groups, e // cfg.num_expert_groups)
        gscore = grouped.max(-1) if cfg.group_score == "max" else -np.sort(-grouped, -1)[..., :2].sum(-1)
        gs = -np.sort(-gscore, axis=-1)
        if cfg.num_limited_groups < cfg.num_expert_groups:
            margins = gs[:, cfg.num_limited_groups - 1] - gs[:, cfg.num_limited_groups]
    s = -np.sort(-selection_scores(cfg, scores, expert_bias), axis=-1)
    k = cfg.top_k
    if k < s.shape[1]:
        with np.errstate(invalid="ignore"):
            gap = s[:, k - 1] - s[:, k]
        margins = np.minimum(margins, np.where(np.isfinite(gap), gap, np.inf))
    return margins


def reference_forward(weights: Mapping[str, np.ndarray], x: np.ndarray, cfg: MoEConfig,
                      selected_experts: np.ndarray | None = None,
                      kept_slots: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The float64 layer. x [B,S,D] -> (out [B,S,D], aux); ``selected_experts`` [N,k] replaces step (4),
    ``kept_slots`` [N,k] bool the drop decision of step (6a) (with a capacity)."""
    if selected_experts is None:
        return ref.moe_forward(weights, x, cfg, kept_slots)
    x = np.asarray(x, np.float64)
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    idx = np.asarray(selected_experts, np.int64)
    if idx.shape != (b * s, cfg.top_k):
        raise ValueError(f"selected_experts has shape {idx.shape}; expected [N={b * s}, top_k={cfg.top_k}]")
    # (1) router logits and scores, (4) given, (5) the routing weights: the reference's own step functions
    # (every step-1 and step-5 option: route_norm_eps / mode / p, Gemma 4's scales, the router bias)
    aux = ref.route(tokens, weights["router.gate.weight"], cfg, weights.get("expert_bias"),
                    **ref.router_tensors(weights), selected_experts=idx)
    logits, scores = aux["router_logits"], aux["scores"]
    # (6a) capacity: dropped slots go to no expert (index -1) and weigh 0
    loss_kept = ref.apply_capacity(aux, cfg, b, kept_slots)
    w = aux["routing_weights"]
    expert_idx = idx if "kept_slots" not in aux else np.where(aux["kept_slots"], idx, -1)
    # (6)-(8) experts and combine
    out = ref.experts_forward(ref.expert_tokens(tokens, weights, cfg), expert_idx, w, weights,
                              cfg.score_before_experts, cfg)
    # (9) shared experts
    if cfg.num_shared_experts:
        out = out + ref.shared_experts(tokens, weights, cfg)
    if cfg.load_balance_loss is not None:
        aux["load_balance_loss"] = ref.load_balance_loss(scores, idx, cfg.num_experts, cfg.load_balance_coeff,
                                                         cfg.load_balance_loss, batch=b, kept=loss_kept)
    if cfg.router_z_loss_coeff > 0:
        aux["router_z_loss"] = ref.router_z_loss(logits, cfg.router_z_loss_coeff)
    return out.reshape(b, s, d), aux


_AUX_F32 = ("router_logits", "scores", "routing_weights", "tokens_per_expert", "load_balance_loss",
            "router_z_loss")


class ReferenceRunner(Runner):
    """A fake backend: the float64 reference, with ``out`` rounded to the dtype and aux to float32.

    No gradients. Used by the harness's own tests (and handy as a sanity column).
    """

    capabilities = frozenset({"forward", "aux", "lock", "bias"})

    def __init__(self, name: str = "reference:cpu", **hooks):
        super().__init__(**hooks)
        self.name = name

    def forward(self, cfg, weights, x, dtype, selected_experts=None, kept_slots=None) -> Tensors:
        cfg, weights = self.prepare(cfg, weights)
        out, aux = reference_forward(weights, x, cfg, selected_experts, kept_slots)
        t = Tensors()
        t.put("out", round_to(out, dtype), dtype)
        aux_dtype = "float64" if dtype == "float64" else "float32"
        for key, value in aux.items():
            if key == "selected_experts":
                t.put(key, np.asarray(value, np.int64), "int64")
            else:
                t.put(key, round_to(np.asarray(value, np.float64), aux_dtype), aux_dtype)
        return t

    def bias_steps(self, cfg, weights, xs: Sequence[np.ndarray], dtype, lr) -> list[Tensors]:
        cfg, weights = self.prepare(cfg, weights)
        bias = np.asarray(weights["expert_bias"], np.float32)
        steps = []
        for x in xs:
            _, aux = reference_forward({**weights, "expert_bias": bias}, x, cfg)
            counts = aux["tokens_per_expert"].astype(np.float32)
            bias = ref.update_expert_bias(bias, counts, lr)
            t = Tensors()
            t.put("tokens_per_expert", counts.astype(np.float64), "float32")
            t.put("selected_experts", aux["selected_experts"], "int64")
            t.put("expert_bias", bias.astype(np.float64), "float32")
            steps.append(t)
        return steps
