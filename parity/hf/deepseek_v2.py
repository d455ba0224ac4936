"""DeepSeek-V2 / V2-Lite (``model_type="deepseek_v2"``; arXiv:2405.04434 sec. 2.2).

``DeepseekV2TopkRouter`` (transformers 5.24): float32 logits, softmax over all experts;
``topk_method="greedy"`` (V2-Lite): top-k of the scores; ``"group_limited_greedy"`` (V2): group score
= max of the scores in the group (``group_score="max"``), the ``topk_group`` best of ``n_group``
groups kept, the other experts' scores filled with 0, top-k of that. The top-k weights are never
renormalised (transformers ignores ``norm_topk_prob``; ``route_norm=False``) and are multiplied by
``routed_scaling_factor`` (``route_scale``); ``n_shared_experts * moe_intermediate_size`` shared
experts; ``gate.weight`` kept in float32 (``_keep_in_fp32_modules_strict``). Layers
``>= first_k_dense_replace`` are MoE.

Filling the dropped groups with 0 where DESIGN.md step 3 uses -inf selects the same experts with the
same weights, so no option is needed: softmax scores are > 0 and the kept groups hold at least
``top_k`` experts (``MoEConfig`` checks ``top_k <= num_limited_groups * experts per group``), so a
filled 0 can only tie with a kept score that underflowed to exactly 0 in float32, and then both
choices carry weight 0 (README, "Where transformers and DESIGN.md differ").
"""

from __future__ import annotations

from typing import Any

from parity.config import MoEConfig
from parity.hf.registry import Family, HFImportError, first_k_dense, get, register

TOPK_METHODS = ("greedy", "group_limited_greedy")


def moe_config(config, **common) -> MoEConfig:
    method = config.get("topk_method") or "greedy"
    if method not in TOPK_METHODS:
        raise HFImportError(f"deepseek_v2 with topk_method={method!r}: transformers' DeepseekV2TopkRouter "
                            f"implements only {TOPK_METHODS}")
    hidden = int(get(config, "moe_intermediate_size"))
    groups: dict[str, Any] = {}
    if method == "group_limited_greedy":
        groups = dict(num_expert_groups=int(get(config, "n_group")), num_limited_groups=int(get(config, "topk_group")),
                      group_score="max")
    n_shared = int(config.get("n_shared_experts", 2) or 0)
    return MoEConfig(**common, hidden_dim=hidden, num_experts=int(get(config, "n_routed_experts", "num_experts")),
                     score_func="softmax", route_norm=False,
                     route_scale=float(config.get("routed_scaling_factor", 1.0)),
                     num_shared_experts=n_shared, shared_hidden_dim=n_shared * hidden if n_shared else None,
                     **groups)


FAMILY = register(Family(
    "deepseek_v2",
    block=("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2Moe"),
    moe_config=moe_config,
    is_moe_layer=first_k_dense(0),
    fp32_router=True,
))
