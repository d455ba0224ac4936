"""OLMoE (``model_type="olmoe"``; allenai/OLMoE-1B-7B-0924, arXiv:2409.02060).

Softmax -> top-k; ``route_norm = norm_topk_prob`` (false in OLMoE-1B-7B); every layer is MoE.
"""

from __future__ import annotations

from parity.config import MoEConfig
from parity.hf.registry import Family, every_layer, get, register


def moe_config(config, **common) -> MoEConfig:
    return MoEConfig(**common, hidden_dim=int(get(config, "intermediate_size")),
                     num_experts=int(get(config, "num_experts", "num_local_experts")),
                     score_func="softmax", route_norm=bool(config.get("norm_topk_prob", False)))


FAMILY = register(Family(
    "olmoe",
    block=("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
    moe_config=moe_config,
    is_moe_layer=every_layer,
))
