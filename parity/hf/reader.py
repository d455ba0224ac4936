"""One MoE layer of a Hugging Face checkpoint -> canonical weights + ``MoEConfig``; the canonical file.

See ``parity.hf`` for the layouts read and the README section "Hugging Face checkpoints" for the
semantic differences between transformers and DESIGN.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity.config import MoEConfig
from parity.hf.checkpoint import Checkpoint, dequantize
from parity.hf.registry import HFImportError, get, get_family, view

# per-expert projection names -> canonical expert weight (w1 = gate, w3 = up, w2 = down)
_PROJ_TO_CANONICAL = {"w1": "w1", "w2": "w2", "w3": "w3",
                      "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
SHARED_TO_CANONICAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


# ----------------------------------------------------------------------------------------------
# config.json -> MoEConfig


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of checkpoint directory ``path``. Raises ``HFImportError``."""
    path = Path(path)
    if not path.is_dir():
        raise HFImportError(f"Hugging Face checkpoint {str(path)!r} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFImportError(f"{str(path)!r} has no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise HFImportError(f"cannot parse {str(cfg_file)!r}: {exc}") from exc
    get_family(config.get("model_type"), where=repr(str(cfg_file)))
    return config


def num_hidden_layers(config: Mapping[str, Any]) -> int:
    return int(get(view(config), "num_hidden_layers"))


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    """Whether decoder layer ``layer`` holds an MoE block, by the rule of the family's modeling code
    (each family module's ``is_moe_layer``; e.g. DeepSeek-V3: ``layer >= first_k_dense_replace``).
    Raises ``HFImportError`` for an unsupported ``model_type``."""
    return get_family(config.get("model_type")).is_moe_layer(view(config), layer)


def moe_layer_indices(config: Mapping[str, Any]) -> list[int]:
    """Indices of the decoder layers that hold an MoE block."""
    return [i for i in range(num_hidden_layers(config)) if is_moe_layer(config, i)]


def _check_layer(config: Mapping[str, Any], layer: int, path: Any) -> None:
    n = num_hidden_layers(config)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise HFImportError(f"layer={layer!r} must be an integer in [0, {n})")
    if not 0 <= layer < n:
        raise HFImportError(
            f"layer={layer} is out of range: {str(path)!r} has num_hidden_layers={n} (valid: 0..{n - 1})"
        )
    if not is_moe_layer(config, layer):
        moe = moe_layer_indices(config)
        shown = ", ".join(map(str, moe[:8])) + (", ..." if len(moe) > 8 else "")
        raise HFImportError(
            f"layer {layer} of {str(path)!r} ({config['model_type']}) is a dense MLP layer, not MoE; "
            f"MoE layers: {shown or 'none'}"
        )


def common_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``MoEConfig`` fields every family reads alike: ``dim = hidden_size``, ``top_k =
    num_experts_per_tok`` and ``score_before_experts=False`` (every family but Llama 4, whose module
    overrides it, weights the expert outputs)."""
    return dict(dim=int(get(config, "hidden_size")), top_k=int(get(config, "num_experts_per_tok", "moe_k")),
                score_before_experts=False)


def moe_config_from_hf(config: Mapping[str, Any]) -> MoEConfig:
    """The ``MoEConfig`` whose forward equals transformers' MoE block of this family (float32).

    Every family but Llama 4 weights the expert outputs (``score_before_experts=False``); all use SwiGLU experts
    (``hidden_act`` must be "silu"); the routing is the family module's ``moe_config`` (its
    docstring, and README's family table, give the mapping).

    Raises ``HFImportError`` for an unsupported family or option, or a config.json whose values make
    an invalid ``MoEConfig``.
    """
    model_type = config.get("model_type")
    family = get_family(model_type)
    config = view(config)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise HFImportError(f"hidden_act={act!r}: only SwiGLU experts (hidden_act='silu') are supported")
    try:
        return family.moe_config(config, **common_fields(config))
    except HFImportError:
        raise
    except ValueError as exc:  # MoEConfig validation
        raise HFImportError(f"config.json ({model_type}) maps to an invalid MoEConfig: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# one layer -> canonical weights


def _layer_tensors(ckpt: Checkpoint, layer: int, layer_prefix: str) -> tuple[str, dict[str, str]]:
    """(module prefix, {name relative to the MoE module: full key}) for decoder layer ``layer``;
    ``layer_prefix``: the family's regex (``Family.layer_prefix``)."""
    pattern = re.compile(rf"^(.*?\b{layer_prefix.format(layer=layer)})(.+)$")
    groups: dict[str, dict[str, str]] = {}
    for key in ckpt.weight_map:
        m = pattern.match(key)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = key
    if not groups:
        raise HFImportError(
            f"no tensors of layer {layer} (model.layers.{layer}.mlp.* or .block_sparse_moe.*) in "
            f"{str(ckpt.path)!r}"
        )
    if len(groups) > 1:  # e.g. a multimodal model with several towers: prefer the language model
        prefixes = sorted(groups, key=len)
        return prefixes[0], groups[prefixes[0]]
    (prefix, rel), = groups.items()
    return prefix, rel


def read_hf_layer(path: str | os.PathLike, layer: int) -> tuple[MoEConfig, dict[str, np.ndarray]]:
    """Read MoE layer ``layer`` of a Hugging Face checkpoint directory.

    Returns ``(cfg, weights)``: ``weights`` maps the canonical names of DESIGN.md to float32 arrays
    (``router.gate.weight [E, D]``, ``experts.w1/w3 [E, H, D]``, ``experts.w2 [E, D, H]``, the
    shared expert when there is one (and its ``shared_expert_gate.weight [1, D]`` for Qwen2-MoE and
    Qwen3-Next), ``expert_bias [E]`` (``e_score_correction_bias`` of the families
    that route with one,
    zeros otherwise) and ``tokens_per_expert [E]`` zeros), ``cfg`` the matching ``MoEConfig``
    (``moe_config_from_hf``). Only the tensors of that layer are read.

    Raises ``HFImportError`` for: no directory / config.json; unsupported ``model_type`` (lists the
    supported ones); ``layer`` out of range (gives ``num_hidden_layers``); a dense layer (lists the MoE
    layers); a shard missing (names it and the index); tensors that disagree with config.json (expert
    count, shapes, missing or unexpected tensors).
    """
    path = Path(path)
    config = load_hf_config(path)
    _check_layer(config, layer, path)
    cfg = moe_config_from_hf(config)
    ckpt = Checkpoint(path)
    family = get_family(config["model_type"])
    prefix, rel = _layer_tensors(ckpt, layer, family.layer_prefix)
    renames = family.renames
    rel = {renames.get(name, name): key for name, key in rel.items()}
    where = f"layer {layer} of {str(path)!r} ({config['model_type']})"
    e, d, h = cfg.num_experts, cfg.dim, cfg.hidden_dim

    scales = {name[: -len("_scale_inv")]: key for name, key in rel.items() if name.endswith("_scale_inv")}
    used: set[str] = set(scales.values())
    # packed tensors (GPT-OSS's MXFP4 ``<name>_blocks`` + ``<name>_scales``), read as ``<name>``
    packed = {} if family.unpack is None else {
        name[: -len("_blocks")]: (key, rel[name[: -len("_blocks")] + "_scales"]) for name, key in rel.items()
        if name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in rel}
    for name, (blocks_key, _) in packed.items():
        rel[name] = blocks_key

    def read(name: str) -> np.ndarray:
        key = rel[name]
        used.add(key)
        if name in packed:
            used.add(packed[name][1])
            return family.unpack(ckpt.read(key), ckpt.read(packed[name][1]))
        w = ckpt.read(key)
        if name in scales:
            w = dequantize(w, ckpt.read(scales[name]), key)
        return w

    def expect(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if arr.shape != shape:
            raise HFImportError(f"{where}: {prefix}{name} has shape {list(arr.shape)}, config.json implies "
                                f"{list(shape)} (num_experts={e}, hidden_size={d}, expert hidden={h})")
        return arr

    if "gate.weight" not in rel:
        dense = [n for n in rel if n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")]
        kind = "dense MLP tensors " + ", ".join(dense) if dense else "tensors " + ", ".join(sorted(rel)[:6])
        raise HFImportError(f"{where}: config.json says MoE but the checkpoint holds {kind} and no router "
                            f"{prefix}gate.weight")
    gate = read("gate.weight")
    if gate.ndim != 2 or gate.shape[0] != e:
        raise HFImportError(f"{where}: router {prefix}gate.weight has shape {list(gate.shape)}: "
                            f"{gate.shape[0] if gate.ndim else '?'} experts, but config.json says "
                            f"num_experts={e}")
    weights: dict[str, np.ndarray] = {"router.gate.weight": expect("gate.weight", gate, (e, d))}

    per_expert: dict[int, dict[str, str]] = {}
    for name in rel:
        m = re.fullmatch(r"experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight", name)
        if m:
            per_expert.setdefault(int(m.group(1)), {})[_PROJ_TO_CANONICAL[m.group(2)]] = name
    if "experts.gate_up_proj" in rel or "experts.down_proj" in rel:  # transformers 5 fused layout
        if per_expert:
            raise HFImportError(f"{where}: holds both fused experts.gate_up_proj/down_proj and per-expert "
                                f"tensors")
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            if name not in rel:
                raise HFImportError(f"{where}: fused expert layout lacks {prefix}{name}")
        gate_up = read("experts.gate_up_proj")
        down = read("experts.down_proj")
        if get_family(config["model_type"]).experts_transposed and gate_up.ndim == 3 and down.ndim == 3:
            gate_up, down = gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)  # Llama 4: [E, D, 2H], [E, H, D]
        if gate_up.ndim != 3 or gate_up.shape[0] != e or down.ndim != 3 or down.shape[0] != e:
            raise HFImportError(f"{where}: fused experts hold gate_up_proj {list(gate_up.shape)} and down_proj "
                                f"{list(down.shape)}, but config.json says num_experts={e}")
        expect("experts.gate_up_proj", gate_up, (e, 2 * h, d))
        if family.gate_up_interleaved:  # GPT-OSS: gate at even, up at odd positions
            weights["experts.w1"] = np.ascontiguousarray(gate_up[:, 0::2])
            weights["experts.w3"] = np.ascontiguousarray(gate_up[:, 1::2])
        else:
            weights["experts.w1"] = np.ascontiguousarray(gate_up[:, :h])  # gate rows first
            weights["experts.w3"] = np.ascontiguousarray(gate_up[:, h:])
        weights["experts.w2"] = expect("experts.down_proj", down, (e, d, h))
    elif "experts.mlp.w1" in rel:  # DBRX: w1, v1, w2 each flat [E * H, D] (w2 is the down projection's transpose)
        for name in ("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"):
            if name not in rel:
                raise HFImportError(f"{where}: flat expert layout lacks {prefix}{name}")
        flat = {name: expect(name, read(name), (e * h, d)).reshape(e, h, d)
                for name in ("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2")}
        weights["experts.w1"] = np.ascontiguousarray(flat["experts.mlp.w1"])
        weights["experts.w3"] = np.ascontiguousarray(flat["experts.mlp.v1"])
        weights["experts.w2"] = np.ascontiguousarray(flat["experts.mlp.w2"].transpose(0, 2, 1))
    elif per_expert:
        found = sorted(per_expert)
        if found != list(range(e)):
            raise HFImportError(f"{where}: checkpoint holds {len(found)} experts (indices {found[0]}..{found[-1]})"
                                f", but config.json says num_experts={e}")
        for canon, shape in (("w1", (h, d)), ("w3", (h, d)), ("w2", (d, h))):
            stacked = np.empty((e, *shape), dtype=np.float32)
            for i in range(e):
                if canon not in per_expert[i]:
                    raise HFImportError(f"{where}: expert {i} lacks its {canon} projection")
                name = per_expert[i][canon]
                stacked[i] = expect(name, read(name), shape)
            weights[f"experts.{canon}"] = stacked
    else:
        raise HFImportError(f"{where}: no expert tensors (experts.{{e}}.*.weight or experts.gate_up_proj)")

    bias_name = next((n for n in ("gate.e_score_correction_bias", "e_score_correction_bias") if n in rel), None)
    if cfg.use_expert_bias:
        if bias_name is None:
            raise HFImportError(f"{where}: lacks {prefix}gate.e_score_correction_bias "
                                f"({config['model_type']} routes with an expert bias)")
        bias = read(bias_name)
        if bias.shape == (1, e):  # Ernie 4.5 stores it [1, E]
            bias = bias.reshape(e)
        weights["expert_bias"] = expect(bias_name, bias, (e,))
    else:
        if bias_name is not None:
            raise HFImportError(f"{where}: holds {prefix}{bias_name}, which {config['model_type']} does not use")
        weights["expert_bias"] = np.zeros(e, dtype=np.float32)
    weights["tokens_per_expert"] = np.zeros(e, dtype=np.float32)

    # Gemma 4's router scales and expert-input norm weight (canonical names after the family's renames)
    for name, shape, needed in (("router.scale", (d,), cfg.router_input_norm),
                                ("router.per_expert_scale", (e,), cfg.per_expert_scale),
                                ("expert_input_norm.weight", (d,), cfg.expert_input_norm)):
        if needed:
            if name not in rel:
                raise HFImportError(f"{where}: lacks the tensor read as {name!r} (expected shape {list(shape)})")
            weights[name] = expect(name, read(name), shape)

    shared = {m.group(1): n for n in rel if (m := re.fullmatch(r"shared_experts?\.(\w+)\.weight", n))}
    if cfg.num_shared_experts:
        hs = cfg.shared_dim
        for proj, canon in SHARED_TO_CANONICAL.items():
            if proj not in shared:
                raise HFImportError(f"{where}: config.json has n_shared_experts={cfg.num_shared_experts} but "
                                    f"{prefix}shared_experts.{proj}.weight is missing")
            shape = (d, hs) if canon == "w2" else (hs, d)
            weights[f"shared_expert.{canon}.weight"] = expect(shared[proj], read(shared[proj]), shape)
    elif shared:
        raise HFImportError(f"{where}: holds shared-expert tensors {sorted(shared.values())} but config.json has "
                            f"no shared experts")

    if cfg.shared_expert_gate:  # Qwen2-MoE's sigmoid gate on the shared expert, a Linear D -> 1
        if "shared_expert_gate.weight" not in rel:
            raise HFImportError(f"{where}: lacks {prefix}shared_expert_gate.weight ({config['model_type']} "
                                f"gates its shared expert)")
        weights["shared_expert_gate.weight"] = expect("shared_expert_gate.weight",
                                                      read("shared_expert_gate.weight"), (1, d))

    if family.read_extra is not None:  # JetMoE's output bias as experts.b2
        def read_named(name: str) -> np.ndarray:
            if name not in rel:
                raise HFImportError(f"{where}: lacks {prefix}{name}")
            return read(name)

        weights.update(family.read_extra(read_named, cfg))

    unexpected = sorted(prefix + n for n, key in rel.items() if key not in used)
    if unexpected:
        raise HFImportError(f"{where}: unexpected tensors {unexpected}")
    return cfg, weights


def import_hf(path: str | os.PathLike, layer: int, out_file: str | os.PathLike,
              sidecar: bool = True) -> MoEConfig:
    """Write MoE layer ``layer`` of checkpoint ``path`` as canonical safetensors ``out_file``.

    The file's metadata holds ``moe_config`` (``MoEConfig.to_dict()`` as JSON), ``source``, ``layer``
    and ``model_type``; with ``sidecar`` the same goes to ``out_file`` with suffix ``.json``.
    Read it back with ``load_imported``. Returns the config. Raises ``HFImportError``.
    """
    from parity.weights import save_weights

    cfg, weights = read_hf_layer(path, layer)
    meta = {
        "moe_config": json.dumps(cfg.to_dict()),
        "source": os.fspath(Path(path).resolve()),
        "layer": str(layer),
        "model_type": load_hf_config(path)["model_type"],
    }
    out_file = Path(out_file)
    save_weights(out_file, weights, metadata=meta)
    if sidecar:
        side = {"moe_config": cfg.to_dict(), **{k: v for k, v in meta.items() if k != "moe_config"}}
        side["layer"] = layer
        out_file.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
    return cfg


def load_imported(file: str | os.PathLike) -> tuple[MoEConfig, dict[str, np.ndarray]]:
    """Read a file written by ``import_hf``: (config from its metadata, canonical weights)."""
    from safetensors import safe_open

    from parity.weights import load_weights

    with safe_open(os.fspath(file), framework="numpy") as f:
        meta = f.metadata() or {}
    if "moe_config" not in meta:
        raise HFImportError(f"{os.fspath(file)!r} has no moe_config metadata (not written by import_hf)")
    cfg = MoEConfig.from_dict(json.loads(meta["moe_config"]))
    return cfg, load_weights(file, cfg)

