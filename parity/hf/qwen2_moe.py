"""Qwen2-MoE (``model_type="qwen2_moe"``; Qwen/Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

``Qwen2MoeTopKRouter`` (transformers 5.24): logits in the model dtype, softmax in float32 -> top-k;
``route_norm = norm_topk_prob`` (default False); the weights cast to the model dtype. One shared
SwiGLU expert of ``shared_expert_intermediate_size`` scaled per token by
``sigmoid(shared_expert_gate(x))`` (a Linear D -> 1): ``num_shared_experts=1``,
``shared_hidden_dim=shared_expert_intermediate_size``, ``shared_expert_gate=True``; the block's
submodules are ``shared_expert`` and ``shared_expert_gate``. Layers are MoE by Qwen3-MoE's rule
(``mlp_only_layers``, ``decoder_sparse_step``).

``qwen_shared_gate_routing`` is shared with Qwen3-Next, whose MoE block is the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parity.config import MoEConfig
from parity.hf.qwen3_moe import is_moe_layer
from parity.hf.registry import Family, get, register


def qwen_shared_gate_routing(config: Mapping[str, Any], norm_topk_default: bool, **common) -> MoEConfig:
    """Qwen2-MoE's block (also Qwen3-Next's) as a ``MoEConfig``; ``norm_topk_default``: the family's
    config-class default of ``norm_topk_prob``."""
    return MoEConfig(**common, hidden_dim=int(get(config, "moe_intermediate_size")),
                     num_experts=int(get(config, "num_experts", "num_local_experts")), score_func="softmax",
                     route_norm=bool(config.get("norm_topk_prob", norm_topk_default)),
                     num_shared_experts=1,
                     shared_hidden_dim=int(get(config, "shared_expert_intermediate_size")),
                     shared_expert_gate=True)


def moe_config(config, **common) -> MoEConfig:
    return qwen_shared_gate_routing(config, False, **common)


FAMILY = register(Family(
    "qwen2_moe",
    block=("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    moe_config=moe_config,
    is_moe_layer=is_moe_layer,
    shared_prefix="shared_expert",
))
