"""Token-choice top-k router (DESIGN.md steps 1-5), in the order of ``parity/reference.py``.

Shapes: N = bs*slen tokens, D = dim, E = num_experts, k = top_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_torch.feed_forward import local_tensor
from parity.config import validate_routing

ROUTE_NORM_EPS = 1e-20


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


class TokenChoiceTopKRouter(nn.Module):
    """Each token picks its top-k experts (token choice), with the options of DESIGN.md.

    Args:
        dim, num_experts, top_k: sizes.
        score_func: "softmax" | "sigmoid".
        route_norm: renormalise the k routing weights to sum to 1 (+1e-20).
        route_scale: multiply the routing weights (DeepSeek-V3: 2.5).
        num_expert_groups, num_limited_groups, group_score: group-limited routing (DeepSeek-V2/V3).

    Parameter: ``gate`` (nn.Linear D -> E, no bias; canonical name ``gate.weight`` (E, D)).
    Raises ``ValueError`` for invalid options (``parity.config.validate_routing``).

    ``forward(x, expert_bias=None, selected_experts=None)``: x (N, D) any float dtype ->
    ``(router_logits (N, E), scores (N, E), selected_experts (N, k) int64, routing_weights (N, k))``, the
    float tensors in float32 (float64 when x is float64: the router is float32 or wider).
    ``expert_bias`` (E,) steers the selection only; ``selected_experts`` replaces step 4.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, score_func: str = "sigmoid",
                 route_norm: bool = False, route_scale: float = 1.0, num_expert_groups: int | None = None,
                 num_limited_groups: int | None = None, group_score: str = "max"):
        super().__init__()
        validate_routing(num_experts=num_experts, top_k=top_k, score_func=score_func, route_scale=route_scale,
                         num_expert_groups=num_expert_groups, num_limited_groups=num_limited_groups,
                         group_score=group_score)
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.route_norm = route_norm
        self.route_scale = route_scale
        self.num_expert_groups = num_expert_groups
        self.num_limited_groups = num_limited_groups
        self.group_score = group_score
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def init_weights(self, std: float | None = None) -> None:
        nn.init.normal_(self.gate.weight, 0.0, std if std is not None else self.gate.in_features ** -0.5)

    def _check_selected(self, selected: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(selected, torch.Tensor) or selected.dtype.is_floating_point or selected.dtype.is_complex \
                or selected.dtype == torch.bool:
            got = selected.dtype if isinstance(selected, torch.Tensor) else type(selected).__name__
            raise TypeError(f"selected_experts must be an integer tensor, got {got}")
        if tuple(selected.shape) != (n, self.top_k):
            raise ValueError(f"selected_experts has shape {tuple(selected.shape)}; expected "
                             f"[num_tokens={n}, top_k={self.top_k}]")
        if selected.numel() and (selected.min() < 0 or selected.max() >= self.num_experts):
            raise ValueError(f"selected_experts holds values in [{int(selected.min())}, {int(selected.max())}]; "
                             f"expected expert indices in [0, {self.num_experts - 1}]")
        return selected.to(torch.int64)

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None,
                selected_experts: torch.Tensor | None = None):
        # (1) float32-or-wider router: both operands upcast first (float64 stays float64)
        rdtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(rdtype), local_tensor(self.gate.weight).to(rdtype))
        scores = torch.softmax(logits, dim=-1) if self.score_func == "softmax" else torch.sigmoid(logits)
        if selected_experts is None:
            with torch.no_grad():
                # (2) expert bias steers selection only
                sel = scores + local_tensor(expert_bias).to(rdtype) if expert_bias is not None else scores
                # (3) group-limited routing
                if self.num_expert_groups is not None:
                    keep = group_limited_mask(sel, self.num_expert_groups, self.num_limited_groups,
                                              self.group_score)
                    sel = sel.masked_fill(~keep, float("-inf"))
                # (4) top-k, ties to the lower expert index
                idx = topk_lower_index(sel, self.top_k)
        else:
            idx = self._check_selected(local_tensor(selected_experts), x.shape[0]).to(x.device)
        # (5) unbiased routing weights
        w = scores.gather(-1, idx)
        if self.route_norm:
            w = w / (w.sum(-1, keepdim=True) + ROUTE_NORM_EPS)
        w = w * self.route_scale
        return logits, scores, idx, w

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, score_func={self.score_func!r}, "
                f"route_norm={self.route_norm}, route_scale={self.route_scale}, "
                f"num_expert_groups={self.num_expert_groups}, num_limited_groups={self.num_limited_groups}, "
                f"group_score={self.group_score!r}")
