"""Gemma 4 (``model_type="gemma4_text"``, and the multimodal ``"gemma4"`` whose ``text_config`` is
read; google/gemma-4-26B-A4B).

transformers 5.24 has no one MoE module for Gemma 4: ``Gemma4TextDecoderLayer`` (with
``enable_moe_block``) runs a dense MLP and, beside it, a router and experts on the same residual
stream ``h`` (the decoder's hidden state after attention), and adds the two branches after their
own post-norms. The MoE layer imported here is the routed branch, from ``h`` to the experts' summed
output: ``Gemma4TextRouter`` on ``h``, ``Gemma4TextExperts`` on ``pre_feedforward_layernorm_2(h)``.
The dense MLP (``mlp``, ``pre_feedforward_layernorm``), the post-norms
(``post_feedforward_layernorm_1``, ``_2``, ``post_feedforward_layernorm``) and ``layer_scalar``
are outside the layer and not read.

- Router: ``rms_norm(h) * router.scale * hidden_size**-0.5`` (an RMSNorm without weight, epsilon
  ``rms_norm_eps``), then ``router.proj`` (D -> E); softmax in float32; top-k
  (``top_k_experts``); the k weights divided by their bare sum; times ``router.per_expert_scale``
  at the chosen experts: ``router_input_norm=True``, ``input_norm_eps=rms_norm_eps``,
  ``score_func="softmax"``, ``route_norm=True``, ``route_norm_eps=0.0``, ``per_expert_scale=True``.
- Experts: GeGLU with tanh GELU (``hidden_activation="gelu_pytorch_tanh"``):
  ``expert_activation="gelu_tanh"``; their input RMS-normalised with the weight
  ``pre_feedforward_layernorm_2.weight`` (Gemma 4's RMSNorm multiplies by the weight as is):
  ``expert_input_norm=True``; the routing weight on the expert output. No shared expert.

Tensors under ``model.layers.{L}.`` (``model.language_model.layers.{L}.`` for ``gemma4``): the fused
``experts.gate_up_proj [E, 2I, D]`` (gate rows first) and ``experts.down_proj [E, D, I]`` (the
only layout transformers 5.24 writes for Gemma 4), ``router.proj.weight [E, D]`` (read as
``router.gate.weight``), ``router.scale [D]``, ``router.per_expert_scale [E]`` and
``pre_feedforward_layernorm_2.weight [D]`` (read as ``expert_input_norm.weight``). Every layer is
MoE when ``enable_moe_block`` is true, none otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parity.config import MoEConfig
from parity.hf.registry import Family, HFImportError, get, register

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # transformers' names of the tanh-approximated GELU


def moe_config(config, **common) -> MoEConfig:
    act = config.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in GELU_TANH:
        raise HFImportError(f"{config.get('model_type')} with hidden_activation={act!r}: only the tanh GELU "
                            f"({', '.join(GELU_TANH)}) maps to expert_activation='gelu_tanh'")
    return MoEConfig(**common, hidden_dim=int(get(config, "moe_intermediate_size")),
                     num_experts=int(get(config, "num_experts")), score_func="softmax", route_norm=True,
                     route_norm_eps=0.0, router_input_norm=True, per_expert_scale=True, expert_input_norm=True,
                     input_norm_eps=float(config.get("rms_norm_eps", 1e-6)), expert_activation="gelu_tanh")


def text_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text model's keys with ``top_k_experts`` as ``num_experts_per_tok`` (``gemma4``: its
    ``text_config``; ``model_type`` stays the checkpoint's)."""
    text = config.get("text_config") if config.get("model_type") == "gemma4" else config
    if not isinstance(text, Mapping):
        raise HFImportError("config.json (model_type='gemma4') lacks its text_config")
    return dict(text, model_type=config.get("model_type"), num_experts_per_tok=text.get("top_k_experts"))


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    return bool(config.get("enable_moe_block", False))


def build_block(hf_config):
    """The ``hf`` column: transformers' ``Gemma4TextRouter``, ``pre_feedforward_layernorm_2``
    (``Gemma4RMSNorm``) and ``Gemma4TextExperts``, called as ``Gemma4TextDecoderLayer.forward`` calls
    them; ``forward(h [B, S, D]) -> [B, S, D]``."""
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, Gemma4TextExperts, Gemma4TextRouter

    config = getattr(hf_config, "text_config", None) or hf_config
    config._experts_implementation = hf_config._experts_implementation

    class Gemma4TextMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = Gemma4TextRouter(config)
            self.pre_feedforward_layernorm_2 = Gemma4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.experts = Gemma4TextExperts(config)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            flat = h.reshape(-1, h.shape[-1])
            _, top_k_weights, top_k_index = self.router(flat)
            out = self.experts(self.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
            return out.reshape(h.shape)

    return Gemma4TextMoE()


def block_state(t: Mapping[str, Any], cfg: MoEConfig) -> dict[str, Any]:
    import torch

    return {"router.proj.weight": t["router.gate.weight"], "router.scale": t["router.scale"],
            "router.per_expert_scale": t["router.per_expert_scale"],
            "pre_feedforward_layernorm_2.weight": t["expert_input_norm.weight"],
            "experts.gate_up_proj": torch.cat([t["experts.w1"], t["experts.w3"]], dim=1),
            "experts.down_proj": t["experts.w2"]}


_COMMON = dict(
    block=("transformers.models.gemma4.modeling_gemma4", "Gemma4TextDecoderLayer"),
    moe_config=moe_config,
    is_moe_layer=is_moe_layer,
    renames={"router.proj.weight": "gate.weight", "pre_feedforward_layernorm_2.weight": "expert_input_norm.weight"},
    router_name="router",
    layer_prefix=r"layers\.{layer}\.(?=router\.|experts\.|pre_feedforward_layernorm_2\.)",
    config_view=text_view,
    build_block=build_block,
    block_state=block_state,
)
FAMILY = register(Family("gemma4_text", **_COMMON))
MULTIMODAL = register(Family("gemma4", **_COMMON))
