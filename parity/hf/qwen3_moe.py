"""Qwen3-MoE (``model_type="qwen3_moe"``; Qwen/Qwen3-30B-A3B).

Softmax -> top-k; ``route_norm = norm_topk_prob`` (true in the released models); no shared expert.
A layer is MoE when ``layer not in mlp_only_layers and num_experts > 0 and
(layer + 1) % decoder_sparse_step == 0``.
"""

from __future__ import annotations

from parity.config import MoEConfig
from parity.hf.registry import Family, get, register


def moe_config(config, **common) -> MoEConfig:
    return MoEConfig(**common, hidden_dim=int(get(config, "moe_intermediate_size")),
                     num_experts=int(get(config, "num_experts", "num_local_experts")),
                     score_func="softmax", route_norm=bool(config.get("norm_topk_prob", False)))


def is_moe_layer(config, layer: int) -> bool:
    step = int(config.get("decoder_sparse_step") or 1)
    return (layer not in (config.get("mlp_only_layers") or [])
            and int(get(config, "num_experts", "num_local_experts")) > 0
            and (layer + 1) % step == 0)


FAMILY = register(Family(
    "qwen3_moe",
    block=("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    moe_config=moe_config,
    is_moe_layer=is_moe_layer,
))
