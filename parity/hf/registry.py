"""The families ``parity.hf`` imports, one ``Family`` per ``config.json`` ``model_type``.

A family module (``parity/hf/mixtral.py``, ...) describes how transformers builds its MoE block and
calls ``register(Family(...))``; ``parity.hf`` imports every family module, so a family is one file
(plus its test). The reader, ``hf_block`` and the error messages ask the registry, never a list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from parity.config import MoEConfig


class HFImportError(ValueError):
    """A checkpoint that cannot be imported: unknown family, dense or missing layer, missing shard,
    or tensors that do not match ``config.json``."""


@dataclass(frozen=True)
class Family:
    """How one ``model_type`` maps to ``MoEConfig`` and to transformers' MoE block.

    ``moe_config(config) -> MoEConfig``: the routing and sizes of its MoE block (sizes, ``top_k`` and
    ``score_before_experts=False`` are filled in by the caller, see ``common_fields``);
    ``is_moe_layer(config, layer) -> bool``: the family's rule for which decoder layers are MoE;
    ``block``: (module, class) of transformers' MoE block (checked against transformers 5.24);
    ``shared_prefix``: the block's shared-expert submodule name (``shared_experts`` / ``shared_expert``);
    ``fp32_router``: transformers keeps ``gate.weight`` and ``gate.e_score_correction_bias`` in
    float32 in a low-precision model (``_keep_in_fp32_modules_strict``);
    ``hf_config``: (module, class) of the transformers config class that builds the block, for a
    ``model_type`` transformers does not register (``AutoConfig`` otherwise);
    ``renames``: {checkpoint tensor name relative to the MoE module: the name the reader reads}, for a
    family whose checkpoint names differ (Granite-MoE's ``input_linear.weight`` ->
    ``experts.gate_up_proj``); ``router_name``: the block's router submodule (``gate``; Granite:
    ``router``); ``experts_transposed``: the fused experts are stored ``gate_up_proj [E, D, 2H]``,
    ``down_proj [E, H, D]`` (Llama 4) rather than ``[E, 2H, D]``, ``[E, D, H]``; ``bias_key``: the
    block's name of the expert bias (``gate.e_score_correction_bias``; MiniMax-M2: on the block,
    ``e_score_correction_bias``).

    For families whose MoE tensors are not under one ``mlp``-like module (DBRX, Gemma 4):
    ``layer_prefix``: a regex (``{layer}`` is the layer index) matching the key prefix of the layer's
    MoE tensors, after any leading ``model.`` parts (default ``layers.{L}.(block_sparse_moe|mlp|feed_forward).``;
    DBRX ``blocks.{L}.ffn.``; Gemma 4 ``layers.{L}.`` followed by ``router.``, ``experts.`` or
    ``pre_feedforward_layernorm_2.``); ``config_view(config) -> dict``: a flat view of a nested
    ``config.json`` (DBRX's ``ffn_config``) with the keys the reader asks for (``hidden_size``,
    ``num_experts_per_tok``, ``num_hidden_layers``); ``build_block(hf_config) -> nn.Module``: builds
    the ``hf`` column when transformers has no one module for the MoE block (Gemma 4's router and
    experts are two submodules of its decoder layer); ``block_state(tensors, cfg) -> dict``: the
    block's state dict from the canonical tensors (torch), when its names are not the usual ones;
    ``read_extra(read, cfg) -> dict``: canonical tensors the family builds from its own ones
    (``read(name)`` reads a checkpoint tensor by its name relative to the MoE module, after
    ``renames``; JetMoE's output ``bias [D]`` as ``experts.b2``).
    """

    model_type: str
    block: tuple[str, str]
    moe_config: Callable[[Mapping[str, Any]], MoEConfig]
    is_moe_layer: Callable[[Mapping[str, Any], int], bool]
    shared_prefix: str = "shared_experts"
    fp32_router: bool = False
    hf_config: tuple[str, str] | None = None
    renames: Mapping[str, str] = field(default_factory=dict)
    router_name: str = "gate"
    experts_transposed: bool = False
    bias_key: str = "gate.e_score_correction_bias"
    layer_prefix: str = r"layers\.{layer}\.(?:block_sparse_moe|mlp|feed_forward)\."
    config_view: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    build_block: Callable[[Any], Any] | None = None
    block_state: Callable[[Mapping[str, Any], MoEConfig], dict[str, Any]] | None = None
    read_extra: Callable[[Callable[[str], Any], MoEConfig], dict[str, Any]] | None = None
    # the fused ``gate_up_proj`` interleaves gate and up (gate at even, up at odd positions of the 2H
    # axis; GPT-OSS) rather than holding the gate rows first
    gate_up_interleaved: bool = False
    # ``unpack(blocks, scales) -> float32 array``: a tensor stored as ``<name>_blocks`` + ``<name>_scales``
    # (GPT-OSS's MXFP4 experts), read as ``<name>`` in the layout transformers dequantises it to
    unpack: Callable[[Any, Any], Any] | None = None


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (in import order); a second family of the same model_type is an error."""
    if family.model_type in _FAMILIES:
        raise ValueError(f"model_type={family.model_type!r} is already registered")
    _FAMILIES[family.model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    """The registered ``model_type`` values, in registration order."""
    return tuple(_FAMILIES)


def get_family(model_type: Any, where: str = "") -> Family:
    """The family of ``model_type``; ``HFImportError`` naming the supported model types otherwise."""
    if model_type not in _FAMILIES:
        prefix = f"{where}: " if where else ""
        raise HFImportError(f"{prefix}model_type={model_type!r} is not supported; supported model types: "
                            f"{', '.join(_FAMILIES)}")
    return _FAMILIES[model_type]


def view(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` as the reader reads it: the family's ``config_view`` of it (DBRX's nested
    ``ffn_config`` flattened), or ``config`` itself (also for an unsupported ``model_type``, which the
    caller refuses)."""
    family = _FAMILIES.get(config.get("model_type"))
    return family.config_view(config) if family is not None and family.config_view is not None else config


def get(config: Mapping[str, Any], *names: str, default: Any = None, required: bool = True) -> Any:
    """The first of ``names`` set (not None) in ``config``, else ``default``; a required key absent
    with no default is an ``HFImportError`` naming it."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if required and default is None:
        raise HFImportError(f"config.json (model_type={config.get('model_type')!r}) lacks {names[0]!r}")
    return default


def every_layer(config: Mapping[str, Any], layer: int) -> bool:
    """``is_moe_layer`` of families whose every decoder layer is MoE."""
    return True


def first_k_dense(default: int) -> Callable[[Mapping[str, Any], int], bool]:
    """``is_moe_layer`` of the DeepSeek-style rule ``layer >= first_k_dense_replace`` and
    ``layer % moe_layer_freq == 0`` (DeepSeek's reference code; transformers 5 ignores
    ``moe_layer_freq``, which is 1 in every released config); ``default``: the family's
    transformers default of ``first_k_dense_replace``."""

    def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
        first = int(config.get("first_k_dense_replace", default) or 0)
        freq = int(config.get("moe_layer_freq") or 1)
        return layer >= first and layer % freq == 0

    return is_moe_layer
