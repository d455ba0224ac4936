"""JetMoE (``model_type="jetmoe"``; jetmoe/jetmoe-8b), its MoE MLP (``JetMoeMoE``) only.

``JetMoeTopKGating`` (transformers 5.24): float32 logits, top-k of the logits, softmax over the k
chosen (cast to the model dtype): Granite-MoE's router, so ``score_func="softmax"``,
``route_norm=True`` (equal up to a few float32 ULP, ``parity.hf.granitemoe``). SwiGLU experts
(``activation_function="silu"``) stored as ``mlp.input_linear.weight [E, 2I, D]`` (gate rows first)
and ``mlp.output_linear.weight [E, D, I]``; router ``mlp.router.layer.weight [E, D]``; every layer
MoE; the routing weight on the expert output.

``JetMoeMoE`` adds one output bias ``mlp.bias [D]`` to every token after the combine. ``MoEConfig``
has no layer output bias; it maps onto ``expert_proj_bias`` with ``experts.b2[e] = bias`` for every
expert and ``experts.b1 = experts.b3 = 0``: the combine then adds ``(sum_j w_j) * bias``, and the k
softmax weights sum to 1 in exact arithmetic, so the layer equals JetMoE's up to the rounding of
that sum (a few float32 ULP of ``bias``; measured in ``tests/parity/test_hf_router_families.py``).
The biases' gradients differ in form: JetMoE's one ``bias`` gets the sum of the ``E`` rows of
``experts.b2``'s gradient.

JetMoE's attention is also a mixture of experts (``JetMoeMoA``: per-expert query and output
projections under ``self_attention.experts``); it is attention, not an MoE MLP layer, and is not read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from parity.config import MoEConfig
from parity.hf.registry import Family, HFImportError, every_layer, get, register


def moe_config(config, **common) -> MoEConfig:
    act = config.get("activation_function", "silu")
    if act != "silu":
        raise HFImportError(f"jetmoe with activation_function={act!r}: only SwiGLU experts ('silu') are supported")
    return MoEConfig(**common, hidden_dim=int(get(config, "intermediate_size")),
                     num_experts=int(get(config, "num_local_experts")), score_func="softmax", route_norm=True,
                     expert_proj_bias=True)


def read_extra(read: Callable[[str], np.ndarray], cfg: MoEConfig) -> dict[str, np.ndarray]:
    """``experts.b1``, ``b3`` zeros ``[E, I]`` and ``experts.b2`` = the output bias for every expert ``[E, D]``."""
    bias = read("bias")
    if bias.shape != (cfg.dim,):
        raise HFImportError(f"jetmoe: mlp.bias has shape {list(bias.shape)}, expected [{cfg.dim}]")
    e, h = cfg.num_experts, cfg.hidden_dim
    return {"experts.b1": np.zeros((e, h), np.float32), "experts.b3": np.zeros((e, h), np.float32),
            "experts.b2": np.ascontiguousarray(np.broadcast_to(bias, (e, cfg.dim)), dtype=np.float32)}


def block_state(t: Mapping[str, Any], cfg: MoEConfig) -> dict[str, Any]:
    """``JetMoeMoE``'s state dict from the canonical tensors (torch); ``bias`` is row 0 of ``experts.b2``
    (the import writes the same bias in every row)."""
    import torch

    return {"router.layer.weight": t["router.gate.weight"],
            "input_linear.weight": torch.cat([t["experts.w1"], t["experts.w3"]], dim=1),
            "output_linear.weight": t["experts.w2"], "bias": t["experts.b2"][0]}


FAMILY = register(Family(
    "jetmoe",
    block=("transformers.models.jetmoe.modeling_jetmoe", "JetMoeMoE"),
    moe_config=moe_config,
    is_moe_layer=every_layer,
    renames={"input_linear.weight": "experts.gate_up_proj", "output_linear.weight": "experts.down_proj",
             "router.layer.weight": "gate.weight"},
    router_name="router",
    block_state=block_state,
    read_extra=read_extra,
))
