"""moe_jax step 6a (capacity and token dropping): the hand-computed cases of tests/capacity_cases.py,
the kernels (the fixed-shape "static" one included) under ``jit`` against the float64 reference
(the kept set bit for bit), gradients, the locked drop decision, and a token dropped everywhere."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_jax
from moe_jax.capacity import drop_tokens
from moe_jax.kernels import static_kernel
from parity import reference as ref
from parity.config import MoEConfig
from parity.weights import init_weights
from tests.capacity_cases import EXPECTED_KEPT, IDX, X_DUPLICATES, W, cfg_for, group_case


@pytest.mark.parametrize("policy", sorted(EXPECTED_KEPT))
def test_keep_policy_hand_computed(policy):
    kept, w, _ = jax.jit(drop_tokens, static_argnums=(2, 3))(jnp.asarray(IDX), jnp.asarray(W, jnp.float32),
                                                            cfg_for(policy), 1)
    np.testing.assert_array_equal(np.asarray(kept), EXPECTED_KEPT[policy])
    np.testing.assert_array_equal(np.asarray(w), np.where(EXPECTED_KEPT[policy], W, 0).astype(np.float32))


def test_probs_tie_at_the_edge_and_groups():
    w = W.copy()
    w[3] = [0.5, 0.5]
    kept, _, _ = drop_tokens(jnp.asarray(IDX), jnp.asarray(w, jnp.float32), cfg_for("probs"), 1)
    np.testing.assert_array_equal(np.asarray(kept), [[True, False], [True, True], [True, True], [True, False]])
    idx, w, seq_kept, batch_kept = group_case()
    for group, expected in (("sequence", seq_kept), ("batch", batch_kept)):
        cfg = MoEConfig(num_experts=2, top_k=1, expert_capacity=1, capacity_group=group)
        kept, _, _ = drop_tokens(jnp.asarray(idx), jnp.asarray(w, jnp.float32), cfg, 2)
        np.testing.assert_array_equal(np.asarray(kept)[:, 0], expected)


def _layer(cfg, weights, dtype=jnp.float32):
    moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0), param_dtype=dtype)
    moe_jax.load_state_dict(moe, weights, strict=False)
    moe.eval()
    return moe


@nnx.jit
def _forward(moe, x):
    return moe(x, return_aux=True)


CASES = [dict(capacity_policy=p, capacity_group=g, capacity_pad=pad, capacity_renorm=not pad, score_before_experts=pad)
         for p, g, pad in itertools.product(("probs", "position", "slot_major"), ("sequence", "batch"), (False, True))]


@pytest.mark.parametrize("kernel, cases", [
    pytest.param("dense", CASES[::7], marks=pytest.mark.slow, id="dense-two"),  # eager, op by op
    pytest.param("dense", CASES[::3], marks=pytest.mark.slow, id="dense-each-policy"),
    pytest.param("dense", CASES, marks=pytest.mark.slow, id="dense-all"),
    pytest.param("blocked", CASES[1:2], marks=pytest.mark.slow),  # under jit: one compilation per case
    ("static", CASES[4:5]),
])
def test_kernels_match_the_reference(kernel, cases):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 16)).astype(np.float32).astype(np.float64)
    for i, options in enumerate(cases):
        cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=6, top_k=2, score_func="softmax", route_norm=True,
                        capacity_factor=0.75, num_shared_experts=1, load_balance_loss="switch",
                        expert_kernel=kernel, **options)
        weights = {k: v.astype(np.float32).astype(np.float64) for k, v in init_weights(cfg, seed=i).items()}
        out_ref, aux_ref = ref.moe_forward(weights, x, cfg)
        run = (lambda m, v: m(v, return_aux=True)) if kernel == "dense" else _forward
        out, aux = run(_layer(cfg, weights), jnp.asarray(x, jnp.float32))
        np.testing.assert_array_equal(np.asarray(aux["kept_slots"]), aux_ref["kept_slots"], err_msg=str(options))
        assert (~aux_ref["kept_slots"]).sum() > 0
        np.testing.assert_allclose(np.asarray(out), out_ref, rtol=1e-4, atol=1e-5, err_msg=str(options))
        np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), aux_ref["tokens_per_expert"])
        np.testing.assert_allclose(float(aux["load_balance_loss"]), aux_ref["load_balance_loss"], rtol=1e-5)


def test_static_kernel_buffers():
    """Sorted rows placed in [E, capacity] buffers: equal to dense on any split that fits, rows past an
    expert's capacity and past counts.sum() give zeros."""
    from moe_jax.kernels import dense_kernel

    rng = np.random.default_rng(3)
    w1, w3 = (jnp.asarray(rng.standard_normal((3, 8, 12)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((3, 12, 8)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((10, 8)), jnp.float32)
    counts = jnp.asarray([4, 0, 5], jnp.int32)  # row 9 is padding
    y = jax.jit(static_kernel, static_argnames="capacity")(w1, w2, w3, x, counts, capacity=5)
    np.testing.assert_allclose(y, dense_kernel(w1, w2, w3, x, counts), rtol=1e-5, atol=1e-5)
    assert (np.asarray(y[9]) == 0).all()
    y3 = static_kernel(w1, w2, w3, x, counts, capacity=3)  # expert 0 loses row 3, expert 2 rows 7, 8
    y, y3 = np.asarray(y), np.asarray(y3)
    assert (y3[[3, 7, 8, 9]] == 0).all()
    np.testing.assert_array_equal(y3[[0, 1, 2, 4, 5, 6]], y[[0, 1, 2, 4, 5, 6]])


@pytest.mark.slow
def test_dropped_everywhere_gets_only_the_shared_expert():
    for shared, kernel in ((1, "static"), (0, "dense")):
        cfg = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=1, num_shared_experts=shared,
                        expert_capacity=1, capacity_group="batch", expert_kernel=kernel)
        moe = _layer(cfg, init_weights(cfg, seed=3))
        x = jnp.asarray(X_DUPLICATES, jnp.float32)
        out, aux = moe(x, return_aux=True)
        tokens = x.reshape(-1, 8)
        expected = moe.shared_expert(tokens) if shared else jnp.zeros_like(tokens)
        np.testing.assert_array_equal(np.asarray(aux["kept_slots"])[:, 0], [True, False, False, False])
        np.testing.assert_array_equal(np.asarray(out.reshape(-1, 8)[1:]), np.asarray(expected[1:]))


@pytest.mark.parametrize("kernel", [pytest.param("blocked", marks=pytest.mark.slow),
                                    pytest.param("static", marks=pytest.mark.slow)])
def test_locked_drop_decision_and_gradients(kernel):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 16))
    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2, capacity_factor=0.5, score_func="softmax",
                    score_before_experts=False, load_balance_loss="switch", expert_kernel=kernel)
    weights = init_weights(cfg, seed=2)
    locked = np.zeros((16, 2), bool)
    locked[::3] = True
    out_ref, _ = ref.moe_forward(weights, x, cfg, kept_slots=locked)
    moe = _layer(cfg, weights)
    out, aux = moe(jnp.asarray(x, jnp.float32), return_aux=True, kept_slots=jnp.asarray(locked))
    np.testing.assert_array_equal(np.asarray(aux["kept_slots"]), locked)
    np.testing.assert_allclose(np.asarray(out), out_ref, rtol=1e-4, atol=1e-5)

    def loss(module, xt):
        o, a = module(xt, return_aux=True)
        return (o * o).sum() + a["load_balance_loss"]

    g_params, g_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(moe, jnp.asarray(x, jnp.float32))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(g_params)) and bool(jnp.isfinite(g_x).all())
    assert float(jnp.abs(g_params["router"]["gate"][...]).max()) > 0
