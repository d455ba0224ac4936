"""DeepSeek-V3 (``model_type="deepseek_v3"``; arXiv:2412.19437 sec. 2.1), also Kimi K2.

Sigmoid scores; selection on scores + ``e_score_correction_bias`` (``use_expert_bias=True``);
``n_group`` / ``topk_group`` -> ``num_expert_groups`` / ``num_limited_groups`` with
``group_score="top2_sum"`` (``n_group=1`` is no grouping); ``route_norm = norm_topk_prob``;
``route_scale = routed_scaling_factor``; ``n_shared_experts`` shared experts fused into one SwiGLU
of ``n_shared_experts * moe_intermediate_size``. Layers ``>= first_k_dense_replace`` are MoE.

Kimi K2 (moonshotai/Kimi-K2-Instruct) declares ``model_type="deepseek_v3"`` (the DeepSeek-V3
architecture with 384 experts, ``n_group=1``, ``routed_scaling_factor=2.827``) and is read here;
transformers 5.24 has no ``kimi_k2`` model type (its ``kimi_k25`` multimodal config rewrites a
``kimi_k2`` text config to ``deepseek_v3``).

``deepseek_v3_routing`` is shared by the families that reuse this router under their own model type
(GLM-4.5 MoE, dots1), each with its own transformers defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parity.config import MoEConfig
from parity.hf.registry import Family, HFImportError, first_k_dense, get, register

# transformers 5 DeepseekV3Config defaults, used when config.json omits a key (as transformers does)
DEFAULTS = {"first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "n_shared_experts": 1,
            "norm_topk_prob": True, "routed_scaling_factor": 2.5}


def deepseek_v3_routing(config: Mapping[str, Any], defaults: Mapping[str, Any], **common) -> MoEConfig:
    """DeepSeek-V3's noaux_tc router (``DeepseekV3TopkRouter`` and its copies) as a ``MoEConfig``;
    ``defaults``: the family's config-class defaults for the keys ``config.json`` may omit."""
    scoring = config.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise HFImportError(f"{config.get('model_type')} with scoring_func={scoring!r}: only 'sigmoid' is supported")
    hidden = int(get(config, "moe_intermediate_size"))
    n_group = config.get("n_group", defaults["n_group"])
    groups: dict[str, Any] = {}
    if n_group is not None and int(n_group) > 1:
        groups = dict(num_expert_groups=int(n_group),
                      num_limited_groups=int(config.get("topk_group", defaults["topk_group"])),
                      group_score="top2_sum")
    n_shared = int(config.get("n_shared_experts", defaults["n_shared_experts"]) or 0)
    return MoEConfig(**common, hidden_dim=hidden,
                     num_experts=int(get(config, "n_routed_experts", "num_local_experts")),
                     score_func="sigmoid", use_expert_bias=True,
                     route_norm=bool(config.get("norm_topk_prob", defaults["norm_topk_prob"])),
                     route_scale=float(config.get("routed_scaling_factor", defaults["routed_scaling_factor"])),
                     num_shared_experts=n_shared,
                     shared_hidden_dim=n_shared * hidden if n_shared else None,
                     **groups)


def moe_config(config, **common) -> MoEConfig:
    return deepseek_v3_routing(config, DEFAULTS, **common)


FAMILY = register(Family(
    "deepseek_v3",
    block=("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
    moe_config=moe_config,
    is_moe_layer=first_k_dense(DEFAULTS["first_k_dense_replace"]),
    fp32_router=True,
))
