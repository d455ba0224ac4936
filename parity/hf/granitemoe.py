"""Granite-MoE (``model_type="granitemoe"``; ibm-granite/granite-3.0-1b-a400m, granite-3.0-3b-a800m).

``GraniteMoeTopKRouter`` (transformers 5.24): float32 logits, top-k of the logits, then softmax over
the k chosen logits. Softmax is monotone, so this picks the experts softmax -> top-k picks, and
``exp(l_i) / sum_k exp(l_j)`` is the renormalised softmax weight exactly in real arithmetic:
``score_func="softmax"``, ``route_norm=True`` (Mixtral's mapping; the float32 rounding of the two
orders differs by a few ULP, measured in ``tests/parity/test_hf_families.py``). Every layer is MoE;
no shared expert. The checkpoint holds ``block_sparse_moe.input_linear.weight [E, 2H, D]`` (gate
rows first: transformers chunks it into gate, up), ``output_linear.weight [E, D, H]`` and
``router.layer.weight [E, D]``, read as ``experts.gate_up_proj`` / ``experts.down_proj`` /
``gate.weight`` (transformers' own renaming); the block's router is ``router``. The decoder's
``residual_multiplier`` scales the block's output outside the MoE layer.

JetMoE (``jetmoe``) routes alike; its MoE MLP is imported by ``parity.hf.jetmoe`` (its output bias
as ``experts.b2``; its mixture-of-attention is not an MoE MLP layer and is not read).
"""

from __future__ import annotations

from parity.config import MoEConfig
from parity.hf.registry import Family, every_layer, get, register


def moe_config(config, **common) -> MoEConfig:
    return MoEConfig(**common, hidden_dim=int(get(config, "intermediate_size")),
                     num_experts=int(get(config, "num_local_experts", "num_experts")),
                     score_func="softmax", route_norm=True)


FAMILY = register(Family(
    "granitemoe",
    block=("transformers.models.granitemoe.modeling_granitemoe", "GraniteMoeMoE"),
    moe_config=moe_config,
    is_moe_layer=every_layer,
    renames={"input_linear.weight": "experts.gate_up_proj", "output_linear.weight": "experts.down_proj",
             "router.layer.weight": "gate.weight", "router.weight": "gate.weight"},
    router_name="router",
))
