"""parity.hf: import one MoE layer of tiny random Hugging Face checkpoints of each supported family.

Every checkpoint is built on CPU with transformers (config -> model -> save_pretrained into a temp
dir; nothing is downloaded) in the layouts it writes: per-expert tensors as on the hub (the default,
``save_original_format=True``), the fused 3-D tensors of transformers 5 modules
(``save_original_format=False``), sharded through ``model.safetensors.index.json``, bfloat16 and a
block-FP8 layer written here as DeepSeek-V3 releases it. The imported layer must hold exactly the
model's parameters, and the float64 reference, transformers' block (``hf_block``), the layer of the
model transformers itself loads, ``moe_torch`` and ``moe_jax`` must agree in float32.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from parity import reference  # noqa: E402
from parity.hf import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    HFImportError,
    hf_block,
    hf_forward,
    import_hf,
    load_imported,
    moe_layer_indices,
    read_hf_layer,
)
from tests.cases import TOLERANCES  # noqa: E402

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "olmoe")
D, H, E = 16, 24, 8  # non-square so a missing transpose cannot hide
LAYER = 1  # an MoE layer in every family (layer 0 is dense for Qwen3-MoE and DeepSeek-V3 here)
F32 = TOLERANCES["float32"]


def _hf_config(family: str):
    common = dict(vocab_size=32, hidden_size=D, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32, eos_token_id=1, bos_token_id=0,
                  pad_token_id=None)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=H, num_local_experts=E,
                                          num_experts_per_tok=2)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=H,
                                           num_experts=E, num_experts_per_tok=2, norm_topk_prob=True,
                                           head_dim=8, decoder_sparse_step=1, mlp_only_layers=[0])
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(**common, intermediate_size=32, moe_intermediate_size=H,
                                             n_routed_experts=E, num_experts_per_tok=3, n_group=4,
                                             topk_group=2, first_k_dense_replace=1, n_shared_experts=2,
                                             routed_scaling_factor=2.5, kv_lora_rank=8, q_lora_rank=None,
                                             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=H, num_experts=E, num_experts_per_tok=2)
    raise AssertionError(family)


def _build_model(family: str, seed: int = 0):
    """A tiny random model whose MoE weights are scaled like a trained layer (decisive routing)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model.eval()


_LAYOUTS = {
    "hub": dict(),  # per-expert tensors (transformers 5 reverts its fused layout on save)
    "fused": dict(save_original_format=False),
    "sharded": dict(max_shard_size="16KB"),
    "sharded_fused": dict(max_shard_size="16KB", save_original_format=False),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(family, layout) -> (directory, in-memory model), built once per module."""
    cache: dict = {}

    def make(family: str, layout: str = "hub"):
        if (family, layout) not in cache:
            model = _build_model(family)
            path = tmp_path_factory.mktemp(f"{family}_{layout}")
            model.save_pretrained(path, **_LAYOUTS[layout])
            cache[family, layout] = (path, model)
        return cache[family, layout]

    return make


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, D)).astype(np.float32)


def _mlp(model, layer: int = LAYER):
    return model.model.layers[layer].mlp


def _hf_params(model, family: str) -> dict[str, np.ndarray]:
    """The model's own MoE parameters of LAYER in canonical names (ground truth for the reader)."""
    mlp = _mlp(model)
    gate_up = mlp.experts.gate_up_proj.detach().float().numpy()
    out = {
        "router.gate.weight": mlp.gate.weight.detach().float().numpy(),
        "experts.w1": gate_up[:, :H],
        "experts.w3": gate_up[:, H:],
        "experts.w2": mlp.experts.down_proj.detach().float().numpy(),
    }
    if family == "deepseek_v3":
        out["expert_bias"] = mlp.gate.e_score_correction_bias.detach().float().numpy()
        for proj, canon in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            out[f"shared_expert.{canon}.weight"] = getattr(mlp.shared_experts, proj).weight.detach().float().numpy()
    return out


def _layouts():
    cases = [(f, "hub") for f in FAMILIES] + [(f, "fused") for f in FAMILIES]
    return cases + [("mixtral", "sharded"), ("deepseek_v3", "sharded_fused")]


# ---------------------------------------------------------------------------------------------
# round trip and agreement


@pytest.mark.parametrize("family,layout", _layouts(), ids=[f"{f}-{lay}" for f, lay in _layouts()])
def test_layer_round_trip_and_hf_block_agrees(checkpoint, family, layout):
    path, model = checkpoint(family, layout)
    if layout.startswith("sharded"):
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 1
    cfg, weights = read_hf_layer(path, LAYER)

    # the canonical weights are exactly the model's parameters
    for name, want in _hf_params(model, family).items():
        np.testing.assert_array_equal(weights[name], want, err_msg=name)
        assert weights[name].dtype == np.float32
    assert cfg.num_experts == E and cfg.dim == D and cfg.hidden_dim == H
    assert not cfg.score_before_experts

    x = _x()
    ref, aux = reference.moe_forward(weights, x, cfg)
    y_block = hf_forward(hf_block(path, LAYER), x)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    loaded.config._experts_implementation = "eager"
    with torch.no_grad():
        y_loaded = _mlp(loaded)(torch.from_numpy(x)).numpy()
        y_memory = _mlp(model)(torch.from_numpy(x)).numpy()
        _, _, hf_idx = _mlp(model).gate(torch.from_numpy(x).reshape(-1, D))

    assert y_block.shape == x.shape and y_block.dtype == np.float32
    assert np.abs(ref).max() > 0.1  # weights scaled so that the comparison means something
    np.testing.assert_allclose(y_block, ref, **F32)
    np.testing.assert_allclose(y_loaded, y_block, rtol=0, atol=1e-6)
    np.testing.assert_allclose(y_memory, y_block, rtol=0, atol=1e-6)
    # same experts selected (transformers' slot order is not specified: compare as sets)
    np.testing.assert_array_equal(np.sort(hf_idx.numpy(), -1), np.sort(aux["selected_experts"], -1))


def _moe_torch_forward(cfg, weights, x):
    moe_torch = pytest.importorskip("moe_torch")
    if not hasattr(moe_torch, "MoE"):
        pytest.skip("moe_torch.MoE is not available yet")
    moe = moe_torch.MoE(**cfg.to_kwargs())
    moe.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    moe.eval()
    with torch.no_grad():
        return moe(torch.from_numpy(x)).numpy()


def _moe_jax_forward(cfg, weights, x):
    moe_jax = pytest.importorskip("moe_jax")
    if not (hasattr(moe_jax, "MoE") and hasattr(moe_jax, "load_state_dict")):
        pytest.skip("moe_jax.MoE / load_state_dict are not available yet")
    from flax import nnx

    moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(moe, weights)
    moe.eval()
    return np.asarray(moe(x))


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree_with_transformers(checkpoint, family, backend):
    path, _ = checkpoint(family, "hub")
    cfg, weights = read_hf_layer(path, LAYER)
    x = _x(1)
    forward = _moe_torch_forward if backend == "torch" else _moe_jax_forward
    y = forward(cfg, weights, x)
    y_hf = hf_forward(hf_block(path, LAYER), x)
    ref, _ = reference.moe_forward(weights, x, cfg)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, ref, **F32)
    np.testing.assert_allclose(y, y_hf, **F32)


def test_config_mapping_per_family(checkpoint):
    cfgs = {f: read_hf_layer(checkpoint(f)[0], LAYER)[0] for f in FAMILIES}
    assert cfgs["mixtral"].score_func == "softmax" and cfgs["mixtral"].route_norm
    assert cfgs["qwen3_moe"].score_func == "softmax" and cfgs["qwen3_moe"].route_norm  # norm_topk_prob=True
    assert cfgs["olmoe"].score_func == "softmax" and not cfgs["olmoe"].route_norm  # norm_topk_prob=False
    ds = cfgs["deepseek_v3"]
    assert (ds.score_func, ds.use_expert_bias, ds.route_norm, ds.route_scale) == ("sigmoid", True, True, 2.5)
    assert (ds.num_expert_groups, ds.num_limited_groups, ds.group_score) == (4, 2, "top2_sum")
    assert (ds.top_k, ds.num_shared_experts, ds.shared_dim) == (3, 2, 2 * H)
    for cfg in cfgs.values():
        assert cfg.score_before_experts is False


def test_bfloat16_checkpoint_and_block(checkpoint, tmp_path):
    _, model = checkpoint("mixtral")
    path = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(path)
    try:
        cfg, weights = read_hf_layer(path, LAYER)
        for name, want in _hf_params(model, "mixtral").items():
            np.testing.assert_array_equal(weights[name], want, err_msg=name)  # bf16 -> f32 is exact
        x = _x(2)
        ref, _ = reference.moe_forward(weights, x, cfg)
        y = hf_forward(hf_block(path, LAYER, dtype="bfloat16"), x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, ref, **TOLERANCES["bfloat16"])
    finally:
        model.float()


def test_deepseek_block_keeps_router_float32(checkpoint):
    """transformers keeps DeepSeek-V3's gate.weight and e_score_correction_bias in float32 in a bf16 model."""
    path, _ = checkpoint("deepseek_v3")
    block = hf_block(path, LAYER, dtype="bfloat16")
    assert block.gate.weight.dtype == torch.float32
    assert block.gate.e_score_correction_bias.dtype == torch.float32
    assert block.experts.gate_up_proj.dtype == torch.bfloat16
    assert block.shared_experts.down_proj.weight.dtype == torch.bfloat16
    cfg, weights = read_hf_layer(path, LAYER)
    rounded = {k: v if k in ("router.gate.weight", "expert_bias")
               else torch.from_numpy(v).bfloat16().float().numpy() for k, v in weights.items()}
    x = torch.from_numpy(_x(3)).bfloat16().float().numpy()
    ref, _ = reference.moe_forward(rounded, x, cfg)
    np.testing.assert_allclose(hf_forward(block, x), ref, **TOLERANCES["bfloat16"])


def test_block_fp8_checkpoint_is_dequantised(checkpoint, tmp_path):
    """DeepSeek-V3's release: float8_e4m3fn expert weights with one float32 weight_scale_inv per block."""
    from safetensors.torch import load_file, save_file

    src, _ = checkpoint("deepseek_v3")
    path = tmp_path / "fp8"
    path.mkdir()
    (path / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    want = {}
    for key in list(tensors):
        if f"layers.{LAYER}.mlp.experts.0." in key:  # a few tensors are enough to test the path
            w = tensors[key]
            scale = torch.rand(w.shape[0] // 4, w.shape[1] // 4) + 0.5  # 4x4 blocks
            q = (w / scale.repeat_interleave(4, 0).repeat_interleave(4, 1)).to(torch.float8_e4m3fn)
            tensors[key] = q
            tensors[key + "_scale_inv"] = scale
            want[key] = (q.float() * scale.repeat_interleave(4, 0).repeat_interleave(4, 1)).numpy()
    save_file(tensors, path / "model.safetensors")
    _, weights = read_hf_layer(path, LAYER)
    prefix = f"model.layers.{LAYER}.mlp.experts.0."
    np.testing.assert_array_equal(weights["experts.w1"][0], want[prefix + "gate_proj.weight"])
    np.testing.assert_array_equal(weights["experts.w3"][0], want[prefix + "up_proj.weight"])
    np.testing.assert_array_equal(weights["experts.w2"][0], want[prefix + "down_proj.weight"])


def test_import_hf_writes_canonical_file(checkpoint, tmp_path):
    path, _ = checkpoint("deepseek_v3", "fused")
    out = tmp_path / "layer1.safetensors"
    cfg = import_hf(path, LAYER, out)
    cfg2, weights = load_imported(out)
    assert cfg2 == cfg
    _, direct = read_hf_layer(path, LAYER)
    assert sorted(weights) == sorted(direct)
    for name in direct:
        np.testing.assert_array_equal(weights[name], direct[name])
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["moe_config"] == cfg.to_dict() and side["layer"] == LAYER
    assert side["model_type"] == "deepseek_v3"


def test_cli_import_hf_and_run_hf(checkpoint, tmp_path, capsys):
    from parity.cli import main

    path, _ = checkpoint("deepseek_v3", "fused")
    assert main(["import-hf", str(path), "--layer", str(LAYER), "--out", str(tmp_path / "w.safetensors")]) == 0
    assert main(["import-hf", str(path), "--layer", str(LAYER), "--out", str(tmp_path)]) == 2  # a directory
    assert "is a directory" in capsys.readouterr().err
    assert main(["run", "--hf", str(path), "--layer", str(LAYER), "--backends", "reference,hf", "--quiet",
                 "--no-grads", "--steps", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["preset"].endswith(f"#layer{LAYER}")


def test_moe_layer_indices(checkpoint):
    cfg = json.loads((checkpoint("deepseek_v3")[0] / "config.json").read_text())
    assert moe_layer_indices(cfg) == [1, 2]
    assert moe_layer_indices(dict(cfg, moe_layer_freq=2)) == [2]
    qwen = json.loads((checkpoint("qwen3_moe")[0] / "config.json").read_text())
    assert moe_layer_indices(qwen) == [1, 2]
    assert moe_layer_indices(dict(qwen, mlp_only_layers=[], decoder_sparse_step=2)) == [1]


# ---------------------------------------------------------------------------------------------
# errors


def _copy(src, dst, config_change=None):
    dst.mkdir()
    for f in os.listdir(src):
        data = (src / f).read_bytes()
        if f == "config.json" and config_change:
            cfg = json.loads(data)
            cfg.update(config_change)
            data = json.dumps(cfg).encode()
        (dst / f).write_bytes(data)
    return dst


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_error_expert_count_mismatch(checkpoint, tmp_path, layout):
    src, _ = checkpoint("mixtral", layout)
    path = _copy(src, tmp_path / "bad", {"num_local_experts": 6})
    with pytest.raises(HFImportError, match=r"8 experts.*num_experts=6"):
        read_hf_layer(path, LAYER)


def test_error_expert_tensors_vs_router(checkpoint, tmp_path):
    """Router says 8 experts, the checkpoint holds only 7 experts' tensors."""
    from safetensors.torch import load_file, save_file

    src, _ = checkpoint("olmoe")
    path = _copy(src, tmp_path / "bad")
    tensors = load_file(path / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if f"layers.{LAYER}.mlp.experts.7." not in k}
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(HFImportError, match=r"holds 7 experts.*num_experts=8"):
        read_hf_layer(path, LAYER)


def test_error_shape_mismatch(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3_moe", "fused")
    path = _copy(src, tmp_path / "bad", {"moe_intermediate_size": 16})
    with pytest.raises(HFImportError, match=r"gate_up_proj has shape \[8, 48, 16\].*\[8, 32, 16\]"):
        read_hf_layer(path, LAYER)


def test_error_missing_shard(checkpoint, tmp_path):
    src, _ = checkpoint("mixtral", "sharded")
    path = _copy(src, tmp_path / "bad")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index[f"model.layers.{LAYER}.block_sparse_moe.gate.weight"]
    (path / shard).unlink()
    with pytest.raises(HFImportError, match=rf"shard '{shard}'.*model\.safetensors\.index\.json"):
        read_hf_layer(path, LAYER)


@pytest.mark.parametrize("layer", [3, 17, -1])
def test_error_layer_out_of_range(checkpoint, layer):
    path, _ = checkpoint("olmoe")
    with pytest.raises(HFImportError, match=r"out of range.*num_hidden_layers=3"):
        read_hf_layer(path, layer)
    with pytest.raises(HFImportError, match=r"num_hidden_layers=3"):
        hf_block(path, layer)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_error_dense_layer(checkpoint, family):
    path, _ = checkpoint(family)
    with pytest.raises(HFImportError, match=r"layer 0 .*dense.*MoE layers: 1, 2"):
        read_hf_layer(path, 0)


def test_error_config_says_moe_but_layer_is_dense(checkpoint, tmp_path):
    src, _ = checkpoint("deepseek_v3")
    path = _copy(src, tmp_path / "bad", {"first_k_dense_replace": 0})
    with pytest.raises(HFImportError, match=r"config.json says MoE.*dense MLP tensors"):
        read_hf_layer(path, 0)


def test_error_unknown_family(checkpoint, tmp_path):
    src, _ = checkpoint("mixtral")
    path = _copy(src, tmp_path / "bad", {"model_type": "llama"})
    with pytest.raises(HFImportError, match=r"model_type='llama' is not supported.*" + ", ".join(SUPPORTED_MODEL_TYPES)):
        read_hf_layer(path, LAYER)


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(HFImportError, match="not a directory"):
        read_hf_layer(tmp_path / "nope", 0)
    with pytest.raises(HFImportError, match="no config.json"):
        read_hf_layer(tmp_path, 0)
    assert issubclass(HFImportError, ValueError)
