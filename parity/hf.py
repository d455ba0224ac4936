"""Import one MoE layer of a Hugging Face checkpoint; run transformers' own block as a third reference.

Supported families (``config.json`` ``model_type``): ``mixtral``, ``qwen3_moe``, ``deepseek_v3`` and
``olmoe``. A checkpoint is a directory holding ``config.json`` and ``*.safetensors`` (one file, or
shards listed by ``model.safetensors.index.json``). Two expert layouts are read:

* per-expert tensors, as checkpoints on the hub store them (and as transformers 5 ``save_pretrained``
  writes them by default, ``save_original_format=True``): Mixtral
  ``model.layers.{L}.block_sparse_moe.experts.{e}.w1|w2|w3.weight``; Qwen3-MoE, OLMoE, DeepSeek-V3
  ``model.layers.{L}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``;
* the fused 3-D tensors of transformers 5 modules (``save_pretrained(..., save_original_format=False)``):
  ``model.layers.{L}.mlp.experts.gate_up_proj [E, 2I, D]`` (gate rows first, then up rows) and
  ``model.layers.{L}.mlp.experts.down_proj [E, D, I]``.

Block-quantised FP8 weights (DeepSeek-V3's release: ``float8_e4m3fn`` plus ``weight_scale_inv`` per
128x128 block) are dequantised to float32. Only the tensors of the requested layer are read, through
``safetensors.safe_open`` (never pickle); dtypes NumPy lacks (BF16, F8_E4M3) are decoded from their
raw bytes, so reading needs neither torch nor transformers.

``read_hf_layer`` gives the canonical weights (DESIGN.md names and shapes, float32) and the
``MoEConfig`` that reproduces transformers' forward (see the README section "Hugging Face
checkpoints" for every semantic difference and the option that reproduces each side).
``hf_block`` / ``hf_forward`` build and run transformers' own MoE block (needs the ``hf`` extra).

Errors are ``HFImportError`` (a ``ValueError``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity.config import MoEConfig

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen3_moe", "deepseek_v3", "olmoe")

# transformers' MoE block class per family (module, class), checked against transformers 5.24.
HF_BLOCK_CLASSES = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
}

INDEX_FILE = "model.safetensors.index.json"

# transformers 5 DeepseekV3Config defaults, used when config.json omits a key (as transformers does)
_DEEPSEEK_V3_DEFAULTS = {"first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "n_shared_experts": 1,
                         "norm_topk_prob": True, "routed_scaling_factor": 2.5}

# per-expert projection names -> canonical expert weight (w1 = gate, w3 = up, w2 = down)
_PROJ_TO_CANONICAL = {"w1": "w1", "w2": "w2", "w3": "w3",
                      "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_SHARED_TO_CANONICAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class HFImportError(ValueError):
    """A checkpoint that cannot be imported: unknown family, dense or missing layer, missing shard,
    or tensors that do not match ``config.json``."""


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
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFImportError(
            f"{str(cfg_file)!r}: model_type={model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def _get(config: Mapping[str, Any], *names: str, default: Any = None, required: bool = True) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if required and default is None:
        raise HFImportError(f"config.json (model_type={config.get('model_type')!r}) lacks {names[0]!r}")
    return default


def num_hidden_layers(config: Mapping[str, Any]) -> int:
    return int(_get(config, "num_hidden_layers"))


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    """Whether decoder layer ``layer`` holds an MoE block (rules of each family's modeling code).

    Mixtral, OLMoE: every layer. Qwen3-MoE: ``layer not in mlp_only_layers and num_experts > 0 and
    (layer + 1) % decoder_sparse_step == 0``. DeepSeek-V3: ``layer >= first_k_dense_replace and
    layer % moe_layer_freq == 0`` (DeepSeek's reference code; transformers 5 ignores ``moe_layer_freq``,
    which is 1 in every released DeepSeek-V3 config).
    """
    model_type = config["model_type"]
    if model_type in ("mixtral", "olmoe"):
        return True
    if model_type == "qwen3_moe":
        step = int(config.get("decoder_sparse_step") or 1)
        return (layer not in (config.get("mlp_only_layers") or [])
                and int(_get(config, "num_experts", "num_local_experts")) > 0
                and (layer + 1) % step == 0)
    if model_type == "deepseek_v3":
        first = int(config.get("first_k_dense_replace", _DEEPSEEK_V3_DEFAULTS["first_k_dense_replace"]) or 0)
        freq = int(config.get("moe_layer_freq") or 1)
        return layer >= first and layer % freq == 0
    raise HFImportError(f"model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")


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


def moe_config_from_hf(config: Mapping[str, Any]) -> MoEConfig:
    """The ``MoEConfig`` whose forward equals transformers' MoE block of this family (float32).

    All four families weight the expert outputs (``score_before_experts=False``) and use SwiGLU
    experts (``hidden_act`` must be "silu").

    * Mixtral: softmax over all experts -> top-k -> renormalise (always; ``route_norm=True``), which
      equals the paper's softmax over the top-k logits.
    * Qwen3-MoE: softmax -> top-k; ``route_norm = norm_topk_prob`` (true in the released models).
    * OLMoE: softmax -> top-k; ``route_norm = norm_topk_prob`` (false in OLMoE-1B-7B).
    * DeepSeek-V3 (arXiv:2412.19437 sec. 2.1): sigmoid scores; selection on scores +
      ``e_score_correction_bias`` (``use_expert_bias=True``); ``n_group`` / ``topk_group`` ->
      ``num_expert_groups`` / ``num_limited_groups`` with ``group_score="top2_sum"`` (``n_group=1``
      is no grouping); ``route_norm = norm_topk_prob``; ``route_scale = routed_scaling_factor``;
      ``n_shared_experts`` shared experts fused into one SwiGLU of
      ``n_shared_experts * moe_intermediate_size``.

    Raises ``HFImportError`` for an unsupported family or option.
    """
    model_type = config.get("model_type")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise HFImportError(f"hidden_act={act!r}: only SwiGLU experts (hidden_act='silu') are supported")
    dim = int(_get(config, "hidden_size"))
    top_k = int(_get(config, "num_experts_per_tok"))
    common = dict(dim=dim, top_k=top_k, score_before_experts=False)
    try:
        if model_type == "mixtral":
            return MoEConfig(**common, hidden_dim=int(_get(config, "intermediate_size")),
                             num_experts=int(_get(config, "num_local_experts", "num_experts")),
                             score_func="softmax", route_norm=True)
        if model_type in ("qwen3_moe", "olmoe"):
            hidden = (_get(config, "moe_intermediate_size") if model_type == "qwen3_moe"
                      else _get(config, "intermediate_size"))
            return MoEConfig(**common, hidden_dim=int(hidden),
                             num_experts=int(_get(config, "num_experts", "num_local_experts")),
                             score_func="softmax", route_norm=bool(config.get("norm_topk_prob", False)))
        if model_type == "deepseek_v3":
            scoring = config.get("scoring_func", "sigmoid")
            if scoring != "sigmoid":
                raise HFImportError(f"deepseek_v3 with scoring_func={scoring!r}: only 'sigmoid' is supported")
            hidden = int(_get(config, "moe_intermediate_size"))
            dflt = _DEEPSEEK_V3_DEFAULTS
            n_group = config.get("n_group", dflt["n_group"])
            groups: dict[str, Any] = {}
            if n_group is not None and int(n_group) > 1:
                groups = dict(num_expert_groups=int(n_group), num_limited_groups=int(config.get("topk_group", dflt["topk_group"])),
                              group_score="top2_sum")
            n_shared = int(config.get("n_shared_experts", dflt["n_shared_experts"]) or 0)
            return MoEConfig(**common, hidden_dim=hidden,
                             num_experts=int(_get(config, "n_routed_experts", "num_local_experts")),
                             score_func="sigmoid", use_expert_bias=True,
                             route_norm=bool(config.get("norm_topk_prob", dflt["norm_topk_prob"])),
                             route_scale=float(config.get("routed_scaling_factor", dflt["routed_scaling_factor"])),
                             num_shared_experts=n_shared,
                             shared_hidden_dim=n_shared * hidden if n_shared else None,
                             **groups)
    except HFImportError:
        raise
    except ValueError as exc:  # MoEConfig validation
        raise HFImportError(f"config.json ({model_type}) maps to an invalid MoEConfig: {exc}") from exc
    raise HFImportError(f"model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")


# ----------------------------------------------------------------------------------------------
# safetensors reading (one layer only)


def _fp8_e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (bias 7, no inf, 0x7f/0xff NaN)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = np.where((exp == 15) & (man == 7), np.nan, val)
    return (sign * val).astype(np.float32)


_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


class _Checkpoint:
    """Key -> shard file of a checkpoint directory, and float32 reads of single tensors."""

    def __init__(self, path: Path):
        self.path = path
        self._headers: dict[str, dict] = {}
        index = path / INDEX_FILE
        if not index.is_file():
            found = sorted(path.glob("*.safetensors.index.json"))
            index = found[0] if found else None
        self.index = index
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise HFImportError(f"cannot read the weight_map of index {str(index)!r}: {exc}") from exc
            self.weight_map: dict[str, str] = dict(weight_map)
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise HFImportError(f"{str(path)!r} holds no *.safetensors file and no {INDEX_FILE}")
            self.weight_map = {}
            for file in files:
                for key in self._header(file):
                    self.weight_map[key] = file.name

    def _file(self, key: str) -> Path:
        name = self.weight_map[key]
        file = self.path / name
        if not file.is_file():
            where = f"listed in index {str(self.index)!r}" if self.index else "expected"
            raise HFImportError(
                f"shard {name!r} ({where}, holding {key!r}) is missing from {str(self.path)!r}"
            )
        return file

    def _header(self, file: Path) -> dict:
        if file.name in self._headers:
            return self._headers[file.name]
        try:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HFImportError(f"cannot read {str(file)!r} as safetensors: {exc}") from exc
        header.pop("__metadata__", None)
        header = {k: dict(v, _data_start=8 + n) for k, v in header.items()}
        self._headers[file.name] = header
        return header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header(self._file(key))[key]["shape"])

    def read(self, key: str) -> np.ndarray:
        """Tensor ``key`` as float32 (BF16 / F8_E4M3 decoded from raw bytes)."""
        file = self._file(key)
        info = self._header(file)[key]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype in _NUMPY_DTYPES:
            from safetensors import safe_open

            with safe_open(os.fspath(file), framework="numpy") as f:
                return np.asarray(f.get_tensor(key), dtype=np.float32)
        start, end = info["data_offsets"]
        raw = np.fromfile(file, dtype=np.uint8, count=end - start, offset=info["_data_start"] + start)
        if dtype == "BF16":
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if dtype == "F8_E4M3":
            return _fp8_e4m3fn_table()[raw].reshape(shape)
        raise HFImportError(f"tensor {key!r} in {str(file)!r} has dtype {dtype}, which cannot be imported "
                            f"(supported: F64, F32, F16, BF16, F8_E4M3)")


def _dequantize(w: np.ndarray, scale_inv: np.ndarray, key: str) -> np.ndarray:
    """Block FP8 dequantisation (DeepSeek-V3): each [b0, b1] block of the last two dims times its scale."""
    r, c = w.shape[-2:]
    sr, sc = scale_inv.shape[-2:]
    b0, b1 = -(-r // sr), -(-c // sc)
    if scale_inv.shape[:-2] != w.shape[:-2] or -(-r // b0) != sr or -(-c // b1) != sc:
        raise HFImportError(f"{key!r}: scale_inv shape {list(scale_inv.shape)} does not tile weight shape "
                            f"{list(w.shape)}")
    full = np.repeat(np.repeat(scale_inv, b0, axis=-2), b1, axis=-1)[..., :r, :c]
    return (w * full).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# one layer -> canonical weights


def _layer_tensors(ckpt: _Checkpoint, layer: int) -> tuple[str, dict[str, str]]:
    """(module prefix, {name relative to the MoE module: full key}) for decoder layer ``layer``."""
    pattern = re.compile(rf"^(.*?\blayers\.{layer}\.(?:block_sparse_moe|mlp)\.)(.+)$")
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
    shared expert when there is one, ``expert_bias [E]`` (DeepSeek-V3's ``e_score_correction_bias``,
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
    ckpt = _Checkpoint(path)
    prefix, rel = _layer_tensors(ckpt, layer)
    where = f"layer {layer} of {str(path)!r} ({config['model_type']})"
    e, d, h = cfg.num_experts, cfg.dim, cfg.hidden_dim

    scales = {name[: -len("_scale_inv")]: key for name, key in rel.items() if name.endswith("_scale_inv")}
    used: set[str] = set(scales.values())

    def read(name: str) -> np.ndarray:
        key = rel[name]
        used.add(key)
        w = ckpt.read(key)
        if name in scales:
            w = _dequantize(w, ckpt.read(scales[name]), key)
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
        if gate_up.ndim != 3 or gate_up.shape[0] != e or down.ndim != 3 or down.shape[0] != e:
            raise HFImportError(f"{where}: fused experts hold gate_up_proj {list(gate_up.shape)} and down_proj "
                                f"{list(down.shape)}, but config.json says num_experts={e}")
        expect("experts.gate_up_proj", gate_up, (e, 2 * h, d))
        weights["experts.w1"] = np.ascontiguousarray(gate_up[:, :h])  # gate rows first
        weights["experts.w3"] = np.ascontiguousarray(gate_up[:, h:])
        weights["experts.w2"] = expect("experts.down_proj", down, (e, d, h))
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
            raise HFImportError(f"{where}: lacks {prefix}gate.e_score_correction_bias (config.json is DeepSeek-V3)")
        weights["expert_bias"] = expect(bias_name, read(bias_name), (e,))
    else:
        if bias_name is not None:
            raise HFImportError(f"{where}: holds {prefix}{bias_name}, which {config['model_type']} does not use")
        weights["expert_bias"] = np.zeros(e, dtype=np.float32)
    weights["tokens_per_expert"] = np.zeros(e, dtype=np.float32)

    shared = {m.group(1): n for n in rel if (m := re.fullmatch(r"shared_experts?\.(\w+)\.weight", n))}
    if cfg.num_shared_experts:
        hs = cfg.shared_dim
        for proj, canon in _SHARED_TO_CANONICAL.items():
            if proj not in shared:
                raise HFImportError(f"{where}: config.json has n_shared_experts={cfg.num_shared_experts} but "
                                    f"{prefix}shared_experts.{proj}.weight is missing")
            shape = (d, hs) if canon == "w2" else (hs, d)
            weights[f"shared_expert.{canon}.weight"] = expect(shared[proj], read(shared[proj]), shape)
    elif shared:
        raise HFImportError(f"{where}: holds shared-expert tensors {sorted(shared.values())} but config.json has "
                            f"no shared experts")

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


# ----------------------------------------------------------------------------------------------
# transformers' own block (the "hf" column)


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
    """transformers' MoE block of layer ``layer`` (``MixtralSparseMoeBlock``,
    ``Qwen3MoeSparseMoeBlock``, ``DeepseekV3MoE``, ``OlmoeSparseMoeBlock``) with its weights loaded.

    Built from the checkpoint's config with ``config._experts_implementation = "eager"`` (transformers 5
    picks the experts' kernel at call time; ``from_pretrained`` defaults to "grouped_mm"); weights come
    from ``read_hf_layer`` (a standalone block starts uninitialised) and are loaded strictly, then the
    module is cast to ``dtype`` ("float32", "float64", "bfloat16", "float16"), keeping DeepSeek-V3's
    router weight and ``e_score_correction_bias`` in float32 as transformers does
    (``_keep_in_fp32_modules_strict``). Returned in eval mode (Mixtral's router jitter is training only).

    Needs the ``hf`` extra (transformers >= 5); raises ``ImportError`` without it, ``HFImportError``
    for a bad checkpoint.
    """
    import importlib

    import torch
    from transformers import AutoConfig

    config = load_hf_config(path)
    _check_layer(config, layer, path)
    cfg, weights = read_hf_layer(path, layer)
    hf_config = AutoConfig.from_pretrained(os.fspath(path), local_files_only=True)
    hf_config._experts_implementation = "eager"
    module_name, class_name = HF_BLOCK_CLASSES[config["model_type"]]
    block_cls = getattr(importlib.import_module(module_name), class_name)
    block = block_cls(hf_config)

    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    state = {
        "gate.weight": t["router.gate.weight"],
        "experts.gate_up_proj": torch.cat([t["experts.w1"], t["experts.w3"]], dim=1),
        "experts.down_proj": t["experts.w2"],
    }
    if config["model_type"] == "deepseek_v3":
        state["gate.e_score_correction_bias"] = t["expert_bias"]
        for proj, canon in _SHARED_TO_CANONICAL.items():
            state[f"shared_experts.{proj}.weight"] = t[f"shared_expert.{canon}.weight"]
    block.load_state_dict(state, strict=True)
    torch_dtype = _torch_dtype(dtype)
    for name, child in block.named_children():
        # DeepSeek-V3's router weight and bias stay float32 (_keep_in_fp32_modules_strict)
        if not (config["model_type"] == "deepseek_v3" and name == "gate"):
            child.to(torch_dtype)
    block.eval()
    block.requires_grad_(False)
    return block


def hf_forward(block, x: np.ndarray) -> np.ndarray:
    """Run a block from ``hf_block`` on ``x [B, S, D]``; returns ``[B, S, D]`` NumPy.

    ``x`` is cast to the dtype of the block's expert weights; the output is returned in that dtype
    (bfloat16 is returned as float32, which holds it exactly). Blocks that return a
    ``(hidden, router_logits)`` tuple are handled. Raises ``ValueError`` for a wrong shape.
    """
    import torch

    dtype = block.experts.down_proj.dtype
    dim = block.experts.down_proj.shape[1]
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
    return out.numpy()
