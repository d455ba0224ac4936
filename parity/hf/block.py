"""transformers' own MoE block of a checkpoint's layer, loaded with its weights (the ``hf`` column).

Needs the ``hf`` extra (torch + transformers >= 5); imported lazily.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from parity.hf.reader import SHARED_TO_CANONICAL, _check_layer, load_hf_config, read_hf_layer
from parity.hf.registry import HFImportError, get_family


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in table:
        raise HFImportError(f"dtype={dtype!r} is not one of {sorted(table)}")
    return table[name]


def hf_block(path: str | os.PathLike, layer: int, dtype: Any = "float32"):
    """transformers' MoE block of layer ``layer`` (the family's ``Family.block``: ``MixtralSparseMoeBlock``,
    ``Qwen3MoeSparseMoeBlock``, ``DeepseekV3MoE``, ...) with its weights loaded.

    Built from the checkpoint's config with ``config._experts_implementation = "eager"`` (transformers 5
    picks the experts' kernel at call time; ``from_pretrained`` defaults to "grouped_mm"); weights come
    from ``read_hf_layer`` (a standalone block starts uninitialised) and are loaded strictly, then the
    module is cast to ``dtype`` ("float32", "float64", "bfloat16", "float16"), keeping the router
    weight and ``e_score_correction_bias`` in float32 where transformers does
    (``Family.fp32_router``: ``_keep_in_fp32_modules_strict`` of DeepSeek-V3, GLM-4.5 MoE, dots1). Returned in eval mode (Mixtral's router jitter is training only).

    Needs the ``hf`` extra (transformers >= 5); raises ``ImportError`` without it, ``HFImportError``
    for a bad checkpoint.
    """
    import importlib

    import torch
    from transformers import AutoConfig

    config = load_hf_config(path)
    _check_layer(config, layer, path)
    cfg, weights = read_hf_layer(path, layer)
    family = get_family(config["model_type"])
    if family.hf_config is None:
        hf_config = AutoConfig.from_pretrained(os.fspath(path), local_files_only=True)
    else:  # a model_type transformers does not register (Kimi K2): its architecture's config class
        cfg_module, cfg_class = family.hf_config
        fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")}
        hf_config = getattr(importlib.import_module(cfg_module), cfg_class)(**fields)
    hf_config._experts_implementation = "eager"
    if family.build_block is not None:  # Gemma 4: transformers' router and experts, composed as its decoder layer does
        block = family.build_block(hf_config)
    else:
        module_name, class_name = family.block
        block = getattr(importlib.import_module(module_name), class_name)(hf_config)

    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    gate_up, down = torch.cat([t["experts.w1"], t["experts.w3"]], dim=1), t["experts.w2"]
    if family.experts_transposed:  # Llama 4 stores gate_up_proj [E, D, 2H], down_proj [E, H, D]
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    state = {
        f"{family.router_name}.weight": t["router.gate.weight"],
        "experts.gate_up_proj": gate_up,
        "experts.down_proj": down,
    }
    if family.block_state is not None:  # DBRX, Gemma 4: the block's own names and layouts
        state = family.block_state(t, cfg)
    if cfg.use_expert_bias:
        state[family.bias_key] = t["expert_bias"].reshape(block.state_dict()[family.bias_key].shape)  # Ernie: [1, E]
    if cfg.num_shared_experts:
        for proj, canon in SHARED_TO_CANONICAL.items():
            state[f"{family.shared_prefix}.{proj}.weight"] = t[f"shared_expert.{canon}.weight"]
    if cfg.shared_expert_gate:
        state["shared_expert_gate.weight"] = t["shared_expert_gate.weight"]
    block.load_state_dict(state, strict=True)
    torch_dtype = _torch_dtype(dtype)
    for name, child in block.named_children():
        # the router weight and bias stay float32 where transformers keeps them (_keep_in_fp32_modules_strict)
        if not (family.fp32_router and name == family.router_name):
            child.to(torch_dtype)
    with torch.no_grad():  # parameters of the block itself (JetMoE's output bias), as from_pretrained casts them
        for param in block.parameters(recurse=False):
            param.data = param.data.to(torch_dtype)
    block.eval()
    block.requires_grad_(False)
    return block


def hf_forward(block, x: np.ndarray) -> np.ndarray:
    """Run a block from ``hf_block`` on ``x [B, S, D]``; returns ``[B, S, D]`` NumPy.

    ``x`` is cast to the dtype of the block's expert weights; the output is returned in that dtype
    (bfloat16 is returned as float32, which holds it exactly). Blocks that return a
    ``(hidden, router_logits)`` tuple and blocks that return ``[B*S, D]`` (Llama 4) are handled. Raises ``ValueError`` for a wrong shape.
    """
    import torch

    experts = getattr(block, "experts", None)
    if experts is None:  # JetMoE's block holds its expert weights itself
        dtype, dim = block.output_linear.weight.dtype, block.input_size
    else:
        dtype = next(experts.parameters()).dtype
        dim = (getattr(experts, "hidden_size", None) or getattr(experts, "hidden_dim", None)
               or experts.down_proj.shape[1])
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"x has shape {x.shape}; expected [batch, seq_len, dim={dim}]")
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    with torch.no_grad():
        out = block(xt)
    if isinstance(out, tuple):
        out = out[0]
    if out.dtype in (torch.bfloat16,):
        out = out.float()
    return out.reshape(x.shape).numpy()
