"""Qwen3-Next (``model_type="qwen3_next"``; Qwen/Qwen3-Next-80B-A3B).

Its MoE block (``Qwen3NextSparseMoeBlock``, transformers 5.24) is Qwen2-MoE's line for line
(``parity.hf.qwen2_moe``): softmax -> top-k, ``route_norm = norm_topk_prob`` (default True here), a
shared expert scaled by ``sigmoid(shared_expert_gate(x))``. The linear-attention layers around it
are outside the MoE layer.
"""

from __future__ import annotations

from parity.hf.qwen2_moe import qwen_shared_gate_routing
from parity.hf.qwen3_moe import is_moe_layer
from parity.hf.registry import Family, register


def moe_config(config, **common):
    return qwen_shared_gate_routing(config, True, **common)


FAMILY = register(Family(
    "qwen3_next",
    block=("transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextSparseMoeBlock"),
    moe_config=moe_config,
    is_moe_layer=is_moe_layer,
    shared_prefix="shared_expert",
))
