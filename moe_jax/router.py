"""Token-choice top-k router, steps (1)-(5) of DESIGN.md (the float64 form is ``parity.reference.route``).

Shapes: ``N`` tokens, ``D`` model dim, ``E`` experts, ``k`` = top_k. Everything here runs in float32
(float64 for float64 inputs) whatever the input dtype: JAX's bfloat16 softmax accumulates in bfloat16 (torch's in float32), so the
inputs are upcast first.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from moe_jax.feed_forward import normal_init
from parity.config import validate_routing

ROUTE_NORM_EPS = 1e-20


def router_dtype(dtype) -> jnp.dtype:
    """float32, or float64 for float64 inputs (so float64 gradient checks are not limited by f32)."""
    return jnp.promote_types(dtype, jnp.float32)


def router_scores(x: jax.Array, gate: jax.Array, score_func: str) -> tuple[jax.Array, jax.Array]:
    """(1) ``logits = x @ gate`` with both operands upcast to float32, and ``scores`` (float32).

    x (N, D), gate (D, E) -> logits (N, E), scores (N, E); float64 for float64 inputs.
    ``precision=HIGHEST`` keeps the float32 logits exact on accelerators (no TF32), so routing does
    not depend on the device.
    """
    dt = router_dtype(x.dtype)
    logits = jnp.dot(x.astype(dt), gate.astype(dt), precision=lax.Precision.HIGHEST)
    scores = jax.nn.softmax(logits, axis=-1) if score_func == "softmax" else jax.nn.sigmoid(logits)
    return logits, scores


def topk_lower_index(values: jax.Array, k: int) -> jax.Array:
    """Indices of the k largest entries of each row, descending, ties to the lower index. (N, E) -> (N, k).

    ``jax.lax.top_k`` promises no order for ties; a stable sort of ``-values`` keeps equal entries in
    index order, as ``parity.reference.topk_lower_index`` does.
    """
    return jnp.argsort(-values, axis=-1, stable=True)[:, :k].astype(jnp.int32)


def group_limited_mask(sel: jax.Array, num_groups: int, num_limited_groups: int, group_score: str) -> jax.Array:
    """(3) Boolean (N, E): True for experts in the ``num_limited_groups`` best groups of each token.

    Group score: "max" of ``sel`` in the group (DeepSeek-V2) or the sum of its two largest entries
    (DeepSeek-V3, where ``sel`` includes the expert bias). Ties between groups go to the lower group.
    """
    n, e = sel.shape
    grouped = sel.reshape(n, num_groups, e // num_groups)
    if group_score == "max":
        gscore = grouped.max(-1)
    else:  # "top2_sum": the two largest values (their order is immaterial to the sum)
        gscore = lax.top_k(grouped, 2)[0].sum(-1)
    kept = topk_lower_index(gscore, num_limited_groups)  # (N, num_limited_groups)
    group_mask = jnp.zeros((n, num_groups), bool).at[jnp.arange(n)[:, None], kept].set(True)
    return jnp.repeat(group_mask, e // num_groups, axis=-1)


class RouterOutput(NamedTuple):
    """What ``TokenChoiceTopKRouter.route`` returns (the same fields as ``moe_torch``'s router).

    float32 (float64 for float64 input); N tokens, E experts, k = top_k.
    """

    router_logits: jax.Array  # (N, E)
    scores: jax.Array  # (N, E) softmax or sigmoid of the logits, unbiased, unscaled
    selected_experts: jax.Array  # (N, k) int32, descending selection score, ties to the lower index
    routing_weights: jax.Array  # (N, k) step (5): unbiased, optionally renormalised, times route_scale


def route(
    x: jax.Array,
    gate: jax.Array,
    *,
    top_k: int,
    score_func: str,
    route_norm: bool,
    route_scale: float,
    num_expert_groups: int | None = None,
    num_limited_groups: int | None = None,
    group_score: str = "max",
    route_order: str = "scale_first",
    route_norm_eps: float = ROUTE_NORM_EPS,
    route_norm_mode: str = "add",
    expert_bias: jax.Array | None = None,
    selected_experts: jax.Array | None = None,
) -> RouterOutput:
    """Steps (1)-(5) for tokens ``x`` (N, D) and router weight ``gate`` (D, E) -> ``RouterOutput``.

    ``expert_bias`` (E,) float32 or None steers selection only, in ``route_order`` ("scale_first":
    select on ``scores * route_scale + expert_bias``, groups from ``scores * route_scale``;
    "bias_first": select on ``scores + expert_bias``, groups included; DESIGN.md steps 2-3).
    ``selected_experts`` (N, k) int, when given, replaces steps (2)-(4); the weights are still this
    router's scores at those indices.
    """
    # (1) float32 router logits and scores
    logits, scores = router_scores(x, gate, score_func)
    if selected_experts is None:
        bias = None if expert_bias is None else expert_bias.astype(scores.dtype)
        if route_order == "scale_first":
            # (2) scaled, unbiased scores choose the groups; the bias steers selection only
            group_src = scores * jnp.asarray(route_scale, scores.dtype)
            sel = group_src if bias is None else group_src + bias
        else:
            # (2) expert bias steers selection only, the group step included
            sel = scores if bias is None else scores + bias
            group_src = sel
        # (3) group-limited routing
        if num_expert_groups is not None:
            keep = group_limited_mask(group_src, num_expert_groups, num_limited_groups, group_score)
            sel = jnp.where(keep, sel, -jnp.inf)
        # (4) top-k, ties to the lower expert index
        idx = topk_lower_index(sel, top_k)
    else:
        idx = selected_experts.astype(jnp.int32)
    # (5) unbiased routing weights (the same in both route orders)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if route_norm:
        total = w.sum(-1, keepdims=True)
        eps = jnp.asarray(route_norm_eps, w.dtype)
        w = w / (jnp.maximum(total, eps) if route_norm_mode == "clamp" else total + eps)
    w = w * jnp.asarray(route_scale, w.dtype)
    return RouterOutput(logits, scores, idx, w)


class TokenChoiceTopKRouter(nnx.Module):
    """Each token picks its ``top_k`` experts (token choice), with optional group-limited routing.

    Positional arguments as ``moe_torch.TokenChoiceTopKRouter`` (the original module's order: dim,
    num_experts, top_k=1, score_func="sigmoid", num_expert_groups=None, num_limited_groups=None,
    route_scale=1.0), then keyword-only ``route_norm=False``, ``group_score="max"``,
    ``route_order="scale_first"``, ``route_norm_eps=1e-20`` (the renormalisation's ``sum + eps``;
    MiniMax-M2: 0.0), ``route_norm_mode="add"`` ("clamp": ``max(sum, eps)``, Ernie 4.5), ``rngs``, ``param_dtype``. Invalid options raise ValueError
    (``parity.config.validate_routing``).

    Parameter: ``gate`` (dim, num_experts) in ``param_dtype`` (canonical ``router.gate.weight`` is its
    transpose).

    Call: ``router(x, expert_bias=None)`` -> ``(top_scores (N, k), selected_experts (N, k) int32,
    num_tokens_per_expert (E,) int32)`` as the torch router; ``router.route(x, expert_bias=None,
    selected_experts=None)`` -> ``RouterOutput``.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, score_func: str = "sigmoid",
                 num_expert_groups: int | None = None, num_limited_groups: int | None = None,
                 route_scale: float = 1.0, *, route_norm: bool = False, group_score: str = "max",
                 route_order: str = "scale_first", route_norm_eps: float = ROUTE_NORM_EPS,
                 route_norm_mode: str = "add", rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not isinstance(route_norm, bool):
            raise ValueError(f"route_norm={route_norm!r} must be True or False")
        validate_routing(num_experts=num_experts, top_k=top_k, score_func=score_func,
                         route_scale=route_scale, num_expert_groups=num_expert_groups,
                         num_limited_groups=num_limited_groups, group_score=group_score,
                         route_order=route_order, route_norm_eps=route_norm_eps, route_norm_mode=route_norm_mode)
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale
        self.num_expert_groups, self.num_limited_groups = num_expert_groups, num_limited_groups
        self.group_score, self.route_order, self.route_norm_eps = group_score, route_order, route_norm_eps
        self.route_norm_mode = route_norm_mode
        self.gate = nnx.Param(normal_init(rngs.params(), (dim, num_experts), dim, param_dtype))

    def route(self, x: jax.Array, expert_bias: jax.Array | None = None,
              selected_experts: jax.Array | None = None) -> RouterOutput:
        return route(x, self.gate[...], top_k=self.top_k, score_func=self.score_func,
                     route_norm=self.route_norm, route_scale=self.route_scale,
                     num_expert_groups=self.num_expert_groups,
                     num_limited_groups=self.num_limited_groups, group_score=self.group_score,
                     route_order=self.route_order, route_norm_eps=self.route_norm_eps,
                     route_norm_mode=self.route_norm_mode, expert_bias=expert_bias,
                     selected_experts=selected_experts)

    def __call__(self, x: jax.Array, expert_bias: jax.Array | None = None):
        r = self.route(x, expert_bias)
        counts = jnp.bincount(r.selected_experts.reshape(-1), length=self.num_experts).astype(jnp.int32)
        return r.routing_weights, r.selected_experts, counts
