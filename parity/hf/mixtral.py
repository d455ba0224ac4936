"""Mixtral (``model_type="mixtral"``; Jiang et al. 2024, arXiv:2401.04088).

Softmax over all experts -> top-k -> renormalise (always: ``route_norm=True``), which equals the
paper's softmax over the top-k logits; every layer is MoE; tensors under ``block_sparse_moe``
(per-expert ``experts.{e}.w1|w2|w3``).
"""

from __future__ import annotations

from parity.config import MoEConfig
from parity.hf.registry import Family, every_layer, get, register


def moe_config(config, **common) -> MoEConfig:
    return MoEConfig(**common, hidden_dim=int(get(config, "intermediate_size")),
                     num_experts=int(get(config, "num_local_experts", "num_experts")),
                     score_func="softmax", route_norm=True)


FAMILY = register(Family(
    "mixtral",
    block=("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    moe_config=moe_config,
    is_moe_layer=every_layer,
))
