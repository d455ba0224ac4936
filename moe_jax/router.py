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
from moe_jax.norm import rms_norm
from parity.config import validate_routing

ROUTE_NORM_EPS = 1e-20
INPUT_NORM_EPS = 1e-6


def router_dtype(dtype) -> jnp.dtype:
    """float32, or float64 for float64 inputs (so float64 gradient checks are not limited by f32)."""
    return jnp.promote_types(dtype, jnp.float32)


def router_scores(x: jax.Array, gate: jax.Array, score_func: str, input_scale: jax.Array | None = None,
                  input_norm_eps: float = INPUT_NORM_EPS, gate_bias: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """(1) ``logits = x @ gate`` with both operands upcast to float32, and ``scores`` (float32).

    x (N, D), gate (D, E) -> logits (N, E), scores (N, E); float64 for float64 inputs.
    ``input_scale`` (D,) given (``router_input_norm``, Gemma 4): the router sees
    ``rms_norm(x, input_norm_eps) * input_scale * D**-0.5`` instead of x.
    ``precision=HIGHEST`` keeps the float32 logits exact on accelerators (no TF32), so routing does
    not depend on the device.
    """
    dt = router_dtype(x.dtype)
    xr = x.astype(dt)
    if input_scale is not None:
        # (1) Gemma 4's router input: RMS-normalised without a weight, times the scale and dim**-0.5
        xr = rms_norm(xr, input_norm_eps) * input_scale.astype(dt) * jnp.asarray(x.shape[-1] ** -0.5, dt)
    logits = jnp.dot(xr, gate.astype(dt), precision=lax.Precision.HIGHEST)
    if gate_bias is not None:  # (1) GPT-OSS: + router.gate.bias (E,), upcast like the weight
        logits = logits + gate_bias.astype(dt)
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
    route_norm_p: float | None = None,
    input_scale: jax.Array | None = None,
    per_expert_scale: jax.Array | None = None,
    input_norm_eps: float = INPUT_NORM_EPS,
    gate_bias: jax.Array | None = None,
) -> RouterOutput:
    """Steps (1)-(5) for tokens ``x`` (N, D) and router weight ``gate`` (D, E) -> ``RouterOutput``.

    ``expert_bias`` (E,) float32 or None steers selection only, in ``route_order`` ("scale_first":
    select on ``scores * route_scale + expert_bias``, groups from ``scores * route_scale``;
    "bias_first": select on ``scores + expert_bias``, groups included; DESIGN.md steps 2-3).
    ``selected_experts`` (N, k) int, when given, replaces steps (2)-(4); the weights are still this
    router's scores at those indices. ``route_norm_p`` (with ``route_norm``): divide by the p-norm of
    the k weights (DBRX) instead of their sum. ``input_scale`` (D,) (Gemma 4's ``router.scale``): the
    router sees ``rms_norm(x, input_norm_eps) * input_scale * D**-0.5``; ``per_expert_scale`` (E,)
    (Gemma 4): the weights are multiplied by ``per_expert_scale[idx]`` after ``route_scale``.
    """
    # (1) float32 router logits and scores
    logits, scores = router_scores(x, gate, score_func, input_scale, input_norm_eps, gate_bias)
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
        # the sum, or DBRX's p-norm ``(sum |w|^p)^(1/p)`` of the k weights
        total = (w.sum(-1, keepdims=True) if route_norm_p is None
                 else jnp.linalg.norm(w, ord=route_norm_p, axis=-1, keepdims=True))
        eps = jnp.asarray(route_norm_eps, w.dtype)
        w = w / (jnp.maximum(total, eps) if route_norm_mode == "clamp" else total + eps)
    w = w * jnp.asarray(route_scale, w.dtype)
    if per_expert_scale is not None:  # Gemma 4: a learned scale per chosen expert
        w = w * per_expert_scale.astype(w.dtype)[idx]
    return RouterOutput(logits, scores, idx, w)


class TokenChoiceTopKRouter(nnx.Module):
    """Each token picks its ``top_k`` experts (token choice), with optional group-limited routing.

    Positional arguments as ``moe_torch.TokenChoiceTopKRouter`` (the original module's order: dim,
    num_experts, top_k=1, score_func="sigmoid", num_expert_groups=None, num_limited_groups=None,
    route_scale=1.0), then keyword-only ``route_norm=False``, ``group_score="max"``,
    ``route_order="scale_first"``, ``route_norm_eps=1e-20`` (the renormalisation's ``sum + eps``;
    MiniMax-M2: 0.0), ``route_norm_mode="add"`` ("clamp": ``max(sum, eps)``, Ernie 4.5),
    ``route_norm_p=None`` (DBRX: the p-norm instead of the sum), ``router_input_norm=False`` and
    ``per_expert_scale=False`` (Gemma 4: fixed, they add parameters), ``input_norm_eps=1e-6``,
    ``rngs``, ``param_dtype``. Invalid options raise ValueError (``parity.config.validate_routing``).

    Parameters: ``gate`` (dim, num_experts) in ``param_dtype`` (canonical ``router.gate.weight`` is its
    transpose); ``scale`` (dim,) with ``router_input_norm``; ``per_expert_scale`` (num_experts,) with
    ``per_expert_scale``; ``bias`` (num_experts,) with ``router_bias=True`` (GPT-OSS, step 1: ``logits =
    x @ gate + bias`` in float32; canonical ``router.gate.bias``).

    Call: ``router(x, expert_bias=None)`` -> ``(top_scores (N, k), selected_experts (N, k) int32,
    num_tokens_per_expert (E,) int32)`` as the torch router; ``router.route(x, expert_bias=None,
    selected_experts=None)`` -> ``RouterOutput``.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, score_func: str = "sigmoid",
                 num_expert_groups: int | None = None, num_limited_groups: int | None = None,
                 route_scale: float = 1.0, *, route_norm: bool = False, group_score: str = "max",
                 route_order: str = "scale_first", route_norm_eps: float = ROUTE_NORM_EPS,
                 route_norm_mode: str = "add", route_norm_p: float | None = None,
                 router_input_norm: bool = False, per_expert_scale: bool = False,
                 input_norm_eps: float = INPUT_NORM_EPS, router_bias: bool = False, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        for name, value in (("route_norm", route_norm), ("router_input_norm", router_input_norm),
                            ("per_expert_scale", per_expert_scale), ("router_bias", router_bias)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be True or False")
        if route_norm_p is not None and not route_norm:
            raise ValueError(f"route_norm_p={route_norm_p} needs route_norm=True")
        validate_routing(num_experts=num_experts, top_k=top_k, score_func=score_func,
                         route_scale=route_scale, num_expert_groups=num_expert_groups,
                         num_limited_groups=num_limited_groups, group_score=group_score,
                         route_order=route_order, route_norm_eps=route_norm_eps, route_norm_mode=route_norm_mode,
                         route_norm_p=route_norm_p, input_norm_eps=input_norm_eps)
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale
        self.num_expert_groups, self.num_limited_groups = num_expert_groups, num_limited_groups
        self.group_score, self.route_order, self.route_norm_eps = group_score, route_order, route_norm_eps
        self.route_norm_mode, self.route_norm_p, self.input_norm_eps = route_norm_mode, route_norm_p, input_norm_eps
        self.gate = nnx.Param(normal_init(rngs.params(), (dim, num_experts), dim, param_dtype))
        # (1) / (5) Gemma 4's router-input scale (D,) and per-expert weight scale (E,), ones; None without
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if router_input_norm else None
        self.per_expert_scale = nnx.Param(jnp.ones((num_experts,), param_dtype)) if per_expert_scale else None
        # (1) GPT-OSS's router bias (E,), zeros (canonical ``router.gate.bias``); None without
        self.bias = nnx.Param(jnp.zeros((num_experts,), param_dtype)) if router_bias else None

    @property
    def router_bias(self) -> bool:
        """Whether the router's logits get a bias (a ``bias`` parameter exists); fixed."""
        return self.bias is not None

    @property
    def router_input_norm(self) -> bool:
        """Whether the router RMS-normalises its input (a ``scale`` parameter exists); fixed."""
        return self.scale is not None

    def route(self, x: jax.Array, expert_bias: jax.Array | None = None,
              selected_experts: jax.Array | None = None) -> RouterOutput:
        return route(x, self.gate[...], top_k=self.top_k, score_func=self.score_func,
                     route_norm=self.route_norm, route_scale=self.route_scale,
                     num_expert_groups=self.num_expert_groups,
                     num_limited_groups=self.num_limited_groups, group_score=self.group_score,
                     route_order=self.route_order, route_norm_eps=self.route_norm_eps,
                     route_norm_mode=self.route_norm_mode, expert_bias=expert_bias,
                     selected_experts=selected_experts, route_norm_p=self.route_norm_p,
                     input_scale=None if self.scale is None else self.scale[...],
                     per_expert_scale=None if self.per_expert_scale is None else self.per_expert_scale[...],
                     input_norm_eps=self.input_norm_eps,
                     gate_bias=None if self.bias is None else self.bias[...])

    def __call__(self, x: jax.Array, expert_bias: jax.Array | None = None):
        r = self.route(x, expert_bias)
        counts = jnp.bincount(r.selected_experts.reshape(-1), length=self.num_experts).astype(jnp.int32)
        return r.routing_weights, r.selected_experts, counts
