"""Kimi K2 (``model_type="kimi_k2"``; moonshotai/Kimi-K2-Instruct, Kimi-K2-Base).

Its checkpoints ship their own modeling code (``trust_remote_code``) under ``model_type="kimi_k2"``,
which transformers 5.24 does not register; the architecture is DeepSeek-V3's (transformers'
``KimiK25Config`` rewrites a ``kimi_k2`` text config to ``deepseek_v3``), so this family reads it
with DeepSeek-V3's rules and runs ``DeepseekV3MoE`` as the ``hf`` column, its config built by
``DeepseekV3Config`` from ``config.json`` (``Family.hf_config``). A checkpoint whose ``config.json``
says ``deepseek_v3`` is read by ``parity.hf.deepseek_v3`` alike.
"""

from __future__ import annotations

from parity.hf.deepseek_v3 import DEFAULTS, deepseek_v3_routing
from parity.hf.registry import Family, first_k_dense, register


def moe_config(config, **common):
    return deepseek_v3_routing(config, DEFAULTS, **common)


FAMILY = register(Family(
    "kimi_k2",
    block=("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
    moe_config=moe_config,
    is_moe_layer=first_k_dense(DEFAULTS["first_k_dense_replace"]),
    fp32_router=True,
    hf_config=("transformers.models.deepseek_v3.configuration_deepseek_v3", "DeepseekV3Config"),
))
