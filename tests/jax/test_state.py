"""jit, train/eval count accumulation, update_expert_bias bit-identity, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_jax
from parity import reference
from parity.config import JAX_KERNELS
from tests.cases import CASES, make_case
from tests.jax.helpers import build

CFG = CASES["expert_bias"]


def test_jit_matches_eager_and_counts_only_in_training():
    weights, x = make_case(CFG)
    x = jnp.asarray(x)
    moe = build(CFG, weights)
    eager, aux = moe(x, return_aux=True)
    counts = np.asarray(aux["tokens_per_expert"])
    assert counts.sum() == x.shape[0] * x.shape[1] * CFG.top_k
    np.testing.assert_array_equal(moe.tokens_per_expert[...], counts)
    step = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(step(moe, x), eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(moe.tokens_per_expert[...], 2 * counts)
    moe.eval()
    assert moe.deterministic
    step(moe, x)
    moe(x)
    np.testing.assert_array_equal(moe.tokens_per_expert[...], 2 * counts)
    moe.train()
    step(moe, x)
    np.testing.assert_array_equal(moe.tokens_per_expert[...], 3 * counts)


def test_train_step_under_jit_updates_bias_like_the_reference():
    weights, x = make_case(CFG)
    moe = build(CFG, weights)

    @nnx.jit
    def train_step(m, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
        moe_jax.update_expert_bias(m, 1e-3)
        return grads

    bias = weights["expert_bias"]
    for _ in range(3):
        counts = reference.moe_forward(dict(weights, expert_bias=bias), x, CFG)[1]["tokens_per_expert"]
        grads = train_step(moe, jnp.asarray(x))
        bias = reference.update_expert_bias(bias, counts, 1e-3)
        assert moe.expert_bias[...].tobytes() == bias.tobytes()
        np.testing.assert_array_equal(moe.tokens_per_expert[...], 0)
    assert "expert_bias" not in moe_jax.state_dict(grads)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("num_experts", [3, 8, 13, 64, 200, 256])
def test_update_expert_bias_bit_identical(num_experts, center):
    rng = np.random.default_rng(num_experts)
    moe = moe_jax.MoE(dim=8, hidden_dim=8, num_experts=num_experts, use_expert_bias=True,
                      rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    update = nnx.jit(moe_jax.update_expert_bias, static_argnames=("center",))
    for counts in (rng.integers(0, 1000, num_experts).astype(np.float32),
                   (rng.random(num_experts) * 1e4).astype(np.float32)):  # not integers: order matters
        for fn in (moe_jax.update_expert_bias, update):
            bias = (rng.standard_normal(num_experts) * 0.01).astype(np.float32)
            moe.expert_bias[...] = jnp.asarray(bias)
            moe.tokens_per_expert[...] = jnp.asarray(counts)
            fn(moe, 0.001, center=center)
            want = reference.update_expert_bias(bias, counts, 0.001, center=center)
            assert moe.expert_bias.dtype == jnp.float32
            assert np.asarray(moe.expert_bias[...]).tobytes() == want.tobytes()
            np.testing.assert_array_equal(moe.tokens_per_expert[...], 0)


def test_bad_input_errors():
    weights, x = make_case(CFG)
    moe = build(CFG, weights)
    with pytest.raises(ValueError, match=r"x has shape \(2, 5, 7\); expected \[batch, seq_len, dim=16\]"):
        moe(jnp.zeros((2, 5, 7)))
    with pytest.raises(ValueError, match=r"x has shape \(16, 16\)"):
        moe(jnp.zeros((16, 16)))
    with pytest.raises(TypeError, match="bfloat16.*float32"):
        moe(jnp.asarray(x, jnp.bfloat16))
    with pytest.raises(ValueError, match=r"selected_experts has shape \(16, 1\)"):
        moe(jnp.asarray(x), selected_experts=jnp.zeros((16, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"values in \[8, 8\]; expected expert indices in \[0, num_experts=8\)"):
        moe(jnp.asarray(x), selected_experts=jnp.full((16, 2), 8, jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        moe(jnp.asarray(x), selected_experts=jnp.zeros((16, 2), jnp.float32))


@pytest.mark.parametrize("overrides,message", [
    (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
    (dict(score_func="relu"), "score_func='relu' is not one of"),
    (dict(num_expert_groups=3, num_limited_groups=1), "num_expert_groups=3 does not divide"),
    (dict(expert_kernel="grouped_mm"), "expert_kernel='grouped_mm' is not a JAX kernel; allowed: "
     + str(JAX_KERNELS).replace("(", r"\(").replace(")", r"\)")),
    (dict(dim=0), "dim=0 must be a positive integer"),
])
def test_bad_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        moe_jax.MoE(**CFG.to_kwargs(**overrides), rngs=nnx.Rngs(0))


def test_auto_kernel_resolution():
    from moe_jax.kernels import resolve_kernel

    assert resolve_kernel("auto", "cpu") == "blocked"
    assert resolve_kernel("auto", "gpu") == "ragged_dot"
    assert resolve_kernel("auto", "gpu", jnp.float64) == "blocked"
    assert resolve_kernel("dense", "gpu") == "dense"
    assert jax.default_backend() != "cpu" or build(CFG, make_case(CFG)[0]).experts.kernel_name() == "blocked"
