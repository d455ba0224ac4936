"""DESIGN.md step 1's ``router_bias`` and step 7's expert options (``expert_proj_bias``,
``expert_activation`` with ``swiglu_alpha`` / ``swiglu_limit``): the float64 reference, every
``moe_torch`` kernel (loop, grouped_mm, npu through its CPU stand-in) and every ``moe_jax`` kernel
(ragged_dot, blocked, dense, static) agree in float32, forward and gradients; invalid values are
refused; a weights file is refused, key by key, by a layer of the other option set.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from parity import reference
from parity.config import MoEConfig, StateDictError
from parity.weights import WeightsError, canonical_shapes, check_weights, init_weights
from tests.cases import TOLERANCES

torch = pytest.importorskip("torch")

F32 = TOLERANCES["float32"]
# (expert_activation, expert_proj_bias and router_bias); swiglu_limit 0.5 so both clamps act on
# many rows of this tiny layer; SwiGLU without biases is the default, tested everywhere else
CASES = [("silu", True), ("gelu_tanh", False), ("gelu_tanh", True), ("clamped_swiglu", False),
         ("clamped_swiglu", True)]
TORCH_KERNELS = ("loop", "grouped_mm", "npu")
JAX_KERNELS = ("ragged_dot", "blocked", "dense", "static")


def _cfg(activation: str, bias: bool) -> MoEConfig:
    # dims not multiples of 4: grouped_mm pads them (biases included)
    return MoEConfig(dim=10, hidden_dim=14, num_experts=5, top_k=2, score_func="softmax", route_norm=True,
                     score_before_experts=False, expert_activation=activation, expert_proj_bias=bias,
                     router_bias=bias, swiglu_alpha=1.5, swiglu_limit=0.5)


def _x(cfg) -> np.ndarray:
    return 2.0 * np.random.default_rng(0).standard_normal((2, 6, cfg.dim)).astype(np.float32)


def _torch(cfg, weights, x, kernel, dtype=torch.float32):
    import moe_torch

    moe = moe_torch.MoE(**cfg.to_kwargs(expert_kernel=kernel))
    moe.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    moe = moe.to(dtype)
    xt = torch.from_numpy(x).to(dtype).requires_grad_()
    out = moe(xt)
    (out * out).sum().backward()
    grads = {n: p.grad.double().numpy() for n, p in moe.named_parameters()}
    return out.detach().double().numpy(), dict(grads, x=xt.grad.double().numpy())


@pytest.fixture(scope="module")
def expected():
    """Per case: (reference output, float64 gradients of sum(out**2) from moe_torch's loop kernel)."""
    out = {}
    for case in CASES:
        cfg = _cfg(*case)
        weights, x = init_weights(cfg, seed=1), _x(cfg)
        ref, _ = reference.moe_forward(weights, x, cfg)
        y64, g64 = _torch(cfg, weights, x.astype(np.float64), "loop", torch.float64)
        np.testing.assert_allclose(y64, ref, rtol=1e-10, atol=1e-12)
        out[case] = (cfg, weights, x, ref, g64)
    return out


def _check_grads(grads, g64, what):
    assert sorted(grads) == sorted(g64), what
    for name, g in grads.items():
        scale = np.abs(g64[name]).max() + 1e-6
        np.testing.assert_allclose(g / scale, g64[name] / scale, rtol=0, atol=2e-5, err_msg=f"{what}: {name}")


@pytest.mark.parametrize("case", CASES, ids=[f"{a}-bias{int(b)}" for a, b in CASES])
def test_options_reference_and_every_torch_kernel_agree(expected, case, monkeypatch):
    from tests.torch.fake_npu import make_fake_torch_npu

    monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())
    cfg, weights, x, ref, g64 = expected[case]
    if case[1]:
        assert {"router.gate.bias", "experts.b1", "experts.b2", "experts.b3"} <= set(g64)
    for kernel in TORCH_KERNELS:
        y, grads = _torch(cfg, weights, x, kernel)
        np.testing.assert_allclose(y, ref, **F32, err_msg=kernel)
        _check_grads(grads, g64, kernel)


def _loss(moe, x):
    y = moe(x)
    return (y * y).sum(), y


# every JAX kernel on the case with every option on; the hand-written backward ("blocked") on every
# case (the other kernels differentiate ``gated_activation`` / ``expert_mlp`` with JAX's autodiff)
JAX_CASES = [pytest.param(CASES[-1], k, id=f"clamped_swiglu-bias1-{k}") for k in JAX_KERNELS] + [
    pytest.param(c, "blocked", marks=pytest.mark.slow, id=f"{c[0]}-bias{int(c[1])}-blocked") for c in CASES[:-1]]


@pytest.mark.parametrize("case, kernel", JAX_CASES)
def test_options_reference_and_every_jax_kernel_agree(expected, case, kernel):
    import jax.numpy as jnp
    from flax import nnx

    import moe_jax

    cfg, weights, x, ref, g64 = expected[case]
    moe = moe_jax.MoE(**cfg.to_kwargs(expert_kernel=kernel), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(moe, weights)
    moe.eval()
    (_, y), (gm, gx) = nnx.jit(nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True))(moe, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), ref, **F32, err_msg=kernel)
    grads = {k: np.asarray(v, np.float64) for k, v in moe_jax.state_dict(gm).items()}
    _check_grads(dict(grads, x=np.asarray(gx, np.float64)), g64, kernel)


def test_each_option_changes_the_output():
    """The options are live in the reference: each one, switched off, changes the layer's output; the
    clamps of clamped_swiglu act (a limit of 1e6 changes the output too)."""
    cfg = _cfg("clamped_swiglu", True)
    weights, x = init_weights(cfg, seed=1), _x(cfg)
    ref, _ = reference.moe_forward(weights, x, cfg)
    plain = {k: v for k, v in weights.items() if k not in ("router.gate.bias", "experts.b1", "experts.b2", "experts.b3")}
    for other, w in ((cfg.replace(router_bias=False), {k: v for k, v in weights.items() if k != "router.gate.bias"}),
                     (cfg.replace(expert_proj_bias=False), {k: v for k, v in weights.items() if k[-2:] not in
                                                            ("b1", "b2", "b3")}),
                     (cfg.replace(expert_activation="silu"), weights), (cfg.replace(swiglu_limit=1e6), weights),
                     (cfg.replace(swiglu_alpha=1.0), weights), (cfg.replace(expert_activation="gelu_tanh"), weights),
                     (cfg.replace(router_bias=False, expert_proj_bias=False, expert_activation="silu"), plain)):
        y, _ = reference.moe_forward(w, x, other)
        assert not np.allclose(y, ref, **F32), other


def test_default_experts_call_the_kernel_without_options():
    """SwiGLU without biases passes no keyword to the kernel: the kernels' original code path (the
    default families run exactly the ops they ran before these options existed)."""
    from flax import nnx

    import moe_jax
    import moe_torch

    assert moe_torch.GroupedExperts(8, 16, 4)._kernel_options() == {}
    assert moe_jax.GroupedExperts(8, 16, 4, rngs=nnx.Rngs(0)).kernel_options() == {}
    opts = moe_torch.GroupedExperts(8, 16, 4, expert_activation="clamped_swiglu", swiglu_limit=3.0,
                                    expert_proj_bias=True)._kernel_options()
    assert sorted(opts) == ["activation", "alpha", "b1", "b2", "b3", "limit"] and opts["limit"] == 3.0
    assert moe_jax.GroupedExperts(8, 16, 4, rngs=nnx.Rngs(0), expert_activation="gelu_tanh").kernel_options() == \
        {"activation": "gelu_tanh"}


@pytest.mark.parametrize("field, value, match", [
    ("expert_activation", "relu", r"expert_activation='relu' is not one of \('silu', 'gelu_tanh', 'clamped_swiglu'\)"),
    ("expert_activation", None, r"expert_activation=None is not one of"),
    ("swiglu_alpha", 0.0, r"swiglu_alpha=0.0 must be a finite number > 0"),
    ("swiglu_alpha", -1.702, r"swiglu_alpha=-1.702 must be a finite number > 0"),
    ("swiglu_alpha", float("nan"), r"swiglu_alpha=nan must be a finite number > 0"),
    ("swiglu_limit", float("inf"), r"swiglu_limit=inf must be a finite number > 0"),
    ("swiglu_limit", True, r"swiglu_limit=True must be a finite number > 0"),
    ("swiglu_limit", "7", r"swiglu_limit='7' must be a finite number > 0"),
    ("expert_proj_bias", 1, r"expert_proj_bias=1 must be True or False"),
    ("router_bias", "yes", r"router_bias='yes' must be True or False"),
])
def test_invalid_expert_options_are_refused_everywhere(field, value, match):
    from flax import nnx

    import moe_jax
    import moe_torch

    with pytest.raises(ValueError, match=match):
        MoEConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        moe_torch.MoE(dim=8, hidden_dim=16, num_experts=4, **{field: value})
    with pytest.raises(ValueError, match=match):
        moe_jax.MoE(dim=8, hidden_dim=16, num_experts=4, rngs=nnx.Rngs(0), **{field: value})


def test_numpy_scalars_are_stored_as_python_floats():
    cfg = MoEConfig(expert_activation="clamped_swiglu", swiglu_alpha=np.float32(1.5), swiglu_limit=np.int64(7))
    assert type(cfg.swiglu_alpha) is float and type(cfg.swiglu_limit) is float and cfg.swiglu_limit == 7.0


def test_canonical_shapes_grow_by_the_biases():
    cfg = _cfg("clamped_swiglu", True)
    shapes = canonical_shapes(cfg)
    assert {k: shapes[k] for k in ("router.gate.bias", "experts.b1", "experts.b2", "experts.b3")} == \
        {"router.gate.bias": (5,), "experts.b1": (5, 14), "experts.b2": (5, 10), "experts.b3": (5, 14)}
    assert not {"router.gate.bias", "experts.b1", "experts.b2", "experts.b3"} & set(canonical_shapes(_cfg("silu", False)))


def test_a_file_for_one_option_set_is_refused_key_by_key_by_the_other():
    """GPT-OSS-style weights (router and expert biases) into a layer without them: every bias is an
    ``unexpected`` key; the reverse: every bias ``missing`` with its shape. The same StateDictError
    message in both backends; ``parity.weights.check_weights`` lists the same keys."""
    from flax import nnx

    import moe_jax
    import moe_torch

    with_bias, without = _cfg("clamped_swiglu", True), _cfg("clamped_swiglu", False)
    biased, plain = init_weights(with_bias, seed=1), init_weights(without, seed=1)
    bias_keys = ("router.gate.bias", "experts.b1", "experts.b2", "experts.b3")
    for cfg, weights, words in ((without, biased, [f"unexpected {k!r}" for k in bias_keys]),
                                (with_bias, plain, ["missing 'router.gate.bias' (expected shape [5])",
                                                    "missing 'experts.b1' (expected shape [5, 14])",
                                                    "missing 'experts.b2' (expected shape [5, 10])",
                                                    "missing 'experts.b3' (expected shape [5, 14])"])):
        messages = []
        with pytest.raises(StateDictError) as info:
            moe_torch.MoE(**cfg.to_kwargs()).load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        messages.append(str(info.value).split(":", 1)[1])
        jmoe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
        with pytest.raises(StateDictError) as info:
            moe_jax.load_state_dict(jmoe, weights)
        messages.append(str(info.value).split(":", 1)[1])
        assert messages[0] == messages[1]
        for word in words:
            assert word in messages[0]
        with pytest.raises(WeightsError) as info:
            check_weights(weights, cfg)
        assert all(w.split(" (")[0] in str(info.value) for w in words)
    moe = moe_torch.MoE(**with_bias.to_kwargs())
    moe.load_state_dict({k: torch.from_numpy(v) for k, v in biased.items()})  # the right file loads
    assert torch.equal(moe.experts.b2, torch.from_numpy(biased["experts.b2"]))
    assert torch.equal(moe.router.gate.bias, torch.from_numpy(biased["router.gate.bias"]))
