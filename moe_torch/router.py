"""Token-choice top-k router (DESIGN.md steps 1-5), in the order of ``parity/reference.py``.

Shapes: N = bs*slen tokens, D = dim, E = num_experts, k = top_k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_torch.feed_forward import local_tensor
from moe_torch.norm import rms_norm
from parity.config import validate_routing

ROUTE_NORM_EPS = 1e-20
INPUT_NORM_EPS = 1e-6


def topk_lower_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row, descending, ties to the lower index.

    values (N, M) -> (N, k) int64. NOTE: ``torch.topk``'s tie order is not promised and differs
    between CPU and CUDA; a stable ascending sort of ``-values`` keeps equal entries in index order
    on every device (negation is exact), the same rule as the reference's ``np.argsort(kind="stable")``.
    """
    return torch.sort(-values, dim=-1, stable=True).indices[..., :k]


def group_limited_mask(sel: torch.Tensor, num_groups: int, num_limited_groups: int,
                       group_score: str) -> torch.Tensor:
    """(3) Boolean (N, E): True for experts in the ``num_limited_groups`` best groups of each token.

    Group score: "max" of ``sel`` in the group (DeepSeek-V2) or the sum of its two largest entries
    (DeepSeek-V3, ``sel`` includes the expert bias). Ties between groups go to the lower group.
    """
    n, e = sel.shape
    grouped = sel.view(n, num_groups, e // num_groups)
    if group_score == "max":
        gscore = grouped.amax(-1)
    else:  # "top2_sum": the two largest values; their sum does not depend on tie order
        gscore = grouped.topk(2, dim=-1).values.sum(-1)
    kept = topk_lower_index(gscore, num_limited_groups)
    group_mask = torch.zeros(n, num_groups, dtype=torch.bool, device=sel.device).scatter_(1, kept, True)
    return group_mask.repeat_interleave(e // num_groups, dim=-1)


class RouterOutput(NamedTuple):
    """What ``TokenChoiceTopKRouter.route`` returns (the same fields as ``moe_jax``'s router).

    Float tensors in float32 (float64 for float64 input); N tokens, E experts, k = top_k.
    """

    router_logits: torch.Tensor  # (N, E), differentiable
    scores: torch.Tensor  # (N, E) softmax or sigmoid of the logits, unbiased, unscaled, differentiable
    selected_experts: torch.Tensor  # (N, k) int64, descending selection score, ties to the lower index
    routing_weights: torch.Tensor  # (N, k) step (5): unbiased, optionally renormalised, times route_scale


# the router's options; assigning one re-validates the whole set (``parity.config.validate_routing``)
ROUTING_OPTIONS = ("top_k", "score_func", "route_norm", "route_scale", "num_expert_groups", "num_limited_groups",
                   "group_score", "route_order", "route_norm_eps",
                   "route_norm_mode", "route_norm_p", "input_norm_eps")


class TokenChoiceTopKRouter(nn.Module):
    """Each token picks its top-k experts (token choice), with the options of DESIGN.md.

    The positional arguments are those of the original PyTorch module this kit grew from; the
    options it did not have are keyword-only.

    Args:
        dim, num_experts: sizes D and E.
        top_k: experts per token (default 1).
        score_func: "sigmoid" (default) | "softmax".
        num_expert_groups, num_limited_groups: group-limited routing (DeepSeek-V2/V3): keep the
            ``num_limited_groups`` best of ``num_expert_groups`` equal groups; both or neither.
        route_scale: multiplies the routing weights (DeepSeek-V3: 2.5); default 1.0.
        route_norm: renormalise the k routing weights to sum to 1 (``/ (sum + route_norm_eps)``) before
            ``route_scale``.
        route_norm_eps: the epsilon of that sum (default 1e-20; MiniMax-M2: 0.0, the bare sum); >= 0.
        route_norm_mode: "add" (default: ``sum + route_norm_eps``) | "clamp" (``max(sum,
            route_norm_eps)``, Ernie 4.5's ``clamp(min=moe_norm_min)``). DESIGN.md step 5.
        group_score: "max" (DeepSeek-V2) | "top2_sum" (DeepSeek-V3) score of a group.
        route_order: "scale_first" (default, the original module: select on ``scores * route_scale +
            expert_bias``, groups from ``scores * route_scale``) | "bias_first" (DeepSeek-V3 /
            torchtitan: select on ``scores + expert_bias``, groups included). DESIGN.md steps 2-3.
        route_norm_p: None (default: divide by the sum) | a finite p > 0: with ``route_norm``, divide
            by the p-norm ``(sum |w|^p)^(1/p)`` of the k weights (DBRX's ``moe_normalize_expert_weights``).
        router_input_norm: the router sees ``rms_norm(x) * scale * dim**-0.5`` (Gemma 4's router;
            adds the parameter ``scale`` (D,)). Fixed at construction.
        per_expert_scale: the routing weights are multiplied by ``per_expert_scale[idx]`` after
            ``route_scale`` (Gemma 4; adds the parameter ``per_expert_scale`` (E,)). Fixed.
        input_norm_eps: the epsilon of that RMSNorm, ``x * (mean(x**2) + eps) ** -0.5`` (default
            1e-6, Gemma 4's ``rms_norm_eps``); >= 0.

    Parameters: ``gate`` (nn.Linear D -> E; canonical name ``gate.weight`` (E, D); with
    ``router_bias=True`` (GPT-OSS, step 1: ``logits = x @ gate.T + bias`` in float32) also ``gate.bias``
    (E,), zero after ``init_weights``); ``scale`` (D,) with ``router_input_norm``; ``per_expert_scale``
    (E,) with ``per_expert_scale``.
    Raises ``ValueError`` for invalid options (``parity.config.validate_routing``), at construction
    and when an option attribute is assigned (change several at once with ``configure``);
    ``num_experts`` is fixed by the gate's shape (``AttributeError`` on assignment).

    ``router(x, expert_bias=None)`` (the original's call): x (N, D) any float dtype ->
    ``(top_scores (N, k) float32, selected_experts (N, k) int64, num_tokens_per_expert (E,) int64)``;
    ``top_scores`` are the routing weights (differentiable), ``expert_bias`` (E,) steers the
    selection only. ``router.route(...)`` gives every intermediate as a ``RouterOutput``.

    Example::
        >>> router = TokenChoiceTopKRouter(dim=64, num_experts=8, top_k=2)
        >>> scores, indices, counts = router(torch.randn(32, 64))
        >>> scores.shape, indices.shape, counts.shape
        (torch.Size([32, 2]), torch.Size([32, 2]), torch.Size([8]))
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, score_func: str = "sigmoid",
                 num_expert_groups: int | None = None, num_limited_groups: int | None = None,
                 route_scale: float = 1.0, *, route_norm: bool = False, group_score: str = "max",
                 route_order: str = "scale_first", route_norm_eps: float = ROUTE_NORM_EPS,
                 route_norm_mode: str = "add", route_norm_p: float | None = None,
                 router_input_norm: bool = False, per_expert_scale: bool = False,
                 input_norm_eps: float = INPUT_NORM_EPS, router_bias: bool = False):
        super().__init__()
        options = dict(top_k=top_k, score_func=score_func, route_norm=route_norm, route_scale=route_scale,
                       num_expert_groups=num_expert_groups, num_limited_groups=num_limited_groups,
                       group_score=group_score, route_order=route_order, route_norm_eps=route_norm_eps,
                       route_norm_mode=route_norm_mode, route_norm_p=route_norm_p, input_norm_eps=input_norm_eps)
        self._check_options(num_experts, options)
        for name, value in (("router_input_norm", router_input_norm), ("per_expert_scale", per_expert_scale),
                            ("router_bias", router_bias)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be True or False")
        # (1) GPT-OSS's router is a Linear with a bias (``gate.bias`` (E,)); the others have none
        self.gate = nn.Linear(dim, num_experts, bias=router_bias)
        # (1) / (5) Gemma 4's learned router-input scale and per-expert weight scale (None without)
        self.scale = nn.Parameter(torch.ones(dim)) if router_input_norm else None
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts)) if per_expert_scale else None
        self._num_experts = num_experts
        for name, value in options.items():
            super().__setattr__(name, value)

    @property
    def router_input_norm(self) -> bool:
        """Whether the router RMS-normalises its input (a ``scale`` parameter exists); fixed."""
        return self.scale is not None

    @staticmethod
    def _check_options(num_experts: int, options: dict) -> None:
        if not isinstance(options["route_norm"], bool):
            raise ValueError(f"route_norm={options['route_norm']!r} must be True or False")
        if options.get("route_norm_p") is not None and not options["route_norm"]:
            raise ValueError(f"route_norm_p={options['route_norm_p']} needs route_norm=True")
        validate_routing(num_experts=num_experts, **{k: v for k, v in options.items() if k != "route_norm"})

    @property
    def num_experts(self) -> int:
        """E, fixed by ``gate.weight`` (E, D)."""
        return self._num_experts

    @num_experts.setter
    def num_experts(self, value) -> None:
        raise AttributeError(f"num_experts is fixed by the gate weight's shape ({self._num_experts}, "
                             f"{self.gate.in_features}); cannot set it to {value!r}: build a new router")

    def __setattr__(self, name: str, value) -> None:
        if name in ROUTING_OPTIONS and name in self.__dict__:
            try:
                self.configure(**{name: value})
            except ValueError as exc:
                raise ValueError(f"{exc} (assign several routing options together with "
                                 f"router.configure(...))") from None
            return
        super().__setattr__(name, value)

    def configure(self, **changes) -> None:
        """Change several routing options at once (e.g. ``num_expert_groups`` with
        ``num_limited_groups``), validated together; nothing changes when they are invalid.

        Raises ``ValueError`` naming the offending field and value, or an unknown option.
        """
        unknown = sorted(set(changes) - set(ROUTING_OPTIONS))
        if unknown:
            raise ValueError(f"unknown routing option(s) {unknown}; allowed: {list(ROUTING_OPTIONS)}")
        options = {name: self.__dict__[name] for name in ROUTING_OPTIONS}
        options.update(changes)
        self._check_options(self._num_experts, options)
        self.__dict__.update(changes)

    def init_weights(self, std: float | None = None) -> None:
        nn.init.normal_(self.gate.weight, 0.0, std if std is not None else self.gate.in_features ** -0.5)
        for scale in (self.scale, self.per_expert_scale):  # Gemma 4 initialises its scales to 1
            if scale is not None:
                nn.init.ones_(scale)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    def _check_selected(self, selected: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(selected, torch.Tensor) or selected.dtype.is_floating_point or selected.dtype.is_complex \
                or selected.dtype == torch.bool:
            got = selected.dtype if isinstance(selected, torch.Tensor) else type(selected).__name__
            raise TypeError(f"selected_experts must be an integer tensor, got {got}")
        if tuple(selected.shape) != (n, self.top_k):
            raise ValueError(f"selected_experts has shape {tuple(selected.shape)}; expected "
                             f"[num_tokens={n}, top_k={self.top_k}]")
        if torch.compiler.is_compiling():
            # NOTE: no host read under torch.compile (a graph break): the same range check, raised at run time
            if selected.numel():
                torch._assert_async((selected.min() >= 0) & (selected.max() < self.num_experts),
                                    f"selected_experts holds values outside [0, {self.num_experts - 1}]; "
                                    f"expected expert indices in [0, {self.num_experts - 1}]")
        elif selected.numel() and (selected.min() < 0 or selected.max() >= self.num_experts):
            raise ValueError(f"selected_experts holds values in [{int(selected.min())}, {int(selected.max())}]; "
                             f"expected expert indices in [0, {self.num_experts - 1}]")
        return selected.to(torch.int64)

    def route(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None,
              selected_experts: torch.Tensor | None = None) -> RouterOutput:
        """Steps (1)-(5): x (N, D) any float dtype -> ``RouterOutput``.

        ``expert_bias`` (E,) steers the selection only (None: no bias). ``selected_experts`` (N, k)
        integer, when given, replaces steps (2)-(4); the weights are this router's at those indices.
        Raises ``TypeError`` / ``ValueError`` for a bad ``selected_experts``.
        """
        # (1) float32-or-wider router: both operands upcast first (float64 stays float64)
        rdtype = torch.promote_types(x.dtype, torch.float32)
        xr = x.to(rdtype)
        if self.scale is not None:
            # (1) Gemma 4's router input: RMS-normalised without a weight, times scale and dim**-0.5
            xr = rms_norm(xr, self.input_norm_eps) * local_tensor(self.scale).to(rdtype) * self.gate.in_features ** -0.5
        if self.gate.bias is None:
            logits = F.linear(xr, local_tensor(self.gate.weight).to(rdtype))
        else:  # (1) GPT-OSS: + gate.bias, upcast like the weight
            logits = F.linear(xr, local_tensor(self.gate.weight).to(rdtype), local_tensor(self.gate.bias).to(rdtype))
        scores = torch.softmax(logits, dim=-1) if self.score_func == "softmax" else torch.sigmoid(logits)
        if selected_experts is None:
            with torch.no_grad():
                bias = local_tensor(expert_bias).to(rdtype) if expert_bias is not None else None
                if self.route_order == "scale_first":
                    # (2) scaled, unbiased scores choose the groups; the bias steers selection only
                    group_src = scores * self.route_scale
                    sel = group_src + bias if bias is not None else group_src
                else:
                    # (2) expert bias steers selection only, the group step included
                    sel = scores + bias if bias is not None else scores
                    group_src = sel
                # (3) group-limited routing
                if self.num_expert_groups is not None:
                    keep = group_limited_mask(group_src, self.num_expert_groups, self.num_limited_groups,
                                              self.group_score)
                    sel = sel.masked_fill(~keep, float("-inf"))
                # (4) top-k, ties to the lower expert index
                idx = topk_lower_index(sel, self.top_k)
        else:
            idx = self._check_selected(local_tensor(selected_experts), x.shape[0]).to(x.device)
        # (5) unbiased routing weights (the same in both route orders)
        w = scores.gather(-1, idx)
        if self.route_norm:
            # the sum, or DBRX's p-norm (torch.norm(p=moe_normalize_expert_weights) is this vector_norm)
            total = (w.sum(-1, keepdim=True) if self.route_norm_p is None
                     else torch.linalg.vector_norm(w, ord=self.route_norm_p, dim=-1, keepdim=True))
            w = w / (total.clamp(min=self.route_norm_eps) if self.route_norm_mode == "clamp"
                     else total + self.route_norm_eps)
        w = w * self.route_scale
        if self.per_expert_scale is not None:  # Gemma 4: a learned scale per chosen expert
            w = w * local_tensor(self.per_expert_scale).to(w.dtype)[idx]
        return RouterOutput(logits, scores, idx, w)

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None):
        """The original module's call: ``(top_scores (N, k), selected_experts (N, k) int64,
        num_tokens_per_expert (E,) int64)`` for x (N, D); see ``route``."""
        r = self.route(x, expert_bias)
        counts = torch.bincount(r.selected_experts.reshape(-1), minlength=self.num_experts)
        return r.routing_weights, r.selected_experts, counts

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, score_func={self.score_func!r}, "
                f"route_norm={self.route_norm}, route_scale={self.route_scale}, "
                f"num_expert_groups={self.num_expert_groups}, num_limited_groups={self.num_limited_groups}, "
                f"group_score={self.group_score!r}, route_order={self.route_order!r}, "
                f"route_norm_eps={self.route_norm_eps}, route_norm_mode={self.route_norm_mode!r}, "
                f"route_norm_p={self.route_norm_p}, router_input_norm={self.router_input_norm}, "
                f"per_expert_scale={self.per_expert_scale is not None}, input_norm_eps={self.input_norm_eps}")
