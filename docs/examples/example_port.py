"""A small third-party-style MoE port, checked with moe-parity (docs/columns.md, "Worked example").

``TinyMoE`` is written the way a team's own port might be: its own parameter names and layouts
(experts stored ``[E, in, out]``, used as ``x @ W``), its own buffer names, ``(out, aux)`` returned.
It follows DESIGN.md's forward steps for a softmax router with ``route_scale``, the expert bias in
selection only, routing weights applied after the experts. Five bugs can be planted one at a time
(``bugs=``), each a mistake seen in real ports:

- ``"softmax_after_topk"``: softmax over the k selected logits instead of over all experts (step 5);
- ``"no_route_scale"``: ``route_scale`` dropped (step 5);
- ``"swap_w1_w3"``: the gate and up projections swapped (step 7);
- ``"bias_in_weights"``: the expert bias added to the routing weights, not only to the selection
  scores (steps 2 and 5);
- ``"ties_high"``: ties in top-k broken to the higher expert index (step 4 says the lower).

``make_column(bugs=())`` is the port as a parity column; ``CONFIG`` and ``example_inputs()`` the
config and the weights / input the worked example checks it with. Run ``python
docs/examples/example_port.py`` to see each planted bug caught.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from parity.backends.torch_module import TorchModuleColumn
from parity.config import MoEConfig
from parity.weights import init_weights

BUGS = ("softmax_after_topk", "no_route_scale", "swap_w1_w3", "bias_in_weights", "ties_high")

#: the layer the port implements: softmax top-2 of 8, route_scale 2.5, no renormalisation, expert
#: bias in selection, routing weights applied to the expert outputs
CONFIG = MoEConfig(dim=16, hidden_dim=32, num_experts=8, top_k=2, score_func="softmax", route_norm=False,
                   route_scale=2.5, use_expert_bias=True, score_before_experts=False, expert_kernel="loop")


class TinyMoE(nn.Module):
    """The port. x ``[B, S, D]`` -> (out ``[B, S, D]``, aux dict with DESIGN.md keys)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, route_scale: float,
                 bugs: tuple[str, ...] = ()):
        super().__init__()
        unknown = set(bugs) - set(BUGS)
        if unknown:
            raise ValueError(f"unknown bug(s) {sorted(unknown)}; expected some of {BUGS}")
        self.top_k, self.route_scale, self.bugs = top_k, route_scale, frozenset(bugs)
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.zeros(num_experts, dim, hidden))  # [E, D, H]: x @ W
        self.up_proj = nn.Parameter(torch.zeros(num_experts, dim, hidden))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, dim))  # [E, H, D]
        self.register_buffer("score_correction", torch.zeros(num_experts))
        self.register_buffer("expert_counts", torch.zeros(num_experts))

    def forward(self, x):
        b, s, d = x.shape
        tokens = x.reshape(-1, d)
        acc = torch.promote_types(x.dtype, torch.float32)  # the router in float32 at least (DESIGN step 1)
        logits = tokens.to(acc) @ self.router.weight.to(acc).T  # [N, E]
        scores = logits.softmax(-1)
        sel = scores + self.score_correction
        if "ties_high" in self.bugs:  # flip, take the first, flip back: the higher index wins a tie
            order = torch.sort(sel.flip(-1), dim=-1, descending=True, stable=True).indices[:, :self.top_k]
            idx = sel.shape[-1] - 1 - order
        else:
            idx = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :self.top_k]
        if "softmax_after_topk" in self.bugs:
            w = logits.gather(-1, idx).softmax(-1)
        elif "bias_in_weights" in self.bugs:
            w = sel.gather(-1, idx)
        else:
            w = scores.gather(-1, idx)
        if "no_route_scale" not in self.bugs:
            w = w * self.route_scale
        counts = torch.bincount(idx.reshape(-1), minlength=sel.shape[-1]).float()
        if self.training:
            self.expert_counts += counts
        gate, up = (self.up_proj, self.gate_proj) if "swap_w1_w3" in self.bugs else (self.gate_proj, self.up_proj)
        out = torch.zeros(tokens.shape, dtype=acc, device=x.device)  # the combine in float32 (step 8)
        for e in range(sel.shape[-1]):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if len(rows) == 0:
                continue
            h = nn.functional.silu(tokens[rows] @ gate[e]) * (tokens[rows] @ up[e])
            y = h @ self.down_proj[e]
            out.index_add_(0, rows, y.to(acc) * w[rows, slot, None].to(acc))
        aux = {"router_logits": logits, "scores": scores, "selected_experts": idx, "routing_weights": w,
               "tokens_per_expert": counts}
        return out.to(x.dtype).reshape(b, s, d), aux


#: canonical name <- the port's name: the experts are stored transposed ([E, D, H] for w1 [E, H, D])
MAPPING = {
    "router.weight": "router.gate.weight",
    "gate_proj": "experts.w1.T",
    "up_proj": "experts.w3.T",
    "down_proj": "experts.w2.T",
    "score_correction": "expert_bias",
    "expert_counts": "tokens_per_expert",
}


def make_column(bugs: tuple[str, ...] = ()) -> TorchModuleColumn:
    """The port as a column (``moe-parity run --backends docs.examples.example_port:make_column`` from
    the repository root, or ``assert_moe_parity(make_column(), config=CONFIG, ...)``)."""
    def factory(cfg: MoEConfig) -> TinyMoE:
        return TinyMoE(cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k, cfg.route_scale, bugs=bugs)

    name = "tiny-port" + (f"[{','.join(bugs)}]" if bugs else "")
    return TorchModuleColumn(factory, MAPPING, name=name)


def example_inputs(cfg: MoEConfig = CONFIG, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Weights and input that give every step something to check.

    The expert bias is non-zero (so that a bias in the routing weights shows) and equal for experts
    0, 1 and 2, the largest; the last two tokens are zero vectors, whose logits tie exactly, so their
    selection is decided by the bias and then by the tie rule alone (experts 0 and 1, DESIGN step 4).
    """
    weights = init_weights(cfg, seed)
    bias = np.array([0.02, 0.02, 0.02, -0.01, 0.005, -0.02, 0.01, -0.005], np.float32)[:cfg.num_experts]
    weights["expert_bias"] = bias
    x = np.random.default_rng(seed + 7).standard_normal((2, 8, cfg.dim)).astype(np.float32)
    x[1, -2:] = 0.0
    return weights, x


if __name__ == "__main__":  # the worked example, bug by bug
    from parity.testing import assert_moe_parity

    weights, x = example_inputs()
    for bugs in [(), *((b,) for b in BUGS)]:
        try:
            assert_moe_parity(make_column(bugs), config=CONFIG, weights=weights, x=x)
            print(f"{bugs or 'clean port'}: PASS")
        except AssertionError as exc:
            print(f"{bugs}: caught\n{exc}\n")
