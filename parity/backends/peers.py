"""Other projects' MoE layers as columns, through the same adapter as a user's (docs/columns.md, "Peers").

``PEERS``: name -> what it is. ``make_peer(name)`` builds the column. A peer is a
``TorchModuleColumn`` (``parity.backends.torch_module``) around the other project's own module,
loaded from the canonical weights by a name mapping; nothing of the peer's maths is rewritten here.
A peer that is not installed is SKIPPED with the reason; a config the peer cannot express
(``unsupported(cfg)``) is SKIPPED too, naming the options.

torchtitan (``torchtitan.models.common.moe.MoE``, torchtitan 0.3): the router's outputs (scores,
selected experts, routing weights) are read by a forward hook; the training-mode counts come from
its ``tokens_per_expert_E`` buffer. Its bias update lives in an optimizer pre-step hook that needs a
whole torchtitan model (``torchtitan/components/optimizer.py``), so the column applies that rule as
the hook states it: ``delta = coeff * sign(mean(counts) - counts)``, centred (``delta - mean(delta)``),
with the run's ``bias_lr`` as ``coeff``.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from parity.backends.torch_module import TorchModuleColumn
from parity.config import MoEConfig

PEERS = {"torchtitan:cpu": "torchtitan's MoE (torchtitan.models.common.moe.MoE), CPU"}

TORCHTITAN_MAPPING = {
    "router.gate.weight": "router.gate.weight",
    "routed_experts.inner_experts.w1_EFD": "experts.w1",
    "routed_experts.inner_experts.w2_EDF": "experts.w2",
    "routed_experts.inner_experts.w3_EFD": "experts.w3",
    "expert_bias_E": "expert_bias",
    "tokens_per_expert_E": "tokens_per_expert",
}
SHARED_MAPPING = {"shared_experts.w1.weight": "shared_expert.w1.weight",
                  "shared_experts.w2.weight": "shared_expert.w2.weight",
                  "shared_experts.w3.weight": "shared_expert.w3.weight"}


def torchtitan_unsupported(cfg: MoEConfig) -> str | None:
    """Why torchtitan's MoE cannot express ``cfg`` (the options named), or None."""
    bad = []
    defaults = MoEConfig()
    for field in ("router_bias", "router_input_norm", "per_expert_scale", "expert_input_norm",
                  "expert_proj_bias", "shared_expert_gate"):
        if getattr(cfg, field, False):
            bad.append(f"{field}=True")
    if cfg.score_before_experts:
        bad.append("score_before_experts=True (torchtitan scales the expert output)")
    if cfg.expert_activation != "silu":
        bad.append(f"expert_activation={cfg.expert_activation!r}")
    if cfg.route_norm and (cfg.route_norm_mode != "add" or cfg.route_norm_eps != defaults.route_norm_eps):
        bad.append("route_norm other than w / (sum + 1e-20)")
    if getattr(cfg, "route_norm_p", None) is not None:
        bad.append(f"route_norm_p={cfg.route_norm_p}")
    if cfg.num_expert_groups is not None and cfg.group_score != "top2_sum":
        bad.append(f"group_score={cfg.group_score!r} (torchtitan scores a group by its two best experts)")
    if cfg.use_expert_bias and cfg.route_order != "bias_first" and (cfg.route_scale != 1 or cfg.num_expert_groups):
        bad.append("route_order='scale_first'")
    if cfg.load_balance_loss is not None or cfg.router_z_loss_coeff > 0:
        bad.append("aux losses (torchtitan computes them outside the MoE module)")
    if getattr(cfg, "capacity_factor", None) is not None or getattr(cfg, "expert_capacity", None) is not None:
        bad.append("capacity / token dropping")
    return f"torchtitan's MoE cannot express {', '.join(bad)}" if bad else None


class TorchtitanColumn(TorchModuleColumn):
    """torchtitan's MoE as the column "torchtitan:cpu" (see the module docstring)."""

    def __init__(self, **hooks):
        super().__init__(self._factory, {**TORCHTITAN_MAPPING, **SHARED_MAPPING}, name="torchtitan:cpu",
                         capture={"router": self._router_aux, "router.gate": lambda logits: {"router_logits": logits},
                                  "routed_experts": lambda inputs, _out: {"tokens_per_expert": inputs[3]}},
                         update_bias=self._update, **hooks)
        self._base = (self.capabilities, dict(self.skip_reasons))
        self._all_params = dict(self.map.params)

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        try:
            if importlib.util.find_spec("torchtitan") is None:
                return "torchtitan is not installed (pip install torchtitan; it imports triton, even on CPU)"
            import torchtitan.models.common.moe  # noqa: F401
        except Exception as exc:
            return f"cannot import torchtitan.models.common.moe: {type(exc).__name__}: {exc}".splitlines()[0]
        return None

    def unsupported(self, cfg: MoEConfig) -> str | None:
        """Also narrows the capabilities for ``cfg``: without ``use_expert_bias`` torchtitan's router
        would still select on its bias buffer, so the bias steps are left out (a SKIP row)."""
        self.capabilities, self.skip_reasons = self._base
        if not cfg.use_expert_bias:
            self.capabilities = self.capabilities - {"bias"}
            self.skip_reasons = {**self.skip_reasons, "bias": "torchtitan's router always selects on its "
                                 "expert_bias_E buffer; the config has use_expert_bias=False"}
        return torchtitan_unsupported(cfg)

    def build(self, cfg, weights, dtype):
        # the shared-expert names exist only with shared experts
        self.map.params = {k: v for k, v in self._all_params.items()
                           if cfg.num_shared_experts or k not in SHARED_MAPPING}
        self.map.by_source = {s: t for t, p in self.map.params.items() for s in p.sources}
        if not cfg.use_expert_bias:  # the layer selects without a bias; torchtitan's buffer is there anyway
            weights = {**weights, "expert_bias": np.zeros(cfg.num_experts)}
        return super().build(cfg, weights, dtype)

    @staticmethod
    def _factory(cfg: MoEConfig):
        from torchtitan.models.common import moe as tt
        from torchtitan.models.common.feed_forward import FeedForward
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        reason = torchtitan_unsupported(cfg)
        if reason:
            raise ValueError(reason)
        d, h, e, k = cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k
        shared = None
        if cfg.num_shared_experts:
            hs = cfg.shared_dim
            shared = FeedForward.Config(w1=Linear.Config(in_features=d, out_features=hs),
                                        w2=Linear.Config(in_features=hs, out_features=d),
                                        w3=Linear.Config(in_features=d, out_features=hs))
        config = tt.MoE.Config(
            num_experts=e,
            routed_experts=tt.RoutedExperts.Config(
                inner_experts=tt.GroupedExperts.Config(dim=d, hidden_dim=h, num_experts=e),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k)),
            router=tt.TokenChoiceTopKRouter.Config(
                num_experts=e, top_k=k, score_func=cfg.score_func, route_norm=cfg.route_norm,
                route_scale=cfg.route_scale, num_expert_groups=cfg.num_expert_groups,
                num_limited_groups=cfg.num_limited_groups,
                gate=Linear.Config(in_features=d, out_features=e, bias=False)),
            # the buffer expert_bias_E exists only with a coefficient; with use_expert_bias False the
            # canonical bias is all zero, so selection is unchanged
            load_balance_coeff=1e-3, shared_experts=shared)
        return config.build()

    @staticmethod
    def _router_aux(output) -> dict:
        weights, idx, scores = output
        return {"scores": scores, "selected_experts": idx, "routing_weights": weights}

    @staticmethod
    def _update(module, lr: float) -> None:
        import torch

        counts = module.tokens_per_expert_E.float()
        delta = lr * torch.sign(counts.mean() - counts)
        module.expert_bias_E.add_(delta - delta.mean())
        module.tokens_per_expert_E.zero_()


def make_peer(name: str, **hooks):
    """The peer column ``name`` (one of ``PEERS``); ``ValueError`` for another name."""
    if name == "torchtitan:cpu":
        return TorchtitanColumn(**hooks)
    raise ValueError(f"unknown peer {name!r}; known peers: {', '.join(PEERS)}")
