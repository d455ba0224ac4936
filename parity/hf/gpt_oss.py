"""GPT-OSS (``model_type="gpt_oss"``; openai/gpt-oss-20b, gpt-oss-120b), its MoE MLP (``GptOssMLP``).

What transformers 5.24 does (``modeling_gpt_oss.py``) and the ``MoEConfig`` that reproduces it:

- ``GptOssTopKRouter``: ``logits = F.linear(x, weight, bias)`` in the model dtype, top-k of the
  logits, softmax over the k chosen (in the logits' dtype). Softmax is monotone and the renormalised
  softmax of the k chosen equals the softmax of their logits in real arithmetic, so this is
  ``score_func="softmax"``, ``route_norm=True`` (Granite-MoE's mapping; equal up to a few float32 ULP,
  measured in ``tests/parity/test_hf_gpt_oss.py``) with ``router_bias=True`` (``router.bias`` ->
  canonical ``router.gate.bias``). DESIGN.md computes the logits in float32 (bias included); a
  bfloat16 transformers model computes them, and the softmax, in bfloat16.
- ``GptOssExperts``: ``gate_up = x @ gate_up_proj[e] + gate_up_proj_bias[e]`` with ``gate_up_proj
  [E, D, 2I]`` (transposed, ``x @ w``) whose last axis interleaves gate (even) and up (odd), then
  ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``, ``(up + 1) * gate * sigmoid(gate *
  alpha)``, then ``@ down_proj[e] [I, D] + down_proj_bias[e]``: ``expert_activation="clamped_swiglu"``
  (``swiglu_alpha``, ``swiglu_limit`` from config.json, 1.702 and 7.0 in the released models),
  ``expert_proj_bias=True`` (``experts.b1``/``b3`` = the even/odd halves of ``gate_up_proj_bias``,
  ``experts.b2`` = ``down_proj_bias``). Every layer is MoE; no shared expert; the routing weight
  multiplies the expert output; transformers sums the k slots in the model dtype (``index_add_``),
  DESIGN.md in float32.

Both layouts transformers reads: the unquantised one (``save_pretrained`` of a transformers model,
bf16/float32) and the released hub checkpoints' MXFP4 experts (``quantization_config.quant_method
"mxfp4"``: ``experts.gate_up_proj_blocks [E, 2I, D/32, 16]`` uint8 + ``_scales [E, 2I, D/32]``, and
``down_proj_blocks`` / ``_scales`` likewise), dequantised exactly to float32 (``unpack_mxfp4``, the
values of transformers' ``convert_moe_packed_tensors``), then read as the unquantised layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from parity.config import MoEConfig
from parity.hf.registry import Family, HFImportError, every_layer, get, register

_MXFP4_SUFFIXES = ("_blocks", "_scales")


def moe_config(config, **common) -> MoEConfig:
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise HFImportError(f"gpt_oss with quantization_config.quant_method={quant!r}: only unquantised and MXFP4 "
                            f"experts are read")
    return MoEConfig(**common, hidden_dim=int(get(config, "intermediate_size")),
                     num_experts=int(get(config, "num_local_experts", "num_experts")),
                     score_func="softmax", route_norm=True, router_bias=True, expert_proj_bias=True,
                     expert_activation="clamped_swiglu",
                     swiglu_alpha=float(get(config, "swiglu_alpha", default=1.702)),
                     swiglu_limit=float(get(config, "swiglu_limit", default=7.0)))


# the 16 values of an FP4 (e2m1) code, OCP Microscaling Formats (MX) v1.0 spec, table "FP4 E2M1"
FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=np.float32)


def unpack_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 (OCP MX v1.0: blocks of 32 FP4 values sharing one E8M0 scale) -> float32, exactly.

    blocks ``[E, R, G, 16]`` uint8 (two codes a byte, the low nibble first), scales ``[E, R, G]`` uint8
    (the exponent + 127) -> ``[E, G * 32, R]``: each row of ``R`` values dequantised and transposed, the
    layout transformers' ``convert_moe_packed_tensors`` gives (``gate_up_proj [E, D, 2I]``,
    ``down_proj [E, I, D]``). Raises ``HFImportError`` for shapes that do not pair up.
    """
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.ndim != 4 or blocks.shape[:-1] != scales.shape:
        raise HFImportError(f"gpt_oss: MXFP4 blocks {list(blocks.shape)} ({blocks.dtype}) and scales "
                            f"{list(scales.shape)} ({scales.dtype}) do not pair up (expected uint8 [E, R, G, 16] "
                            f"and [E, R, G])")
    values = np.empty((*blocks.shape[:-1], 2 * blocks.shape[-1]), np.float32)
    values[..., 0::2] = FP4_E2M1[blocks & 0x0F]
    values[..., 1::2] = FP4_E2M1[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)  # exact: a power of two
    e, r = blocks.shape[:2]
    return np.ascontiguousarray(values.reshape(e, r, -1).transpose(0, 2, 1))


def read_extra(read: Callable[[str], np.ndarray], cfg: MoEConfig) -> dict[str, np.ndarray]:
    """``router.gate.bias [E]`` and the expert biases ``experts.b1``/``b3`` ``[E, I]`` (the even / odd
    halves of ``gate_up_proj_bias [E, 2I]``) and ``experts.b2 [E, D]`` (``down_proj_bias``)."""
    e, h, d = cfg.num_experts, cfg.hidden_dim, cfg.dim
    out = {}
    for name, shape in (("gate.bias", (e,)), ("experts.gate_up_proj_bias", (e, 2 * h)),
                        ("experts.down_proj_bias", (e, d))):
        arr = read(name)
        if arr.shape != shape:
            raise HFImportError(f"gpt_oss: {name} has shape {list(arr.shape)}, config.json implies {list(shape)}")
        out[name] = arr
    gate_up = out["experts.gate_up_proj_bias"]
    return {"router.gate.bias": np.ascontiguousarray(out["gate.bias"], dtype=np.float32),
            "experts.b1": np.ascontiguousarray(gate_up[:, 0::2], dtype=np.float32),
            "experts.b3": np.ascontiguousarray(gate_up[:, 1::2], dtype=np.float32),
            "experts.b2": np.ascontiguousarray(out["experts.down_proj_bias"], dtype=np.float32)}


def _interleave(gate, up, dim: int):
    """gate and up, H long on axis ``dim`` -> 2H with gate at even, up at odd positions (torch)."""
    import torch

    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def block_state(t: Mapping[str, Any], cfg: MoEConfig) -> dict[str, Any]:
    """``GptOssMLP``'s state dict from the canonical tensors (torch): ``gate_up_proj [E, D, 2I]``
    interleaved and transposed, ``down_proj [E, I, D]``, the biases interleaved likewise."""
    return {"router.weight": t["router.gate.weight"], "router.bias": t["router.gate.bias"],
            "experts.gate_up_proj": _interleave(t["experts.w1"], t["experts.w3"], 1).transpose(1, 2).contiguous(),
            "experts.gate_up_proj_bias": _interleave(t["experts.b1"], t["experts.b3"], 1).contiguous(),
            "experts.down_proj": t["experts.w2"].transpose(1, 2).contiguous(),
            "experts.down_proj_bias": t["experts.b2"]}


FAMILY = register(Family(
    "gpt_oss",
    block=("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssMLP"),
    moe_config=moe_config,
    is_moe_layer=every_layer,
    renames={"router.weight": "gate.weight", "router.bias": "gate.bias"},
    router_name="router",
    experts_transposed=True,
    gate_up_interleaved=True,
    block_state=block_state,
    read_extra=read_extra,
    unpack=unpack_mxfp4,
))
