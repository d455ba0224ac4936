"""The GPT-OSS family (``parity.hf.gpt_oss``): a tiny random ``GptOssForCausalLM`` built with transformers
on CPU, saved with ``save_pretrained`` (nothing downloaded); the imported layer holds exactly the
model's parameters (gate/up de-interleaved, router and expert biases), and the float64 reference,
``moe_torch``, ``moe_jax`` and transformers' block (the ``hf`` column) agree in float32.

``swiglu_limit`` is 1.0 here (7.0 in the released models) so that both clamps of the clamped SwiGLU
act on many rows of this tiny layer; the test checks that they do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from parity import reference  # noqa: E402
from parity.hf import HFImportError, hf_block, hf_forward, moe_config_from_hf, read_hf_layer  # noqa: E402
from parity.presets import PRESETS  # noqa: E402
from tests.cases import TOLERANCES  # noqa: E402

D, H, E, K, LIMIT = 16, 24, 8, 3, 1.0
LAYER = 1
F32 = TOLERANCES["float32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.GptOssConfig(vocab_size=32, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=H, num_local_experts=E,
                                       num_experts_per_tok=K, max_position_embeddings=32, swiglu_limit=LIMIT,
                                       eos_token_id=1, bos_token_id=0, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # scaled like a trained layer; biases N(0, 0.3^2) so that they matter
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-2] ** -0.5 if p.ndim == 3 else
                                                               D ** -0.5 if p.ndim == 2 else 0.3))
    model.eval()
    path = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(path)
    return path, model


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, D)).astype(np.float32)


def test_gpt_oss_layer_reference_torch_jax_and_hf_agree(checkpoint):
    from flax import nnx

    import moe_jax
    import moe_torch

    path, model = checkpoint
    mlp = model.model.layers[LAYER].mlp
    cfg, weights = read_hf_layer(path, LAYER)
    assert (cfg.score_func, cfg.route_norm, cfg.router_bias, cfg.expert_proj_bias, cfg.expert_activation,
            cfg.swiglu_alpha, cfg.swiglu_limit, cfg.score_before_experts, cfg.top_k, cfg.num_shared_experts) == \
        ("softmax", True, True, True, "clamped_swiglu", 1.702, LIMIT, False, K, 0)
    gate_up = mlp.experts.gate_up_proj.detach().numpy().transpose(0, 2, 1)  # [E, 2H, D], interleaved
    gate_up_bias = mlp.experts.gate_up_proj_bias.detach().numpy()
    want = {"router.gate.weight": mlp.router.weight, "router.gate.bias": mlp.router.bias,
            "experts.w1": gate_up[:, 0::2], "experts.w3": gate_up[:, 1::2],
            "experts.w2": mlp.experts.down_proj.detach().numpy().transpose(0, 2, 1),
            "experts.b1": gate_up_bias[:, 0::2], "experts.b3": gate_up_bias[:, 1::2],
            "experts.b2": mlp.experts.down_proj_bias, "expert_bias": np.zeros(E, np.float32),
            "tokens_per_expert": np.zeros(E, np.float32)}
    assert sorted(weights) == sorted(want)
    for name, w in want.items():
        np.testing.assert_array_equal(weights[name], w.detach().numpy() if hasattr(w, "detach") else w, err_msg=name)

    x = _x()
    ref, aux = reference.moe_forward(weights, x, cfg)
    tokens = x.reshape(-1, D).astype(np.float64)
    pre = np.stack([tokens @ weights["experts.w1"][e].T + weights["experts.b1"][e] for e in range(E)])
    up = np.stack([tokens @ weights["experts.w3"][e].T + weights["experts.b3"][e] for e in range(E)])
    assert (pre > LIMIT).mean() > 0.05 and (np.abs(up) > LIMIT).mean() > 0.05  # both clamps act
    unclamped, _ = reference.moe_forward(weights, x, cfg.replace(swiglu_limit=1e6))
    assert not np.allclose(unclamped, ref, **F32)
    block = hf_block(path, LAYER)
    assert type(block).__name__ == "GptOssMLP"
    y_hf = hf_forward(block, x)
    with torch.no_grad():
        y_model = mlp(torch.from_numpy(x))[0].reshape(x.shape).numpy()
        _, hf_w, hf_idx = mlp.router(torch.from_numpy(x).reshape(-1, D))
    np.testing.assert_allclose(y_hf, ref, **F32)
    np.testing.assert_allclose(y_model, y_hf, **F32)
    order = np.argsort(hf_idx.numpy(), -1)
    np.testing.assert_array_equal(np.take_along_axis(hf_idx.numpy(), order, -1), np.sort(aux["selected_experts"], -1))
    ours = np.take_along_axis(aux["routing_weights"], np.argsort(aux["selected_experts"], -1), -1)
    np.testing.assert_allclose(np.take_along_axis(hf_w.numpy(), order, -1), ours, **F32)

    moe = moe_torch.MoE(**cfg.to_kwargs())
    moe.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    with torch.no_grad():
        y_torch = moe(torch.from_numpy(x)).numpy()
    jmoe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(jmoe, weights)
    jmoe.eval()
    for name, y in (("torch", y_torch), ("jax", np.asarray(jmoe(x)))):
        np.testing.assert_allclose(y, ref, **F32, err_msg=name)
        np.testing.assert_allclose(y, y_hf, **F32, err_msg=name)


def test_gpt_oss_topk_then_softmax_is_softmax_topk_renormalise_up_to_rounding():
    """GPT-OSS's router (``F.linear`` with a bias, top-k of the logits, softmax over the k) vs
    ``moe_torch``'s ``router_bias=True, score_func="softmax", route_norm=True`` on 20000 tokens of 32
    experts, top-4, at three logit scales, float32: the same experts, weights within 4 float32 ULP
    (relative), and not bit-equal (the two orders round differently)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    import moe_torch

    hf_router = GptOssTopKRouter(transformers.GptOssConfig(hidden_size=D, num_local_experts=32, num_experts_per_tok=4))
    ours = moe_torch.TokenChoiceTopKRouter(D, 32, top_k=4, score_func="softmax", route_norm=True, router_bias=True)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for scale in (1.0, 4.0, 16.0):
        with torch.no_grad():
            weight, bias = scale * torch.randn(32, D, generator=gen) / D**0.5, torch.randn(32, generator=gen)
            hf_router.weight.copy_(weight)
            hf_router.bias.copy_(bias)
            ours.gate.weight.copy_(weight)
            ours.gate.bias.copy_(bias)
            x = torch.randn(20000, D, generator=gen)
            _, hf_w, hf_idx = hf_router(x)
            r = ours.route(x)
        order = hf_idx.argsort(-1)
        np.testing.assert_array_equal(hf_idx.gather(-1, order).numpy(), r.selected_experts.sort(-1).values.numpy())
        ours_w = r.routing_weights.gather(-1, r.selected_experts.argsort(-1))
        rel = ((hf_w.gather(-1, order) - ours_w).abs() / ours_w).max().item() / torch.finfo(torch.float32).eps
        assert rel <= 4.0, (scale, rel)
        worst = max(worst, rel)
    assert worst > 0


def test_gpt_oss_preset_and_config_defaults():
    preset = PRESETS["gpt-oss"].config
    assert (preset.num_experts, preset.top_k, preset.router_bias, preset.expert_proj_bias, preset.expert_activation,
            preset.swiglu_alpha, preset.swiglu_limit, preset.score_func, preset.route_norm) == \
        (32, 4, True, True, "clamped_swiglu", 1.702, 7.0, "softmax", True)
    base = dict(model_type="gpt_oss", hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=2)
    cfg = moe_config_from_hf(base)  # swiglu_alpha / swiglu_limit absent: transformers' defaults
    assert (cfg.swiglu_alpha, cfg.swiglu_limit) == (1.702, 7.0)
    assert moe_config_from_hf(dict(base, quantization_config={"quant_method": "mxfp4"})) == cfg
    with pytest.raises(HFImportError, match=r"quant_method='fp8': only unquantised and MXFP4 experts are read"):
        moe_config_from_hf(dict(base, quantization_config={"quant_method": "fp8"}))


def test_gpt_oss_mxfp4_checkpoint_is_dequantised_as_transformers_does(tmp_path):
    """The hub layout: experts as MXFP4 ``*_blocks`` / ``*_scales`` (random codes and scales written
    into a saved tiny model). The imported weights equal transformers' own dequantisation
    (``convert_moe_packed_tensors``) bit for bit, and the hf column agrees with the reference."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    d, i, e = 32, 32, 4  # MXFP4 blocks hold 32 values along D (gate_up) and I (down)
    config = transformers.GptOssConfig(vocab_size=32, hidden_size=d, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=i, num_local_experts=e,
                                       num_experts_per_tok=2, max_position_embeddings=32, eos_token_id=1,
                                       bos_token_id=0, pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    rng = np.random.default_rng(0)
    dequantised = {}
    for layer in range(2):
        for name, (rows, cols) in (("gate_up_proj", (2 * i, d)), ("down_proj", (d, i))):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            blocks = rng.integers(0, 256, (e, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(122, 128, (e, rows, cols // 32), dtype=np.uint8)
            del tensors[key]
            tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
            dequantised[layer, name] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                                  dtype=torch.float32).numpy()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    cfg_json["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))

    cfg, weights = read_hf_layer(tmp_path, LAYER)
    gate_up = dequantised[LAYER, "gate_up_proj"].transpose(0, 2, 1)  # [E, 2I, D], interleaved
    assert cfg.expert_activation == "clamped_swiglu" and np.abs(gate_up).max() > 0
    np.testing.assert_array_equal(weights["experts.w1"], gate_up[:, 0::2])
    np.testing.assert_array_equal(weights["experts.w3"], gate_up[:, 1::2])
    np.testing.assert_array_equal(weights["experts.w2"], dequantised[LAYER, "down_proj"].transpose(0, 2, 1))
    x = np.random.default_rng(1).standard_normal((2, 4, d)).astype(np.float32)
    ref, _ = reference.moe_forward(weights, x, cfg)
    np.testing.assert_allclose(hf_forward(hf_block(tmp_path, LAYER), x), ref, **F32)


def test_gpt_oss_cli_import_hf_and_run_hf_with_the_hf_column(checkpoint, capsys, tmp_path):
    from parity.cli import main
    from parity.hf import load_imported

    path, _ = checkpoint
    out = tmp_path / "layer.safetensors"
    assert main(["import-hf", str(path), "--layer", str(LAYER), "--out", str(out)]) == 0
    capsys.readouterr()
    cfg, weights = load_imported(out)
    cfg_direct, direct = read_hf_layer(path, LAYER)
    assert cfg == cfg_direct and sorted(weights) == sorted(direct)
    for name in direct:
        np.testing.assert_array_equal(weights[name], direct[name], err_msg=name)
    assert main(["run", "--hf", str(path), "--layer", str(LAYER), "--backends", "reference,torch,hf", "--quiet",
                 "--no-grads", "--steps", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {b["name"]: b["status"] for b in report["backends"]}["hf:cpu"] == "ran"
    hf_checks = {c["id"]: c["status"] for c in report["checks"] if "hf:cpu" in c["id"]}
    assert "forward/out/torch:cpu~hf:cpu" in hf_checks and set(hf_checks.values()) == {"PASS"}
