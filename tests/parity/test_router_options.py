"""Router options of issue 15 (DESIGN.md steps 1, 5 and 6): Gemma 4's RMS-normalised router input
(``router_input_norm``, ``router.scale``), its per-expert weight scale (``per_expert_scale``), its
expert-input norm (``expert_input_norm``), the epsilon of both norms (``input_norm_eps``) and DBRX's
p-norm renormalisation (``route_norm_p``): the same in the float64 reference, moe_torch and moe_jax."""

from __future__ import annotations

import numpy as np
import pytest

from parity import reference
from parity.config import MoEConfig, StateDictError
from parity.weights import WeightsError, canonical_shapes, check_weights, init_weights
from tests.cases import TOLERANCES

F32 = TOLERANCES["float32"]
GEMMA = MoEConfig(dim=16, hidden_dim=8, num_experts=6, top_k=3, score_func="softmax", route_norm=True,
                  route_norm_eps=0.0, router_input_norm=True, per_expert_scale=True, expert_input_norm=True,
                  score_before_experts=False)
DBRX = MoEConfig(dim=16, hidden_dim=8, num_experts=6, top_k=3, score_func="softmax", route_norm=True,
                 route_norm_eps=0.0, route_norm_p=2.0, score_before_experts=False)
GEMMA_TENSORS = {"router.scale": (16,), "router.per_expert_scale": (6,), "expert_input_norm.weight": (16,)}


def _x(seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((2, 5, 16))).astype(np.float32)


def test_options_are_validated_and_default_off():
    cfg = MoEConfig()
    assert (cfg.router_input_norm, cfg.per_expert_scale, cfg.expert_input_norm, cfg.route_norm_p,
            cfg.input_norm_eps) == (False, False, False, None, 1e-6)
    with pytest.raises(ValueError, match=r"route_norm_p=2.0 needs route_norm=True"):
        MoEConfig(route_norm_p=2.0)
    for bad in (0, -1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ValueError, match=r"route_norm_p=.* must be None or a finite number > 0"):
            MoEConfig(route_norm=True, route_norm_p=bad)
    with pytest.raises(ValueError, match=r"input_norm_eps=-1e-06 must be a finite number >= 0"):
        MoEConfig(input_norm_eps=-1e-6)
    for name in ("router_input_norm", "per_expert_scale", "expert_input_norm"):
        with pytest.raises(ValueError, match=rf"{name}=1 must be True or False"):
            MoEConfig(**{name: 1})
    assert MoEConfig.from_dict(GEMMA.to_dict()) == GEMMA
    assert MoEConfig(route_norm=True, route_norm_p=np.float32(2.0)).route_norm_p == 2.0


def test_canonical_tensors_and_a_file_of_one_layout_is_refused_by_the_other():
    shapes = canonical_shapes(GEMMA)
    assert {k: shapes[k] for k in GEMMA_TENSORS} == GEMMA_TENSORS
    plain = GEMMA.replace(router_input_norm=False, per_expert_scale=False, expert_input_norm=False)
    assert not set(GEMMA_TENSORS) & set(canonical_shapes(plain))
    w = init_weights(GEMMA, 0)
    assert all(0.2 < np.abs(w[k]).mean() < 2 for k in GEMMA_TENSORS)  # scales start around 1
    with pytest.raises(WeightsError) as err:
        check_weights(w, plain)
    for k, shape in GEMMA_TENSORS.items():
        assert f"unexpected {k!r} (shape {list(shape)})" in str(err.value)
    with pytest.raises(WeightsError, match=r"missing 'router.per_expert_scale' \(expected shape \[6\]\)"):
        check_weights(init_weights(plain, 0), GEMMA)


def test_reference_formulas():
    """Gemma 4 (transformers' Gemma4TextRouter / Gemma4RMSNorm written out) and DBRX's p-norm."""
    w, x = init_weights(GEMMA, 0), _x()
    tokens = x.reshape(-1, 16).astype(np.float64)
    n = tokens / np.sqrt((tokens**2).mean(-1, keepdims=True) + 1e-6)
    logits = (n * w["router.scale"] * 16**-0.5) @ w["router.gate.weight"].astype(np.float64).T
    aux = reference.route(tokens, w["router.gate.weight"], GEMMA, router_scale=w["router.scale"],
                          per_expert_scale=w["router.per_expert_scale"])
    np.testing.assert_allclose(aux["router_logits"], logits, rtol=1e-12, atol=1e-12)
    top = np.take_along_axis(aux["scores"], aux["selected_experts"], -1)
    np.testing.assert_allclose(aux["routing_weights"],
                               top / top.sum(-1, keepdims=True) * w["router.per_expert_scale"][aux["selected_experts"]],
                               rtol=1e-12)
    np.testing.assert_allclose(reference.expert_tokens(tokens, w, GEMMA), n * w["expert_input_norm.weight"],
                               rtol=1e-12)
    wd = init_weights(DBRX, 0)
    a = reference.route(tokens, wd["router.gate.weight"], DBRX)
    top = np.take_along_axis(a["scores"], a["selected_experts"], -1)
    np.testing.assert_allclose(a["routing_weights"], top / np.sqrt((top**2).sum(-1, keepdims=True)), rtol=1e-12)
    one = reference.route(tokens, wd["router.gate.weight"], DBRX.replace(route_norm_p=1.0))
    summed = reference.route(tokens, wd["router.gate.weight"], DBRX.replace(route_norm_p=None))
    np.testing.assert_allclose(one["routing_weights"], summed["routing_weights"], rtol=1e-15)


@pytest.mark.parametrize("option", ["router_input_norm", "per_expert_scale", "expert_input_norm", "route_norm_p"])
def test_each_option_changes_the_layer(option):
    base = DBRX if option == "route_norm_p" else GEMMA
    off = base.replace(**{option: None if option == "route_norm_p" else False})
    w = init_weights(base, 0)
    w_off = {k: v for k, v in w.items() if k in canonical_shapes(off)}
    on, _ = reference.moe_forward(w, _x(), base)
    without, _ = reference.moe_forward(w_off, _x(), off)
    assert not np.allclose(on, without, **F32)


def _torch_forward(cfg, w, x, dtype="float32"):
    torch = pytest.importorskip("torch")
    import moe_torch

    moe = moe_torch.MoE(**cfg.to_kwargs()).to(getattr(torch, dtype))
    assert moe.config == cfg
    moe.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    xt = torch.from_numpy(x.astype(dtype)).requires_grad_(True)
    out, aux = moe(xt, return_aux=True)
    (out * torch.from_numpy(np.cos(np.arange(out.numel())).reshape(out.shape).astype(dtype))).sum().backward()
    grads = {n: p.grad.numpy() for n, p in moe.named_parameters()}
    grads["x"] = xt.grad.numpy()
    return out.detach().numpy(), aux, grads, moe


def _jax_forward(cfg, w, x):
    """float32 forward of moe_jax."""
    pytest.importorskip("jax")
    from flax import nnx

    import moe_jax

    moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    assert moe.config == cfg
    moe_jax.load_state_dict(moe, w)
    moe.eval()
    return np.asarray(moe(x)), moe


def _jax_grads_float64(cfg, w, x):
    """float64 gradients of ``sum(out * cos(i))`` by canonical name, and of x."""
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import moe_jax

    with jax.enable_x64(True):
        moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        moe_jax.load_state_dict(moe, w)
        moe.eval()
        weight = jnp.asarray(np.cos(np.arange(x.size)).reshape(x.shape))

        def loss(m, xx):
            return (m(xx) * weight).sum()

        gm, gx = nnx.grad(loss, argnums=(0, 1))(moe, jnp.asarray(x, jnp.float64))
        grads = moe_jax.state_dict(gm)
        grads["x"] = np.asarray(gx)
    return grads


@pytest.mark.slow  # eager JAX float64 gradients: ~15 s on a loaded 2-core machine
@pytest.mark.parametrize("cfg", [GEMMA, DBRX], ids=["gemma4", "dbrx"])
def test_torch_and_jax_match_the_reference_and_each_other(cfg):
    """float32 forward against the reference; float64 gradients of every parameter (the new scales
    included) and of x, torch against JAX; the canonical names round-trip."""
    w, x = init_weights(cfg, 0), _x()
    ref, ref_aux = reference.moe_forward(w, x, cfg)
    y_t, aux_t, _, moe_t = _torch_forward(cfg, w, x)
    np.testing.assert_allclose(y_t, ref, **F32)
    np.testing.assert_allclose(aux_t["routing_weights"].detach().numpy(), ref_aux["routing_weights"], **F32)
    np.testing.assert_array_equal(aux_t["selected_experts"].numpy(), ref_aux["selected_experts"])
    assert sorted(moe_t.state_dict()) == sorted(w)
    y_j, moe_j = _jax_forward(cfg, w, x)
    np.testing.assert_allclose(y_j, ref, **F32)
    assert sorted(__import__("moe_jax").state_dict(moe_j)) == sorted(w)
    _, _, g_t, _ = _torch_forward(cfg, w, x, "float64")
    g_j = _jax_grads_float64(cfg, w, x)
    grad_names = [k for k in w if k not in ("expert_bias", "tokens_per_expert")] + ["x"]
    for name in grad_names:
        np.testing.assert_allclose(g_t[name], g_j[name], rtol=1e-9, atol=1e-12, err_msg=name)
        if name in GEMMA_TENSORS:
            assert np.abs(g_t[name]).max() > 0, name


def test_torch_refuses_a_file_without_the_scales_and_keeps_them_fixed():
    torch = pytest.importorskip("torch")
    import moe_torch

    moe = moe_torch.MoE(**GEMMA.to_kwargs())
    w = init_weights(GEMMA, 0)
    with pytest.raises(StateDictError, match=r"missing 'router.scale' \(expected shape \[16\]\)"):
        moe.load_state_dict({k: torch.from_numpy(v) for k, v in w.items() if k != "router.scale"})
    moe.route_norm_p = None  # a live option (validated); the parameters' presence is fixed
    with pytest.raises(ValueError, match=r"route_norm_p=3 needs route_norm=True"):
        moe.router.configure(route_norm=False, route_norm_p=3)
    assert moe.router.router_input_norm and moe.expert_input_norm is not None


def test_bf16_router_runs_in_float32():
    """DESIGN.md step 1: the router's RMSNorm, scales and logits run in float32 for a bfloat16 layer
    (transformers' Gemma4TextRouter rounds them to the model dtype; README, "Hugging Face checkpoints")."""
    torch = pytest.importorskip("torch")
    import moe_torch

    w, x = init_weights(GEMMA, 0), _x()
    moe = moe_torch.MoE(**GEMMA.to_kwargs()).to(torch.bfloat16)
    moe.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    with torch.no_grad():
        out, aux = moe(torch.from_numpy(x).to(torch.bfloat16), return_aux=True)
    assert out.dtype == torch.bfloat16 and aux["router_logits"].dtype == torch.float32
    bf = {k: torch.from_numpy(v).to(torch.bfloat16).double().numpy() for k, v in w.items()}
    xb = torch.from_numpy(x).to(torch.bfloat16).double().numpy()
    ref = reference.route(xb.reshape(-1, 16), bf["router.gate.weight"], GEMMA, router_scale=bf["router.scale"],
                          per_expert_scale=bf["router.per_expert_scale"])
    np.testing.assert_allclose(aux["router_logits"].numpy(), ref["router_logits"], rtol=1e-5, atol=1e-6)
