"""parity.hf families beyond the first four, and the family registry.

Each family: a tiny random model built with transformers' own config class on CPU, saved with
``save_pretrained`` into a temp dir (nothing downloaded); the imported layer holds exactly the model's
parameters and the float64 reference, ``moe_torch``, ``moe_jax`` and transformers' block (the ``hf``
column, ``hf_block``) agree in float32. Adding a family = one ``_CONFIGS`` entry (plus its module).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from parity import reference  # noqa: E402
from parity.hf import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    Family,
    HFImportError,
    get_family,
    hf_block,
    hf_forward,
    is_moe_layer,
    moe_config_from_hf,
    read_hf_layer,
    register,
)
from parity.presets import PRESETS  # noqa: E402
from tests.cases import TOLERANCES  # noqa: E402

D, H, E = 16, 24, 8
LAYER = 1  # layer 0 is dense in every config below
F32 = TOLERANCES["float32"]
_COMMON = dict(vocab_size=32, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
               max_position_embeddings=32, eos_token_id=1, bos_token_id=0, pad_token_id=None)
# DeepSeek-V3 routing with groups (4 of 2 experts, keep 2), top-3, one shared expert, scale 2.5
_DSV3_ROUTING = dict(intermediate_size=32, moe_intermediate_size=H, n_routed_experts=E, num_experts_per_tok=3,
                     n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                     first_k_dense_replace=1)


_MLA = dict(kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
_DSV2_ROUTING = dict(intermediate_size=32, moe_intermediate_size=H, n_routed_experts=E, num_experts_per_tok=3,
                     n_shared_experts=2, first_k_dense_replace=1, **_MLA)

_QWEN_ROUTING = dict(intermediate_size=32, moe_intermediate_size=H, shared_expert_intermediate_size=20, num_experts=E,
                     num_experts_per_tok=3, mlp_only_layers=[0], decoder_sparse_step=1)


def _config(case: str):
    if case == "glm4_moe":
        return transformers.Glm4MoeConfig(**_COMMON, **_DSV3_ROUTING, head_dim=8)
    if case == "dots1":
        return transformers.Dots1Config(**_COMMON, **_DSV3_ROUTING, head_dim=8)
    if case == "kimi_k2":  # a DeepSeek-V3 model saved, then declared kimi_k2 as Kimi K2's config.json does
        return transformers.DeepseekV3Config(**_COMMON, **dict(_DSV3_ROUTING, n_group=1, topk_group=1), **_MLA)
    if case == "deepseek_v2":  # DeepSeek-V2's group_limited_greedy, its routed_scaling_factor 16
        return transformers.DeepseekV2Config(**_COMMON, **_DSV2_ROUTING, topk_method="group_limited_greedy",
                                             n_group=4, topk_group=2, routed_scaling_factor=16.0)
    if case == "deepseek_v2_lite":  # V2-Lite: greedy top-k, no groups
        return transformers.DeepseekV2Config(**_COMMON, **_DSV2_ROUTING, topk_method="greedy",
                                             routed_scaling_factor=1.0)
    if case == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**_COMMON, **_QWEN_ROUTING, norm_topk_prob=False)
    if case == "qwen3_next":  # both layers linear attention (3 of each 4 are); the MoE block is Qwen2-MoE's
        return transformers.Qwen3NextConfig(**_COMMON, **_QWEN_ROUTING, norm_topk_prob=True, head_dim=8,
                                            linear_num_key_heads=2, linear_num_value_heads=2,
                                            linear_key_head_dim=8, linear_value_head_dim=8)
    if case == "granitemoe":  # every layer MoE, top-k of the logits then softmax over the k chosen
        return transformers.GraniteMoeConfig(**_COMMON, intermediate_size=H, num_local_experts=E, num_experts_per_tok=3)
    if case == "llama4_text":  # layer 0 dense (interleave step 2), top-2 (the released models: top-1)
        return transformers.Llama4TextConfig(**_COMMON, head_dim=8, intermediate_size=H, intermediate_size_mlp=32,
                                             num_local_experts=E, num_experts_per_tok=2, interleave_moe_layer_step=2)
    if case == "minimax_m2":  # every layer MoE; sigmoid + bias, renormalised by the bare sum
        return transformers.MiniMaxM2Config(**_COMMON, head_dim=8, intermediate_size=H, num_local_experts=E,
                                            num_experts_per_tok=3)
    if case == "ernie4_5_moe":  # layer 0 dense (moe_layer_start_index 1); 2 shared experts
        return transformers.Ernie4_5_MoeConfig(**_COMMON, head_dim=8, intermediate_size=32, moe_intermediate_size=H,
                                               moe_num_experts=E, moe_k=3, moe_num_shared_experts=2,
                                               moe_layer_start_index=1)
    raise AssertionError(case)


# case -> model_type, the MoEConfig fields it must map to, its preset (issue 15: one per family)
_DSV3_FIELDS = dict(score_func="sigmoid", use_expert_bias=True, route_norm=True, route_scale=2.5, top_k=3,
                    num_shared_experts=1, shared_dim=H, num_expert_groups=4, num_limited_groups=2,
                    group_score="top2_sum", shared_expert_gate=False)
_DSV2_FIELDS = dict(score_func="softmax", use_expert_bias=False, route_norm=False, top_k=3, num_shared_experts=2,
                    shared_dim=2 * H, shared_expert_gate=False)
_QWEN_FIELDS = dict(score_func="softmax", use_expert_bias=False, route_scale=1.0, top_k=3, num_expert_groups=None,
                    num_shared_experts=1, shared_dim=20, shared_expert_gate=True)
CASES = {
    "glm4_moe": ("glm4_moe", _DSV3_FIELDS, "glm-4.5"),
    "dots1": ("dots1", _DSV3_FIELDS, "dots-llm1"),
    "kimi_k2": ("kimi_k2", dict(_DSV3_FIELDS, num_expert_groups=None, num_limited_groups=None, group_score="max"),
                "kimi-k2"),
    "deepseek_v2": ("deepseek_v2", dict(_DSV2_FIELDS, route_scale=16.0, num_expert_groups=4, num_limited_groups=2,
                                        group_score="max"), "deepseek-v2"),
    "deepseek_v2_lite": ("deepseek_v2", dict(_DSV2_FIELDS, route_scale=1.0, num_expert_groups=None),
                         "deepseek-v2-lite"),
    "qwen2_moe": ("qwen2_moe", dict(_QWEN_FIELDS, route_norm=False), "qwen2-moe"),
    "qwen3_next": ("qwen3_next", dict(_QWEN_FIELDS, route_norm=True), "qwen3-next"),
    "granitemoe": ("granitemoe", dict(score_func="softmax", use_expert_bias=False, route_norm=True, route_scale=1.0,
                                      top_k=3, num_expert_groups=None, num_shared_experts=0,
                                      shared_expert_gate=False), "granite-moe"),
    "llama4_text": ("llama4_text", dict(score_func="sigmoid", use_expert_bias=False, route_norm=False, route_scale=1.0,
                                        top_k=2, num_expert_groups=None, num_shared_experts=1, shared_dim=H,
                                        shared_expert_gate=False, score_before_experts=True), "llama4-scout"),
    "minimax_m2": ("minimax_m2", dict(score_func="sigmoid", use_expert_bias=True, route_norm=True, route_norm_eps=0.0,
                                      route_scale=1.0, top_k=3, num_expert_groups=None, num_shared_experts=0),
                   "minimax-m2"),
    "ernie4_5_moe": ("ernie4_5_moe", dict(score_func="softmax", use_expert_bias=True, route_norm=True,
                                          route_norm_mode="clamp", route_norm_eps=1e-12, route_scale=1.0, top_k=3,
                                          num_expert_groups=None, num_shared_experts=2, shared_dim=2 * H,
                                          shared_expert_gate=False), "ernie-4.5-moe"),
}
FAMILIES = tuple(CASES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache: dict = {}

    def make(family: str):
        if family not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_config(family))
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():  # scaled like a trained layer so that routing is decisive
                for name, p in model.named_parameters():
                    if any(f".{m}." in name for m in ("mlp", "block_sparse_moe", "feed_forward")):
                        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
                for name, b in model.named_buffers():
                    if name.endswith("e_score_correction_bias"):
                        b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            model.eval()
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            if family == "kimi_k2":
                cfg = json.loads((path / "config.json").read_text())
                cfg.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
                           auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
                (path / "config.json").write_text(json.dumps(cfg))
            cache[family] = (path, model)
        return cache[family]

    return make


def _moe_block(model):
    """The MoE block of decoder layer ``LAYER`` (``mlp``; Granite-MoE: ``block_sparse_moe``)."""
    layer = model.model.layers[LAYER]
    for name in ("block_sparse_moe", "feed_forward"):
        if hasattr(layer, name):
            return getattr(layer, name)
    return layer.mlp


def _hf_routing(router, x, top_k: int, bias=None):
    """(weights [N, k], experts [N, k]) of transformers' router on ``x [N, D]`` (MiniMax-M2's takes the
    block's ``bias``)."""
    out = router(x) if bias is None else router(x, bias)
    if len(out) == 2:  # Llama 4: (scores [N, E], zero but at the chosen experts; logits [N, E])
        idx = out[1].topk(top_k, dim=-1).indices
        return out[0].gather(-1, idx), idx
    return out[1], out[2]


def _bias(block, model_type: str):
    """The block's expert bias (``Family.bias_key``)."""
    obj = block
    for part in get_family(model_type).bias_key.split("."):
        obj = getattr(obj, part)
    return obj


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, D)).astype(np.float32)


def _backend_forward(backend: str, cfg, weights, x):
    if backend == "torch":
        import moe_torch

        moe = moe_torch.MoE(**cfg.to_kwargs())
        moe.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
        moe.eval()
        with torch.no_grad():
            return moe(torch.from_numpy(x)).numpy()
    from flax import nnx

    import moe_jax

    moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(moe, weights)
    moe.eval()
    return np.asarray(moe(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layer_reference_torch_jax_and_hf_agree(checkpoint, family):
    model_type, fields, _ = CASES[family]
    path, model = checkpoint(family)
    cfg, weights = read_hf_layer(path, LAYER)
    mlp = _moe_block(model)
    router = getattr(mlp, get_family(model_type).router_name)
    gate_up, down = mlp.experts.gate_up_proj.detach().numpy(), mlp.experts.down_proj.detach().numpy()
    if get_family(model_type).experts_transposed:
        gate_up, down = gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)
    want = {"router.gate.weight": router.weight.detach().numpy(), "experts.w1": gate_up[:, :H],
            "experts.w3": gate_up[:, H:], "experts.w2": down,
            "expert_bias": (_bias(mlp, model_type).detach().numpy().reshape(-1) if cfg.use_expert_bias
                            else np.zeros(E, np.float32))}
    if cfg.num_shared_experts:
        shared = getattr(mlp, get_family(model_type).shared_prefix)
        for proj, canon in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            want[f"shared_expert.{canon}.weight"] = getattr(shared, proj).weight.detach().numpy()
    if cfg.shared_expert_gate:
        want["shared_expert_gate.weight"] = mlp.shared_expert_gate.weight.detach().numpy()
    assert sorted(weights) == sorted([*want, "tokens_per_expert"])
    for name, w in want.items():
        np.testing.assert_array_equal(weights[name], w, err_msg=name)
    assert {f: getattr(cfg, f) for f in fields} == fields
    assert cfg.score_before_experts is fields.get("score_before_experts", False)

    x = _x()
    ref, aux = reference.moe_forward(weights, x, cfg)
    block = hf_block(path, LAYER)
    assert type(block).__name__ == get_family(model_type).block[1]
    y_hf = hf_forward(block, x)
    with torch.no_grad():
        y_model = mlp(torch.from_numpy(x))
        y_model = (y_model[0] if isinstance(y_model, tuple) else y_model).reshape(x.shape).numpy()
        hf_w, hf_idx = _hf_routing(router, torch.from_numpy(x).reshape(-1, D), cfg.top_k,
                                   _bias(mlp, model_type) if model_type == "minimax_m2" else None)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(y_hf, ref, **F32)
    np.testing.assert_allclose(y_model, y_hf, **F32)  # the in-memory model (its default experts kernel)
    # same experts with the same weights (transformers' slot order is not specified: sort by expert)
    order = np.argsort(hf_idx.numpy(), -1)
    np.testing.assert_array_equal(np.take_along_axis(hf_idx.numpy(), order, -1), np.sort(aux["selected_experts"], -1))
    ours = np.take_along_axis(aux["routing_weights"], np.argsort(aux["selected_experts"], -1), -1)
    np.testing.assert_allclose(np.take_along_axis(hf_w.numpy(), order, -1), ours, **F32)
    if cfg.shared_expert_gate:  # the gate matters here: without it the layer's output differs
        ungated, _ = reference.moe_forward(weights, x, cfg.replace(shared_expert_gate=False))
        assert not np.allclose(ungated, ref, **F32)
    if cfg.num_expert_groups is not None:  # the groups changed some token's experts: the test sees them
        flat, _ = reference.moe_forward(weights, x, cfg.replace(num_expert_groups=None, num_limited_groups=None))
        assert not np.allclose(flat, ref, **F32)
    for backend in ("torch", "jax"):
        y = _backend_forward(backend, cfg, weights, x)
        np.testing.assert_allclose(y, ref, **F32, err_msg=backend)
        np.testing.assert_allclose(y, y_hf, **F32, err_msg=backend)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_keeps_router_float32_in_bf16(checkpoint, family):
    block = hf_block(checkpoint(family)[0], LAYER, dtype="bfloat16")
    router = getattr(block, get_family(CASES[family][0]).router_name)
    if CASES[family][0] in ("qwen2_moe", "qwen3_next"):  # the router is rounded to the model dtype
        assert router.weight.dtype == torch.bfloat16 and block.shared_expert_gate.weight.dtype == torch.bfloat16
        return
    if CASES[family][0] in ("granitemoe", "llama4_text", "minimax_m2"):  # no _keep_in_fp32_modules: router rounded, logits cast to float32
        assert router.weight.dtype == torch.bfloat16 and block.experts.gate_up_proj.dtype == torch.bfloat16
        return
    assert router.weight.dtype == torch.float32
    if CASES[family][1]["use_expert_bias"]:
        assert _bias(block, CASES[family][0]).dtype == torch.float32
    assert block.experts.gate_up_proj.dtype == torch.bfloat16


def test_granitemoe_topk_then_softmax_is_softmax_topk_renormalise_up_to_rounding():
    """Granite-MoE's router (top-k of the logits, softmax over the k) vs ``moe_torch``'s
    ``score_func="softmax", route_norm=True`` (softmax, top-k, renormalise) on 20000 tokens of 40
    experts, top-8, at three logit scales: the same experts, weights within 4 float32 ULP (measured: at
    most 3.0 ULP relative), and not bit-equal (the two orders round differently)."""
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter

    import moe_torch

    hf_router = GraniteMoeTopKRouter(transformers.GraniteMoeConfig(hidden_size=D, num_local_experts=40,
                                                                   num_experts_per_tok=8))
    ours = moe_torch.TokenChoiceTopKRouter(D, 40, top_k=8, score_func="softmax", route_norm=True)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for scale in (1.0, 4.0, 16.0):
        with torch.no_grad():
            weight = scale * torch.randn(40, D, generator=gen) / D**0.5
            hf_router.weight.copy_(weight)
            ours.gate.weight.copy_(weight)
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


@pytest.mark.parametrize("top_k", [1, 4])
def test_llama4_topk_then_sigmoid_is_sigmoid_then_topk_bit_for_bit(top_k):
    """Llama 4's router (top-k of the logits, sigmoid of the chosen) vs ``moe_torch``'s
    ``score_func="sigmoid", route_norm=False`` (sigmoid, top-k) on 20000 tokens of 16 experts, float32:
    sigmoid is monotone, so the experts are the same and the weights ``sigmoid(logit)`` bit-equal."""
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    import moe_torch

    hf_router = Llama4Router(transformers.Llama4TextConfig(hidden_size=D, num_local_experts=16,
                                                           num_experts_per_tok=top_k))
    ours = moe_torch.TokenChoiceTopKRouter(D, 16, top_k=top_k, score_func="sigmoid", route_norm=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = torch.randn(16, D, generator=gen) / D**0.5
        hf_router.weight.copy_(weight)
        ours.gate.weight.copy_(weight)
        x = torch.randn(20000, D, generator=gen)
        hf_w, hf_idx = _hf_routing(hf_router, x, top_k)
        r = ours.route(x)
    order = hf_idx.argsort(-1)
    np.testing.assert_array_equal(hf_idx.gather(-1, order).numpy(), r.selected_experts.sort(-1).values.numpy())
    np.testing.assert_array_equal(hf_w.gather(-1, order).numpy(),
                                  r.routing_weights.gather(-1, r.selected_experts.argsort(-1)).numpy())
    assert (hf_router(x)[0] > 0).sum(-1).eq(top_k).all()  # the unchosen experts' scores are sigmoid(-inf) = 0


# each family's preset, with the routing of its released config.json (top_k, route_scale, shared experts,
# groups kept); the layers above are tiny and route differently
PUBLISHED = {"glm-4.5": (8, 2.5, 1, None), "dots-llm1": (6, 2.5, 2, None), "kimi-k2": (8, 2.827, 1, None),
             "deepseek-v2": (6, 16.0, 2, 3), "deepseek-v2-lite": (6, 1.0, 2, 3), "qwen2-moe": (4, 1.0, 1, None),
             "qwen3-next": (10, 1.0, 1, None), "granite-moe": (8, 1.0, 0, None),
             "llama4-scout": (1, 1.0, 1, None), "minimax-m2": (8, 1.0, 0, None),
             "ernie-4.5-moe": (6, 1.0, 2, None)}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_preset_has_its_routing(checkpoint, family):
    cfg, _ = read_hf_layer(checkpoint(family)[0], LAYER)
    name = CASES[family][2]
    preset = PRESETS[name].config
    fields = ("score_func", "use_expert_bias", "route_norm", "score_before_experts")
    assert {f: getattr(preset, f) for f in fields} == {f: getattr(cfg, f) for f in fields}
    got = (preset.top_k, preset.route_scale, preset.num_shared_experts, preset.num_limited_groups)
    assert got == PUBLISHED[name]


def test_family_defaults_when_config_json_omits_keys():
    """Each family's own transformers defaults fill keys config.json leaves out."""
    base = dict(hidden_size=D, num_experts_per_tok=2, moe_intermediate_size=H, n_routed_experts=E,
                num_hidden_layers=3)
    glm = moe_config_from_hf(dict(base, model_type="glm4_moe"))
    assert (glm.route_norm, glm.route_scale, glm.num_expert_groups, glm.num_shared_experts) == (True, 1.0, None, 1)
    assert [is_moe_layer(dict(base, model_type="glm4_moe"), i) for i in range(3)] == [False, True, True]
    dots = moe_config_from_hf(dict(base, model_type="dots1"))
    assert (dots.route_norm, dots.route_scale, dots.num_shared_experts) == (False, 1.0, 0)
    assert [is_moe_layer(dict(base, model_type="dots1"), i) for i in range(3)] == [True, True, True]
    kimi = moe_config_from_hf(dict(base, model_type="kimi_k2", n_group=1))  # DeepSeek-V3's other defaults
    assert (kimi.route_norm, kimi.route_scale, kimi.num_shared_experts) == (True, 2.5, 1)
    assert [is_moe_layer(dict(base, model_type="kimi_k2"), i) for i in range(4)] == [False, False, False, True]
    with pytest.raises(HFImportError, match="scoring_func='softmax'"):
        moe_config_from_hf(dict(base, model_type="glm4_moe", scoring_func="softmax"))
    v2 = moe_config_from_hf(dict(base, model_type="deepseek_v2", norm_topk_prob=True))  # greedy by default
    assert (v2.score_func, v2.route_norm, v2.num_expert_groups, v2.num_shared_experts) == ("softmax", False, None, 2)
    assert [is_moe_layer(dict(base, model_type="deepseek_v2"), i) for i in range(3)] == [True, True, True]
    with pytest.raises(HFImportError, match=r"topk_method='noaux_tc'.*\('greedy', 'group_limited_greedy'\)"):
        moe_config_from_hf(dict(base, model_type="deepseek_v2", topk_method="noaux_tc"))


# ---------------------------------------------------------------------------------------------
# the registry


def test_supported_model_types_lists_every_family():
    assert SUPPORTED_MODEL_TYPES[:4] == ("mixtral", "qwen3_moe", "deepseek_v3", "olmoe")
    assert {model_type for model_type, _, _ in CASES.values()} <= set(SUPPORTED_MODEL_TYPES)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert get_family(model_type).model_type == model_type


@pytest.mark.parametrize("model_type", ["llama", None, "Mixtral"])
def test_unsupported_model_type_names_the_supported_ones(model_type):
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    with pytest.raises(HFImportError, match=rf"model_type={model_type!r} is not supported.*{supported}"):
        get_family(model_type)
    with pytest.raises(HFImportError, match=r"is not supported; supported model types: mixtral"):
        moe_config_from_hf({"model_type": model_type, "hidden_size": D, "num_experts_per_tok": 2})
    with pytest.raises(HFImportError, match=r"is not supported"):
        is_moe_layer({"model_type": model_type}, 0)


def test_register_refuses_a_second_family_of_one_model_type():
    family = get_family("mixtral")
    with pytest.raises(ValueError, match="model_type='mixtral' is already registered"):
        register(Family("mixtral", block=family.block, moe_config=family.moe_config,
                        is_moe_layer=family.is_moe_layer))


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_import_hf_and_run_hf_with_the_hf_column(checkpoint, family, capsys, tmp_path):
    from parity.cli import main
    from parity.hf import load_imported

    path, _ = checkpoint(family)
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
    assert report["settings"]["preset"].endswith(f"#layer{LAYER}")
    assert {b["name"]: b["status"] for b in report["backends"]}["hf:cpu"] == "ran"
    hf_checks = {c["id"]: c["status"] for c in report["checks"] if "hf:cpu" in c["id"]}
    assert "forward/out/torch:cpu~hf:cpu" in hf_checks and set(hf_checks.values()) == {"PASS"}
