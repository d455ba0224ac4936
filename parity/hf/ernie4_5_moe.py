"""Ernie 4.5 MoE (``model_type="ernie4_5_moe"``; baidu/ERNIE-4.5-21B-A3B-PT, ERNIE-4.5-300B-A47B-PT).

``Ernie4_5_MoeTopKRouter`` (transformers 5.24): float32 logits and softmax; top-k of ``softmax +
e_score_correction_bias`` (the bias steers selection only); the unbiased softmax scores at the
chosen experts divided by ``clamp(sum, min=moe_norm_min)`` (default 1e-12), never scaled:
``score_func="softmax"``, ``use_expert_bias=True``, ``route_norm=True``, ``route_norm_mode="clamp"``,
``route_norm_eps=moe_norm_min`` (DESIGN.md step 5). ``moe_num_shared_experts`` shared experts as one
SwiGLU of ``moe_intermediate_size * moe_num_shared_experts``. ``gate.weight`` and the bias are kept
in float32 (``_keep_in_fp32_modules_strict``). The bias is saved as ``mlp.moe_statics.e_score_correction_bias [1, E]``
(transformers' module: ``gate.moe_statics.``), read as ``expert_bias [E]``. MoE layers: ``(layer + 1) % moe_layer_interval == 0`` and
``moe_layer_start_index <= layer <= moe_layer_end_index`` (-1: the last layer). ``use_bias=True``
(biased expert projections) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parity.config import MoEConfig
from parity.hf.registry import Family, HFImportError, get, register


def moe_config(config, **common) -> MoEConfig:
    if config.get("use_bias"):
        raise HFImportError("ernie4_5_moe with use_bias=True: biased expert projections are not an MoEConfig option")
    hidden = int(get(config, "moe_intermediate_size"))
    n_shared = int(config.get("moe_num_shared_experts", 2) or 0)
    return MoEConfig(**common, hidden_dim=hidden, num_experts=int(get(config, "moe_num_experts", "num_experts")),
                     score_func="softmax", use_expert_bias=True, route_norm=True, route_norm_mode="clamp",
                     route_norm_eps=float(config.get("moe_norm_min", 1e-12)),
                     num_shared_experts=n_shared, shared_hidden_dim=n_shared * hidden if n_shared else None)


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    interval = int(config.get("moe_layer_interval", 1) or 1)
    start = int(config.get("moe_layer_start_index", 1))
    end = int(config.get("moe_layer_end_index", -1))
    if end == -1:
        end = int(get(config, "num_hidden_layers")) - 1
    return (layer + 1) % interval == 0 and start <= layer <= end


FAMILY = register(Family(
    "ernie4_5_moe",
    block=("transformers.models.ernie4_5_moe.modeling_ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock"),
    moe_config=moe_config,
    is_moe_layer=is_moe_layer,
    fp32_router=True,
    renames={"moe_statics.e_score_correction_bias": "gate.e_score_correction_bias",  # as saved (hub)
             "gate.moe_statics.e_score_correction_bias": "gate.e_score_correction_bias"},  # transformers' module
    bias_key="gate.moe_statics.e_score_correction_bias",
))
