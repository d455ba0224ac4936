"""Gradients (input and every parameter) against central finite differences, in float64, tiny sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_jax
from tests.cases import CASES, make_case
from tests.jax.helpers import build

EPS = 1e-6
# every case with the hand-written blocked backward; the autodiff kernels on one rich case each
SWEEP = [(name, "blocked") for name in sorted(CASES)] + [
    ("groups_top2_sum_bias", "dense"), ("sequence_loss_zloss", "ragged_dot")]


def objective(moe, x, ct):
    """A fixed scalar: <out, ct> plus the enabled auxiliary losses."""
    out, aux = moe(x, return_aux=True)
    loss = jnp.sum(out * ct)
    for key in ("load_balance_loss", "router_z_loss"):
        if key in aux:
            loss = loss + 100.0 * aux[key]  # scaled so the loss gradient is visible next to <out, ct>
    return loss, aux["selected_experts"]


@pytest.mark.parametrize("name,kernel", SWEEP)
def test_gradients_match_finite_differences(name, kernel):
    cfg = CASES[name]
    weights, x = make_case(cfg, batch=2, seq_len=4)
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        moe = build(cfg, weights, kernel=kernel, param_dtype=jnp.float64, train=False)
        x = jnp.asarray(x, jnp.float64)
        ct = jnp.asarray(rng.standard_normal(x.shape))
        grad_fn = nnx.jit(nnx.grad(objective, argnums=(0, 1), has_aux=True))
        (g_moe, g_x), idx0 = grad_fn(moe, x, ct)
        # gradients come back under their canonical names, in the canonical layout
        grads = moe_jax.state_dict(g_moe)
        params = moe_jax.state_dict(moe)
        assert sorted(grads) == sorted(set(params) - {"expert_bias", "tokens_per_expert"})
        assert all(grads[k].shape == params[k].shape for k in grads)

        f_jit = nnx.jit(objective)

        def f(xv):
            loss, idx = f_jit(moe, xv, ct)
            np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx0))  # no routing flip
            return float(loss)

        # directional derivatives along random directions: the input, then each parameter
        v = jnp.asarray(rng.standard_normal(x.shape))
        fd = (f(x + EPS * v) - f(x - EPS * v)) / (2 * EPS)
        np.testing.assert_allclose(float(jnp.vdot(g_x, v)), fd, rtol=1e-6, atol=1e-7, err_msg="x")
        g_flat = dict(nnx.to_flat_state(g_moe))
        for path, var in nnx.to_flat_state(nnx.state(moe, nnx.Param)):
            p = var[...]
            v = jnp.asarray(rng.standard_normal(p.shape))
            var[...] = p + EPS * v
            f_plus = f(x)
            var[...] = p - EPS * v
            f_minus = f(x)
            var[...] = p
            g = g_flat[path][...]
            np.testing.assert_allclose(float(jnp.vdot(g, v)), (f_plus - f_minus) / (2 * EPS),
                                       rtol=1e-6, atol=1e-7, err_msg=str(path))
            assert float(jnp.abs(g).max()) > 0, f"{path}: zero gradient"


def test_kernels_agree_on_ragged_counts():
    """All kernels agree (forward and gradients), with empty experts and uneven counts."""
    import functools

    from moe_jax.kernels import KERNELS, blocked_kernel

    rng = np.random.default_rng(0)
    e, d, h = 5, 16, 24
    counts = jnp.asarray([7, 0, 13, 1, 19], jnp.int32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, h)) / 4, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, h, d)) / 4, jnp.float32)
    x = jnp.asarray(rng.standard_normal((40, d)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((40, d)), jnp.float32)
    results = {}
    # block=4 gives several blocks per expert and blocks that run into the next expert's rows
    funcs = dict(KERNELS, blocked4=functools.partial(blocked_kernel, block=4))
    for name, kernel in funcs.items():
        loss = lambda w1, w2, w3, x, kernel=kernel: jnp.sum(kernel(w1, w2, w3, x, counts) * ct)
        value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        results[name] = (jax.jit(kernel)(w1, w2, w3, x, counts), value_and_grad(w1, w2, w3, x)[1])
    for name, (y, grads) in results.items():
        np.testing.assert_allclose(y, results["dense"][0], rtol=1e-5, atol=1e-5, err_msg=name)
        for g, g_ref in zip(grads, results["dense"][1], strict=True):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_blocked_bfloat16_gradients_close_to_float32():
    """The hand-written backward in bfloat16 (weight gradients accumulated in float32) stays close."""
    from moe_jax.kernels import blocked_kernel, dense_kernel

    rng = np.random.default_rng(1)
    e, d, h = 3, 16, 24
    counts = jnp.asarray([20, 0, 28], jnp.int32)
    ws = [jnp.asarray(rng.standard_normal(s) / 4, jnp.float32) for s in [(e, d, h), (e, h, d), (e, d, h)]]
    x = jnp.asarray(rng.standard_normal((48, d)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((48, d)), jnp.float32)

    def grads(kernel, dtype):
        loss = lambda *a: jnp.sum(kernel(*a, counts).astype(jnp.float32) * ct)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*(a.astype(dtype) for a in (*ws, x)))

    for g, g_ref in zip(grads(blocked_kernel, jnp.bfloat16), grads(dense_kernel, jnp.float32), strict=True):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.abs(g_ref).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), g_ref, atol=0.03 * scale, rtol=0)
