"""Llama 4 text (``model_type="llama4_text"``; meta-llama/Llama-4-Scout-17B-16E, Maverick-17B-128E).

``Llama4Router`` (transformers 5.24): logits in the model dtype, top-k of the logits, sigmoid (in
float32) of the k chosen, no renormalisation; ``Llama4TextMoe`` multiplies each expert's *input* by
its score (``score_before_experts=True``) and adds one ungated SwiGLU shared expert of
``intermediate_size``. Sigmoid is monotone, so top-k of the logits picks the experts top-k of the
sigmoid scores picks, and the weights are the same ``sigmoid(logit)`` element by element:
``score_func="sigmoid"``, ``route_norm=False``, ``top_k=num_experts_per_tok`` (1 in the released
models), ``num_shared_experts=1``, ``shared_hidden_dim=intermediate_size`` (bit-equal weights in
float32, tested in ``tests/parity/test_hf_families.py``). The block runs every expert on every token
(unchosen ones on a zero input, which a SwiGLU expert maps to 0).

Tensors under ``feed_forward``: ``router.weight [E, D]``, fused experts stored transposed
(``experts.gate_up_proj [E, D, 2I]``, gate columns first; ``experts.down_proj [E, I, D]``), and
``shared_expert.gate_proj|up_proj|down_proj``. MoE layers: ``moe_layers`` when set, else every
``interleave_moe_layer_step``-th layer (``step - 1, 2 * step - 1, ...``); dense layers use
``intermediate_size_mlp``. The vision tower of the multimodal ``llama4`` model is not read: import its
text config (``model_type="llama4_text"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parity.config import MoEConfig
from parity.hf.registry import Family, get, register


def moe_config(config, **common) -> MoEConfig:
    hidden = int(get(config, "intermediate_size"))
    return MoEConfig(**dict(common, score_before_experts=True), hidden_dim=hidden,
                     num_experts=int(get(config, "num_local_experts")), score_func="sigmoid", route_norm=False,
                     num_shared_experts=1, shared_hidden_dim=hidden)


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    moe_layers = config.get("moe_layers")
    if moe_layers is None:
        step = int(config.get("interleave_moe_layer_step") or 1)
        moe_layers = range(step - 1, int(get(config, "num_hidden_layers")), step)
    return layer in moe_layers


FAMILY = register(Family(
    "llama4_text",
    block=("transformers.models.llama4.modeling_llama4", "Llama4TextMoe"),
    moe_config=moe_config,
    is_moe_layer=is_moe_layer,
    shared_prefix="shared_expert",
    renames={"router.weight": "gate.weight"},
    router_name="router",
    experts_transposed=True,
))
