"""Canonical weights: exact round trips (non-square sizes), one error listing every bad key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import moe_jax
from parity.weights import load_weights, save_weights
from tests.cases import CASES, make_case
from tests.jax.helpers import build

CFG = CASES["shared_expert"]  # D=16, H=24, Hs=32, E=8: every matrix non-square


def test_round_trip_is_exact_through_a_file(tmp_path):
    weights, _ = make_case(CFG)
    weights["expert_bias"] = np.linspace(-1, 1, CFG.num_experts, dtype=np.float32)
    weights["tokens_per_expert"] = np.arange(CFG.num_experts, dtype=np.float32)
    save_weights(tmp_path / "a.safetensors", weights)
    moe = build(CFG, load_weights(tmp_path / "a.safetensors", CFG))
    out = moe_jax.state_dict(moe)
    assert sorted(out) == sorted(weights)
    for key, value in weights.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        assert out[key].tobytes() == value.tobytes(), key
    save_weights(tmp_path / "b.safetensors", out)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_internal_layout_is_transposed():
    weights, _ = make_case(CFG)
    moe = build(CFG, weights)
    np.testing.assert_array_equal(moe.router.gate[...], weights["router.gate.weight"].T)
    np.testing.assert_array_equal(moe.experts.w2[...], weights["experts.w2"].transpose(0, 2, 1))
    np.testing.assert_array_equal(moe.shared_expert.w1[...], weights["shared_expert.w1.weight"].T)


def test_bfloat16_module_keeps_float32_buffers():
    weights, _ = make_case(CASES["expert_bias"])
    moe = build(CASES["expert_bias"], weights, param_dtype=jnp.bfloat16)
    out = moe_jax.state_dict(moe)
    assert out["experts.w1"].dtype == ml_dtypes.bfloat16
    assert out["expert_bias"].dtype == np.float32
    np.testing.assert_array_equal(out["expert_bias"], weights["expert_bias"])
    np.testing.assert_array_equal(out["experts.w1"], weights["experts.w1"].astype(ml_dtypes.bfloat16))


def test_float64_round_trip():
    weights, _ = make_case(CFG)
    with jax.enable_x64(True):
        w64 = {k: v.astype(np.float64) for k, v in weights.items()}
        out = moe_jax.state_dict(build(CFG, w64, param_dtype=jnp.float64))
        assert out["experts.w1"].dtype == np.float64
        assert out["experts.w1"].tobytes() == w64["experts.w1"].tobytes()


def test_every_bad_key_in_one_error_and_nothing_written():
    weights, _ = make_case(CFG)
    moe = build(CFG, weights)
    before = moe_jax.state_dict(moe)
    bad = dict(weights)
    del bad["router.gate.weight"]
    bad["experts.w1"] = weights["experts.w1"].transpose(0, 2, 1)  # JAX layout given by mistake
    bad["shared_expert.w2.weight"] = np.zeros((3, 4), np.float32)
    bad["experts.w4"] = np.zeros((2,), np.float32)
    with pytest.raises(moe_jax.StateDictError) as info:
        moe_jax.load_state_dict(moe, {k: v * 2 if k == "experts.w3" else v for k, v in bad.items()})
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "missing 'router.gate.weight' (expected shape [8, 16])" in msg
    assert "'experts.w1' has shape [8, 16, 24], expected [8, 24, 16]" in msg
    assert "'shared_expert.w2.weight' has shape [3, 4], expected [16, 32]" in msg
    assert "unexpected 'experts.w4' (shape [2])" in msg
    after = moe_jax.state_dict(moe)
    assert all(np.array_equal(before[k], after[k]) for k in before), "a failed load wrote weights"


def test_buffers_optional_only_when_not_strict():
    weights, _ = make_case(CFG)
    params = {k: v for k, v in weights.items() if k not in ("expert_bias", "tokens_per_expert")}
    moe = moe_jax.MoE(**CFG.to_kwargs(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="missing 'expert_bias'"):
        moe_jax.load_state_dict(moe, params)
    moe_jax.load_state_dict(moe, params, strict=False)
    np.testing.assert_array_equal(moe_jax.state_dict(moe)["experts.w2"], weights["experts.w2"])


def test_submodules_use_torch_names():
    ff = moe_jax.FeedForward(16, 24, rngs=nnx.Rngs(0))
    sd = moe_jax.state_dict(ff)
    assert {k: v.shape for k, v in sd.items()} == {
        "w1.weight": (24, 16), "w2.weight": (16, 24), "w3.weight": (24, 16)}
    experts = moe_jax.GroupedExperts(16, 24, 4, rngs=nnx.Rngs(0))
    assert moe_jax.state_dict(experts)["w2"].shape == (4, 16, 24)
    router = moe_jax.TokenChoiceTopKRouter(16, 4, 2, rngs=nnx.Rngs(0))
    assert moe_jax.state_dict(router)["gate.weight"].shape == (4, 16)
