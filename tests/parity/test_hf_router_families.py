"""parity.hf families of issue 15's router side: Gemma 4, DBRX, JetMoE; and the fused expert layout of
every family added before them.

Each family: a tiny random model built with transformers' own config class on CPU, saved with
``save_pretrained`` (nothing downloaded); the imported layer holds exactly the model's parameters, and
the float64 reference, moe_torch, moe_jax and transformers (the ``hf`` column) agree in float32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from parity import reference  # noqa: E402
from parity.hf import HFImportError, hf_block, hf_forward, is_moe_layer, moe_config_from_hf, read_hf_layer  # noqa: E402
from parity.presets import PRESETS  # noqa: E402
from tests.cases import TOLERANCES  # noqa: E402
from tests.parity.test_hf_families import FAMILIES as EARLIER_FAMILIES  # noqa: E402
from tests.parity.test_hf_families import _backend_forward, _config  # noqa: E402

D, H, E, K = 16, 24, 8, 3
LAYER = 1
F32 = TOLERANCES["float32"]


def _make_config(case: str):
    if case == "gemma4_text":  # both layers MoE (enable_moe_block), a dense MLP beside each
        return transformers.Gemma4TextConfig(
            vocab_size=32, hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=32, enable_moe_block=True, num_experts=E,
            top_k_experts=K, moe_intermediate_size=H, hidden_size_per_layer_input=0, vocab_size_per_layer_input=32,
            pad_token_id=None, eos_token_id=1, bos_token_id=0)
    if case == "dbrx":  # p = 2 exercises the p-norm (the released models: 1)
        return transformers.DbrxConfig(
            vocab_size=32, d_model=D, n_heads=2, n_layers=2, max_seq_len=32,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
            ffn_config=dict(ffn_hidden_size=H, moe_num_experts=E, moe_top_k=K, moe_normalize_expert_weights=2.0))
    if case == "jetmoe":
        return transformers.JetMoeConfig(vocab_size=32, hidden_size=D, num_hidden_layers=2, num_key_value_heads=2,
                                         kv_channels=8, intermediate_size=H, num_local_experts=E,
                                         num_experts_per_tok=K, max_position_embeddings=32)
    raise AssertionError(case)


# case -> the MoEConfig fields it must map to, its preset, the preset's (top_k, route_norm_p, num_experts)
CASES = {
    "gemma4_text": (dict(score_func="softmax", route_norm=True, route_norm_eps=0.0, router_input_norm=True,
                         per_expert_scale=True, expert_input_norm=True, input_norm_eps=1e-6,
                         expert_activation="gelu_tanh", route_norm_p=None, expert_proj_bias=False,
                         num_shared_experts=0), "gemma4-26b-a4b", (8, None, 64)),
    "dbrx": (dict(score_func="softmax", route_norm=True, route_norm_eps=0.0, route_norm_p=2.0,
                  router_input_norm=False, per_expert_scale=False, expert_input_norm=False,
                  expert_activation="silu", num_shared_experts=0), "dbrx", (4, 1.0, 16)),
    "jetmoe": (dict(score_func="softmax", route_norm=True, route_norm_p=None, expert_proj_bias=True,
                    router_input_norm=False, expert_activation="silu", num_shared_experts=0), "jetmoe-8b",
               (2, None, 8)),
}


def _moe_modules(model, case: str):
    """(block-like module holding the router, {canonical name: tensor}) of decoder layer LAYER."""
    if case == "gemma4_text":
        layer = model.model.layers[LAYER]
        gu, down = layer.experts.gate_up_proj, layer.experts.down_proj
        return layer, {"router.gate.weight": layer.router.proj.weight, "router.scale": layer.router.scale,
                       "router.per_expert_scale": layer.router.per_expert_scale,
                       "expert_input_norm.weight": layer.pre_feedforward_layernorm_2.weight,
                       "experts.w1": gu[:, :H], "experts.w3": gu[:, H:], "experts.w2": down}
    if case == "dbrx":
        ffn = model.transformer.blocks[LAYER].ffn
        mlp = ffn.experts.mlp
        return ffn, {"router.gate.weight": ffn.router.layer.weight, "experts.w1": mlp.w1.view(E, H, D),
                     "experts.w3": mlp.v1.view(E, H, D), "experts.w2": mlp.w2.view(E, H, D).transpose(1, 2)}
    mlp = model.model.layers[LAYER].mlp
    gu = mlp.input_linear.weight
    return mlp, {"router.gate.weight": mlp.router.layer.weight, "experts.w1": gu[:, :H], "experts.w3": gu[:, H:],
                 "experts.w2": mlp.output_linear.weight, "experts.b1": torch.zeros(E, H),
                 "experts.b3": torch.zeros(E, H), "experts.b2": mlp.bias.expand(E, D)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache: dict = {}

    def make(case: str):
        if case not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_make_config(case))
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():  # scaled like a trained layer; the scales around 1, as Gemma 4 initialises them
                for name, p in model.named_parameters():
                    if not any(m in name for m in ("router", "experts", "pre_feedforward_layernorm_2", "mlp.")):
                        continue
                    if name.endswith("mlp.bias"):  # JetMoE's output bias
                        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
                    elif p.ndim == 1:
                        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
                    else:
                        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            model.eval()
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            cache[case] = (path, model)
        return cache[case]

    return make


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, D)).astype(np.float32)


def _hf_routing(block, case: str, x):
    """(weights [N, k], experts [N, k]) of transformers' own router on x [N, D] (Gemma 4, DBRX)."""
    if case == "gemma4_text":
        _, w, idx = block.router(x)
        return w, idx
    return block.route_tokens_to_experts(block.router(x))


@pytest.mark.slow  # the first eager JAX forward of a session compiles for tens of seconds on 2 shared cores
@pytest.mark.parametrize("case", list(CASES))
def test_family_layer_reference_torch_jax_and_hf_agree(checkpoint, case):
    fields, _, _ = CASES[case]
    path, model = checkpoint(case)
    cfg, weights = read_hf_layer(path, LAYER)
    assert {f: getattr(cfg, f) for f in fields} == fields and cfg.score_before_experts is False
    block, want = _moe_modules(model, case)
    assert sorted(weights) == sorted([*want, "expert_bias", "tokens_per_expert"])
    for name, t in want.items():
        np.testing.assert_array_equal(weights[name], t.detach().numpy(), err_msg=name)

    x = _x()
    ref, aux = reference.moe_forward(weights, x, cfg)
    assert np.abs(ref).max() > 0.1
    y_hf = hf_forward(hf_block(path, LAYER), x)
    np.testing.assert_allclose(y_hf, ref, **F32)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        if case == "gemma4_text":  # the decoder layer's own lines: router on h, experts on pre_feedforward_layernorm_2(h)
            flat = xt.reshape(-1, D)
            _, w_hf, idx_hf = block.router(flat)
            y_model = block.experts(block.pre_feedforward_layernorm_2(flat), idx_hf, w_hf).reshape(x.shape)
        else:
            y_model = block(xt)
    np.testing.assert_allclose(y_model.numpy(), y_hf, **F32)
    if case != "jetmoe":  # JetMoE's router returns expert-sorted slots; its output above covers it
        with torch.no_grad():
            hf_w, hf_idx = _hf_routing(block, case, xt.reshape(-1, D))
        order = np.argsort(hf_idx.numpy(), -1)
        np.testing.assert_array_equal(np.take_along_axis(hf_idx.numpy(), order, -1),
                                      np.sort(aux["selected_experts"], -1))
        ours = np.take_along_axis(aux["routing_weights"], np.argsort(aux["selected_experts"], -1), -1)
        np.testing.assert_allclose(np.take_along_axis(hf_w.float().numpy(), order, -1), ours, **F32)
    for backend in ("torch", "jax"):
        y = _backend_forward(backend, cfg, weights, x)
        np.testing.assert_allclose(y, ref, **F32, err_msg=backend)
        np.testing.assert_allclose(y, y_hf, **F32, err_msg=backend)


def test_gemma4_options_each_matter_and_the_dense_mlp_is_not_read(checkpoint):
    path, _ = checkpoint("gemma4_text")
    cfg, weights = read_hf_layer(path, LAYER)
    x = _x(1)
    ref, _ = reference.moe_forward(weights, x, cfg)
    for option, tensor in (("router_input_norm", "router.scale"), ("per_expert_scale", "router.per_expert_scale"),
                           ("expert_input_norm", "expert_input_norm.weight")):
        off, _ = reference.moe_forward({k: v for k, v in weights.items() if k != tensor}, x,
                                       cfg.replace(**{option: False}))
        assert not np.allclose(off, ref, **F32), option
    assert not any(k.startswith(("mlp.", "shared")) for k in weights)  # the dense MLP beside the block


def test_gemma4_multimodal_config_reads_its_text_config(checkpoint, tmp_path):
    """``model_type="gemma4"`` (the released checkpoints): text_config nested, tensors under
    ``model.language_model.``; the same layer as the text-only checkpoint."""
    from safetensors.numpy import load_file, save_file

    path, _ = checkpoint("gemma4_text")
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text}))
    tensors = {}
    for file in path.glob("*.safetensors"):
        tensors.update({k.replace("model.", "model.language_model.", 1): v for k, v in load_file(file).items()})
    save_file(tensors, tmp_path / "model.safetensors")
    cfg, weights = read_hf_layer(tmp_path, LAYER)
    cfg_text, weights_text = read_hf_layer(path, LAYER)
    assert cfg == cfg_text and sorted(weights) == sorted(weights_text)
    for name in weights:
        np.testing.assert_array_equal(weights[name], weights_text[name], err_msg=name)
    np.testing.assert_allclose(hf_forward(hf_block(tmp_path, LAYER), _x()), hf_forward(hf_block(path, LAYER), _x()),
                               rtol=0, atol=0)
    with pytest.raises(HFImportError, match=r"model_type='gemma4'\) lacks its text_config"):
        moe_config_from_hf({"model_type": "gemma4"})


def test_jetmoe_output_bias_is_every_experts_b2_up_to_rounding(checkpoint):
    """JetMoE adds ``bias`` once; the layer adds ``(sum_j w_j) * bias`` through ``experts.b2`` (the
    same row for every expert): equal up to the rounding of the k softmax weights' sum."""
    path, model = checkpoint("jetmoe")
    cfg, weights = read_hf_layer(path, LAYER)
    bias = model.model.layers[LAYER].mlp.bias.detach().numpy()
    np.testing.assert_array_equal(weights["experts.b2"], np.broadcast_to(bias, (E, D)))
    assert not weights["experts.b1"].any() and not weights["experts.b3"].any()
    x = _x(2)
    ref, aux = reference.moe_forward(weights, x, cfg)
    no_bias, _ = reference.moe_forward(dict(weights, **{"experts.b2": np.zeros((E, D), np.float32)}), x, cfg)
    np.testing.assert_allclose(ref - no_bias, np.broadcast_to(bias, ref.shape), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(aux["routing_weights"].sum(-1), 1.0, rtol=1e-12)


def test_dbrx_defaults_and_refusals():
    base = dict(model_type="dbrx", d_model=D, n_layers=3, ffn_config={"ffn_hidden_size": H, "moe_num_experts": E})
    cfg = moe_config_from_hf(base)  # DbrxFFNConfig defaults: top-1, p = 1
    assert (cfg.top_k, cfg.route_norm, cfg.route_norm_p, cfg.route_norm_eps) == (1, True, 1.0, 0.0)
    assert [is_moe_layer(base, i) for i in range(3)] == [True, True, True]
    off = moe_config_from_hf(dict(base, ffn_config=dict(base["ffn_config"], moe_normalize_expert_weights=None)))
    assert (off.route_norm, off.route_norm_p) == (False, None)
    with pytest.raises(HFImportError, match=r"moe_normalize_expert_weights=0"):
        moe_config_from_hf(dict(base, ffn_config=dict(base["ffn_config"], moe_normalize_expert_weights=0)))
    with pytest.raises(HFImportError, match=r"hidden_act='gelu'"):
        moe_config_from_hf(dict(base, ffn_config=dict(base["ffn_config"], ffn_act_fn={"name": "gelu"})))
    gemma = dict(model_type="gemma4_text", hidden_size=D, num_experts=E, top_k_experts=2, moe_intermediate_size=H,
                 num_hidden_layers=2, enable_moe_block=False)
    assert [is_moe_layer(gemma, i) for i in range(2)] == [False, False]
    with pytest.raises(HFImportError, match=r"hidden_activation='silu'"):
        moe_config_from_hf(dict(gemma, hidden_activation="silu"))
    with pytest.raises(HFImportError, match=r"activation_function='gelu'"):
        moe_config_from_hf(dict(model_type="jetmoe", hidden_size=D, num_experts_per_tok=2, intermediate_size=H,
                                num_local_experts=E, activation_function="gelu"))


@pytest.mark.parametrize("case", list(CASES))
def test_family_preset_has_its_routing(checkpoint, case):
    cfg, _ = read_hf_layer(checkpoint(case)[0], LAYER)
    fields, name, published = CASES[case]
    preset = PRESETS[name].config
    same = [f for f in fields if f not in ("route_norm_p", "input_norm_eps")]
    assert {f: getattr(preset, f) for f in same} == {f: getattr(cfg, f) for f in same}
    assert (preset.top_k, preset.route_norm_p, preset.num_experts) == published


@pytest.mark.parametrize("case", list(CASES))
def test_cli_import_hf_and_run_hf_with_the_hf_column(checkpoint, case, capsys, tmp_path):
    from parity.cli import main
    from parity.hf import load_imported

    path, _ = checkpoint(case)
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


@pytest.mark.parametrize("case", list(CASES))
def test_family_hf_block_in_bfloat16_runs_close_to_the_reference(checkpoint, case):
    path, _ = checkpoint(case)
    cfg, weights = read_hf_layer(path, LAYER)
    block = hf_block(path, LAYER, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())  # no float32 router in these families
    x = torch.from_numpy(_x()).to(torch.bfloat16).float().numpy()
    y = hf_forward(block, x)
    ref, _ = reference.moe_forward(weights, x, cfg)
    assert np.isfinite(y).all() and np.abs(y - ref).max() < 0.1 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# the fused layout (transformers 5 ``save_pretrained(save_original_format=False)``) of the earlier families


@pytest.mark.parametrize("family", EARLIER_FAMILIES)
def test_earlier_family_reads_both_layouts_alike(family, tmp_path):
    """``save_pretrained`` writes per-expert tensors (``experts.{e}.gate_proj`` / ``w1`` ...; Granite-MoE
    ``input_linear``) by default and the fused ``experts.gate_up_proj`` / ``down_proj`` with
    ``save_original_format=False``; both read to the same canonical weights (Llama 4: one layout,
    written either way)."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family))
    model.save_pretrained(tmp_path / "original")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    if family == "kimi_k2":  # a DeepSeek-V3 model declared kimi_k2, as Kimi K2's config.json does
        for layout in ("original", "fused"):
            cfg = json.loads((tmp_path / layout / "config.json").read_text())
            (tmp_path / layout / "config.json").write_text(json.dumps(dict(cfg, model_type="kimi_k2")))
    keys = {}
    for layout in ("original", "fused"):
        keys[layout] = set()
        for file in (tmp_path / layout).glob("*.safetensors"):
            with safe_open(file, "np") as f:
                keys[layout] |= {k for k in f.keys() if f"layers.{LAYER}." in k and ".experts." in k}
    assert any(k.endswith("experts.gate_up_proj") for k in keys["fused"]), sorted(keys["fused"])
    if family not in ("llama4_text", "granitemoe"):
        assert any(".experts.0." in k for k in keys["original"]), sorted(keys["original"])
    cfg_o, w_o = read_hf_layer(tmp_path / "original", LAYER)
    cfg_f, w_f = read_hf_layer(tmp_path / "fused", LAYER)
    assert cfg_o == cfg_f and sorted(w_o) == sorted(w_f)
    for name in w_o:
        np.testing.assert_array_equal(w_o[name], w_f[name], err_msg=name)
