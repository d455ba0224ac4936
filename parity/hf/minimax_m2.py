"""MiniMax-M2 (``model_type="minimax_m2"``; MiniMaxAI/MiniMax-M2).

``MiniMaxM2TopKRouter`` (transformers 5.24): logits in the model dtype, sigmoid in float32, top-k of
``sigmoid + e_score_correction_bias`` (no groups, ``sorted=False``), weights the unbiased sigmoid
scores at the chosen experts divided by their bare sum (no epsilon), never scaled:
``score_func="sigmoid"``, ``use_expert_bias=True``, ``route_norm=True``, ``route_norm_eps=0.0``
(DESIGN.md step 5; the default ``1e-20`` differs from the bare sum when the k chosen scores sum
below ~1e-13), ``route_scale=1.0``. Every layer is MoE, no shared expert. The bias is a buffer of the
block (``mlp.e_score_correction_bias``), not of its ``gate``; it is not kept in float32 in a bf16
model (no ``_keep_in_fp32_modules``), nor is the router weight.
"""

from __future__ import annotations

from parity.config import MoEConfig
from parity.hf.registry import Family, every_layer, get, register


def moe_config(config, **common) -> MoEConfig:
    return MoEConfig(**common, hidden_dim=int(get(config, "intermediate_size")),
                     num_experts=int(get(config, "num_local_experts")), score_func="sigmoid",
                     use_expert_bias=True, route_norm=True, route_norm_eps=0.0)


FAMILY = register(Family(
    "minimax_m2",
    block=("transformers.models.minimax_m2.modeling_minimax_m2", "MiniMaxM2SparseMoeBlock"),
    moe_config=moe_config,
    is_moe_layer=every_layer,
    bias_key="e_score_correction_bias",
))
