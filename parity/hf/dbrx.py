"""DBRX (``model_type="dbrx"``; databricks/dbrx-base, dbrx-instruct).

``DbrxFFN`` (transformers 5.24): ``router.layer`` (a Linear D -> E) gives the logits in the model
dtype; softmax over all experts *in that dtype* (``dtype=router_logits.dtype``: bfloat16 in a
bfloat16 model, where DESIGN.md computes float32); top-k; the k weights divided by their p-norm
``torch.norm(w, p=moe_normalize_expert_weights)`` with no epsilon (1.0 in the released models: the
sum), or left alone when that is None. ``score_func="softmax"``, ``route_norm`` = p is not None,
``route_norm_p=p``, ``route_norm_eps=0.0`` (DESIGN.md step 5). SwiGLU experts
(``ffn_act_fn={"name": "silu"}``), the routing weight on the expert output, every layer MoE, no
shared expert. ``moe_jitter_eps`` (multiplicative input noise) acts in training mode only; the
parity runs are eval-mode forwards, where DBRX's block is deterministic.

Sizes and routing are nested in ``config.json``'s ``ffn_config`` (``ffn_hidden_size``,
``moe_num_experts``, ``moe_top_k``); ``d_model`` and ``n_layers`` are the model's. Tensors under
``transformer.blocks.{L}.ffn.``: ``router.layer.weight [E, D]`` and the flat expert layout (the only
one transformers 5.24 reads or writes for DBRX): ``experts.mlp.w1``, ``v1``, ``w2``, each
``[E * I, D]`` (w1 = gate, v1 = up; w2 is the down projection transposed, ``x @ w2``), read as
``experts.w1``, ``experts.w3`` and ``experts.w2 = w2.view(E, I, D).transpose``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parity.config import MoEConfig
from parity.hf.registry import Family, HFImportError, every_layer, register


def config_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """DBRX's nested ``config.json`` with the keys the reader reads (transformers' ``DbrxFFNConfig``
    defaults fill what ``ffn_config`` leaves out)."""
    ffn = dict(config.get("ffn_config") or {})
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    return dict(config, hidden_size=config.get("d_model"), num_hidden_layers=config.get("n_layers"),
                num_experts_per_tok=ffn.get("moe_top_k", 1), moe_num_experts=ffn.get("moe_num_experts", 4),
                ffn_hidden_size=ffn.get("ffn_hidden_size", 3584), hidden_act=act,
                moe_normalize_expert_weights=ffn.get("moe_normalize_expert_weights", 1.0))


def moe_config(config, **common) -> MoEConfig:
    p = config["moe_normalize_expert_weights"]
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < float("inf")):
        raise HFImportError(f"dbrx with moe_normalize_expert_weights={p!r}: only None or a finite p > 0 maps to "
                            f"route_norm_p")
    return MoEConfig(**common, hidden_dim=int(config["ffn_hidden_size"]), num_experts=int(config["moe_num_experts"]),
                     score_func="softmax", route_norm=p is not None, route_norm_eps=0.0,
                     route_norm_p=None if p is None else float(p))


def block_state(t: Mapping[str, Any], cfg: MoEConfig) -> dict[str, Any]:
    """``DbrxFFN``'s state dict from the canonical tensors (torch): the flat ``[E * I, D]`` layout."""
    e, h, d = cfg.num_experts, cfg.hidden_dim, cfg.dim
    return {"router.layer.weight": t["router.gate.weight"],
            "experts.mlp.w1": t["experts.w1"].reshape(e * h, d),
            "experts.mlp.v1": t["experts.w3"].reshape(e * h, d),
            "experts.mlp.w2": t["experts.w2"].transpose(1, 2).reshape(e * h, d)}


FAMILY = register(Family(
    "dbrx",
    block=("transformers.models.dbrx.modeling_dbrx", "DbrxFFN"),
    moe_config=moe_config,
    is_moe_layer=every_layer,
    renames={"router.layer.weight": "gate.weight"},
    router_name="router",
    layer_prefix=r"blocks\.{layer}\.ffn\.",
    config_view=config_view,
    block_state=block_state,
))
