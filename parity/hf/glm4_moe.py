"""GLM-4.5 MoE (``model_type="glm4_moe"``; zai-org/GLM-4.5, GLM-4.5-Air; arXiv:2508.06471).

``Glm4MoeTopkRouter`` is DeepSeek-V3's router line for line (transformers 5.24): float32 logits,
sigmoid, ``e_score_correction_bias`` for selection, group score = sum of the two best biased scores,
``norm_topk_prob`` with ``+ 1e-20``, ``routed_scaling_factor``; ``Glm4MoeMoE`` adds
``n_shared_experts * moe_intermediate_size`` shared experts; the router stays float32
(``_keep_in_fp32_modules_strict``). Layers ``>= first_k_dense_replace`` are MoE. Only the config
defaults differ from DeepSeek-V3's (below).
"""

from __future__ import annotations

from parity.hf.deepseek_v3 import deepseek_v3_routing
from parity.hf.registry import Family, first_k_dense, register

# transformers 5.24 Glm4MoeConfig defaults
DEFAULTS = {"first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
            "norm_topk_prob": True, "routed_scaling_factor": 1.0}


def moe_config(config, **common):
    return deepseek_v3_routing(config, DEFAULTS, **common)


FAMILY = register(Family(
    "glm4_moe",
    block=("transformers.models.glm4_moe.modeling_glm4_moe", "Glm4MoeMoE"),
    moe_config=moe_config,
    is_moe_layer=first_k_dense(DEFAULTS["first_k_dense_replace"]),
    fp32_router=True,
))
