"""Degenerate and malformed inputs get one answer in the reference, moe_torch and moe_jax (issue 12).

DESIGN.md, "Degenerate inputs": zero tokens give an empty output of x's shape and dtype, empty aux
tensors, ``tokens_per_expert`` all zero and every enabled loss exactly 0 with a zero gradient; a NaN
token is routed to experts 0..k-1 (the tie rule) and counted; option values may be NumPy scalars.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from parity import reference
from parity.config import MoEConfig
from parity.weights import init_weights

LOSSES = dict(router_z_loss_coeff=0.01, num_shared_experts=1)
SHAPES = [(0, 5, 16), (3, 0, 16), (0, 0, 16)]


def _cfg(kind):
    return MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2, load_balance_loss=kind, **LOSSES)


def _torch_run(cfg, weights, x, kernel, monkeypatch):
    import torch

    from moe_torch import MoE
    from tests.torch.fake_npu import make_fake_torch_npu

    if kernel == "npu":
        monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())
    moe = MoE(**cfg.to_kwargs(expert_kernel=kernel))
    moe.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    xt = torch.from_numpy(x.copy()).requires_grad_()
    out, aux = moe(xt, return_aux=True)
    (out.sum() + aux["load_balance_loss"] + aux["router_z_loss"]).backward()
    grads = {n: p.grad.numpy() for n, p in moe.named_parameters()}
    aux = {k: v.detach().numpy() for k, v in aux.items()}
    return out.detach().numpy(), aux, grads, moe.tokens_per_expert.numpy()


def _jax_run(cfg, weights, x, kernel):
    import jax.numpy as jnp
    from flax import nnx

    import moe_jax

    moe = moe_jax.MoE(**cfg.to_kwargs(expert_kernel=kernel), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(moe, weights)

    @nnx.jit
    def step(m, xx):
        def objective(m):
            out, aux = m(xx, return_aux=True)
            return out.sum() + aux["load_balance_loss"] + aux["router_z_loss"], (out, aux)

        return nnx.grad(objective, has_aux=True)(m)

    grads, (out, aux) = step(moe, jnp.asarray(x))
    return (np.asarray(out), {k: np.asarray(v) for k, v in aux.items()}, moe_jax.state_dict(grads),
            np.asarray(moe.tokens_per_expert[...]))


@pytest.mark.parametrize("kind", ["switch", "sequence"])
@pytest.mark.parametrize("shape", SHAPES, ids=["B0", "S0", "B0S0"])
def test_zero_tokens_one_answer(kind, shape, monkeypatch):
    cfg = _cfg(kind)
    weights = init_weights(cfg, 0)
    x = np.zeros(shape, np.float32)
    n, e, k = shape[0] * shape[1], cfg.num_experts, cfg.top_k
    out, aux = reference.moe_forward(weights, x, cfg)
    runs = {"reference": (out, aux, None, None)}
    for kernel in ("loop", "grouped_mm", "npu"):
        runs[f"torch/{kernel}"] = _torch_run(cfg, weights, x, kernel, monkeypatch)
    for kernel in ("blocked", "dense", "ragged_dot"):
        runs[f"jax/{kernel}"] = _jax_run(cfg, weights, x, kernel)
    for name, (out, aux, grads, buffer) in runs.items():
        assert out.shape == shape, name
        if name != "reference":
            assert out.dtype == np.float32, name
        assert aux["router_logits"].shape == (n, e) and aux["scores"].shape == (n, e), name
        assert aux["selected_experts"].shape == (n, k) and aux["routing_weights"].shape == (n, k), name
        np.testing.assert_array_equal(aux["tokens_per_expert"], np.zeros(e), err_msg=name)
        for loss in ("load_balance_loss", "router_z_loss"):
            assert float(aux[loss]) == 0.0, f"{name}: {loss}={aux[loss]}"
        if grads is not None:
            for p, g in grads.items():
                assert np.array_equal(g, np.zeros_like(g)), f"{name}: gradient of {p} is not 0"
            np.testing.assert_array_equal(buffer, np.zeros(e), err_msg=name)


def test_nan_token_routes_to_first_experts_everywhere():
    """A NaN token: NaN scores, experts 0..k-1 (ties to the lower index), counted; its output NaN,
    the other tokens' output unchanged. The same in the reference and both backends."""
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import moe_jax
    from moe_torch import MoE

    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2)
    weights = init_weights(cfg, 0)
    x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    x_nan = x.copy()
    x_nan[0, 1, 3] = np.nan
    _, aux_clean = reference.moe_forward(weights, x, cfg)
    results = {}
    ref_out, ref_aux = reference.moe_forward(weights, x_nan, cfg)
    results["reference"] = ref_out, ref_aux["selected_experts"], ref_aux["tokens_per_expert"]
    tm = MoE(**cfg.to_kwargs())
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    out, aux = tm(torch.from_numpy(x_nan), return_aux=True)
    results["torch"] = out.detach().numpy(), aux["selected_experts"].numpy(), aux["tokens_per_expert"].numpy()
    jm = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(jm, weights)
    out, aux = jm(jnp.asarray(x_nan), return_aux=True)
    results["jax"] = np.asarray(out), np.asarray(aux["selected_experts"]), np.asarray(aux["tokens_per_expert"])
    ref_clean, _ = reference.moe_forward(weights, x, cfg)
    expected_sel = aux_clean["selected_experts"].copy()
    expected_sel[1] = [0, 1]
    expected_counts = np.bincount(expected_sel.reshape(-1), minlength=4)
    for name, (out, sel, counts) in results.items():
        np.testing.assert_array_equal(sel, expected_sel, err_msg=name)
        np.testing.assert_array_equal(counts, expected_counts, err_msg=name)
        assert np.isnan(out[0, 1]).all(), name
        np.testing.assert_allclose(out[0, [0, 2, 3]], ref_clean[0, [0, 2, 3]], rtol=1e-5, atol=1e-6, err_msg=name)
    # the other tokens' dx stays finite (the NaN reaches only its own row, experts 0..k-1 and the gate)
    xt = torch.from_numpy(x_nan).requires_grad_()
    tm(xt).sum().backward()
    assert np.isfinite(xt.grad.numpy()[0, [0, 2, 3]]).all() and np.isnan(xt.grad.numpy()[0, 1]).all()
    gx = nnx.grad(lambda m, xx: m(xx).sum(), argnums=1)(jm, jnp.asarray(x_nan))
    assert np.isfinite(np.asarray(gx)[0, [0, 2, 3]]).all() and np.isnan(np.asarray(gx)[0, 1]).all()


def test_numpy_scalar_options_are_valid_and_normalised():
    import json

    cfg = MoEConfig(dim=np.int64(16), hidden_dim=24, num_experts=np.int64(4), top_k=np.int32(2),
                    route_scale=np.float32(2.5), load_balance_coeff=np.float64(0.01))
    assert type(cfg.num_experts) is int and type(cfg.top_k) is int and type(cfg.dim) is int
    assert type(cfg.route_scale) is float and cfg.route_scale == 2.5
    assert type(cfg.load_balance_coeff) is float
    json.dumps(cfg.to_dict())
    hash(cfg)
    assert cfg == MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2, route_scale=2.5, load_balance_coeff=0.01)
    for bad in (dict(num_experts=True), dict(num_experts=np.bool_(True)), dict(route_scale=np.float32("nan")),
                dict(num_experts=4.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MoEConfig(**bad)


def _load_errors(mapping):
    """The exceptions of moe_torch's and moe_jax's load_state_dict for ``mapping`` (NumPy arrays)."""
    import torch
    from flax import nnx

    import moe_jax
    from moe_torch import MoE

    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2)
    errors = []
    tm = MoE(**cfg.to_kwargs())
    with pytest.raises(Exception) as info:
        tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in mapping.items()})
    errors.append(info.value)
    jm = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    with pytest.raises(Exception) as info:
        moe_jax.load_state_dict(jm, mapping)
    errors.append(info.value)
    return errors


def test_load_state_dict_errors_are_the_same_in_both_backends():
    from parity.config import StateDictError

    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2)
    weights = init_weights(cfg, 0)
    bad = dict(weights)
    del bad["experts.w3"]  # missing
    bad["experts.w4"] = np.zeros((4, 2), np.float32)  # unexpected
    bad["experts.w1"] = np.zeros((4, 16, 24), np.float32)  # transposed
    bad["expert_bias"] = np.zeros(4, np.int32)  # integer
    torch_error, jax_error = _load_errors(bad)
    for error in (torch_error, jax_error):
        assert type(error) is StateDictError and isinstance(error, ValueError)
        text = str(error)
        assert "missing 'experts.w3' (expected shape [4, 24, 16])" in text
        assert "unexpected 'experts.w4' (shape [4, 2])" in text
        assert "'experts.w1' has shape [4, 16, 24], expected [4, 24, 16]" in text
        assert "'expert_bias' has dtype int32, expected a floating-point array" in text
    assert str(torch_error) == str(jax_error)


def test_load_state_dict_float64_cast_and_overflow():
    import torch
    from flax import nnx

    import moe_jax
    from moe_torch import MoE

    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2)
    weights = {k: v.astype(np.float64) for k, v in init_weights(cfg, 0).items()}
    weights["experts.w2"][1, 2, 3] = 1.0 + 1e-12  # rounds to 1.0 in float32: allowed (documented)
    tm = MoE(**cfg.to_kwargs())
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    jm = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(jm, weights)
    assert tm.experts.w2.dtype == torch.float32
    np.testing.assert_array_equal(tm.experts.w2.detach().numpy(), moe_jax.state_dict(jm)["experts.w2"])
    weights["experts.w2"][1, 2, 3] = 1e300  # finite in float64, inf in float32: an error
    for error in _load_errors(weights):
        assert "'experts.w2': 1 finite value(s) overflow to infinity when cast from float64 to float32" in str(error)


def test_jax_input_type_and_selected_experts_range_under_jit():
    import jax.numpy as jnp
    from flax import nnx

    import moe_jax

    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2)
    moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="x must be a jax.Array or numpy.ndarray, got list"):
        moe([[[0.0] * 16]])
    x = jnp.zeros((1, 3, 16))
    bad = jnp.array([[0, 1], [2, 7], [3, 0]])
    with pytest.raises(ValueError, match=r"selected_experts holds values in \[0, 7\]"):
        moe(x, selected_experts=bad)

    @nnx.jit
    def run(m, xx, sel):
        return m(xx, selected_experts=sel)

    assert np.isfinite(np.asarray(run(moe, x, jnp.array([[0, 1], [2, 3], [3, 0]])))).all()
    with pytest.raises(Exception, match=r"selected_experts holds values in \[0, 7\]; expected expert indices in "
                                         r"\[0, num_experts=4\)"):
        np.asarray(run(moe, x, bad))
    with pytest.raises(Exception, match=r"selected_experts holds values in \[-1, 3\]"):
        np.asarray(run(moe, x, jnp.array([[0, 1], [2, 3], [-1, 0]])))
