"""dots.llm1 (``model_type="dots1"``; rednote-hilab/dots.llm1.base, arXiv:2506.05767).

``Dots1TopkRouter`` / ``Dots1MoE`` are DeepSeek-V3's router and block line for line (transformers
5.24; see ``parity.hf.glm4_moe``), the router kept in float32. Only the config defaults differ:
``first_k_dense_replace=0``, ``norm_topk_prob=False``, ``n_shared_experts=None`` (transformers then
cannot build the block; read here as no shared expert).
"""

from __future__ import annotations

from parity.hf.deepseek_v3 import deepseek_v3_routing
from parity.hf.registry import Family, first_k_dense, register

# transformers 5.24 Dots1Config defaults
DEFAULTS = {"first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "n_shared_experts": None,
            "norm_topk_prob": False, "routed_scaling_factor": 1.0}


def moe_config(config, **common):
    return deepseek_v3_routing(config, DEFAULTS, **common)


FAMILY = register(Family(
    "dots1",
    block=("transformers.models.dots1.modeling_dots1", "Dots1MoE"),
    moe_config=moe_config,
    is_moe_layer=first_k_dense(DEFAULTS["first_k_dense_replace"]),
    fp32_router=True,
))
