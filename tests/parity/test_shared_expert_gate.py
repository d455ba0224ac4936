"""``shared_expert_gate`` (DESIGN.md step 9; Qwen2-MoE, Qwen3-Next): the shared expert scaled per token by
``sigmoid(x @ shared_expert_gate.weight.T)``, the same in the float64 reference, moe_torch and moe_jax."""

from __future__ import annotations

import numpy as np
import pytest

from parity import reference
from parity.config import MoEConfig, StateDictError
from parity.weights import WeightsError, canonical_shapes, check_weights, init_weights
from tests.cases import TOLERANCES

CFG = MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, score_func="softmax", score_before_experts=False,
                num_shared_experts=1, shared_hidden_dim=12, shared_expert_gate=True)
F32 = TOLERANCES["float32"]


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, CFG.dim)).astype(np.float32)


def test_option_is_validated():
    with pytest.raises(ValueError, match=r"shared_expert_gate=True needs a shared expert.*num_shared_experts=0"):
        MoEConfig(shared_expert_gate=True)
    with pytest.raises(ValueError, match=r"shared_expert_gate=1 must be True or False"):
        CFG.replace(shared_expert_gate=1)
    assert MoEConfig().shared_expert_gate is False  # default: today's layer
    assert MoEConfig.from_dict(CFG.to_dict()) == CFG


def test_canonical_tensor_and_reference_formula():
    assert canonical_shapes(CFG)["shared_expert_gate.weight"] == (1, CFG.dim)
    assert "shared_expert_gate.weight" not in canonical_shapes(CFG.replace(shared_expert_gate=False))
    w, x = init_weights(CFG, 0), _x()
    out, _ = reference.moe_forward(w, x, CFG)
    ungated, _ = reference.moe_forward(w, x, CFG.replace(shared_expert_gate=False))
    tokens = x.reshape(-1, CFG.dim).astype(np.float64)
    shared = reference.feed_forward(tokens, *(w[f"shared_expert.{n}.weight"].astype(np.float64)
                                              for n in ("w1", "w2", "w3")))
    gate = 1 / (1 + np.exp(-(tokens @ w["shared_expert_gate.weight"].astype(np.float64).T)))  # [N, 1]
    np.testing.assert_allclose(out.reshape(-1, CFG.dim), ungated.reshape(-1, CFG.dim) - shared + gate * shared,
                               rtol=1e-12, atol=1e-12)
    assert not np.allclose(out, ungated, **F32)


def test_a_file_for_one_layout_is_refused_by_the_other_key_by_key():
    gated = init_weights(CFG, 0)
    plain = init_weights(CFG.replace(shared_expert_gate=False), 0)
    with pytest.raises(WeightsError, match=r"unexpected 'shared_expert_gate.weight' \(shape \[1, 16\]\)"):
        check_weights(gated, CFG.replace(shared_expert_gate=False))
    with pytest.raises(WeightsError, match=r"missing 'shared_expert_gate.weight' \(expected shape \[1, 16\]\)"):
        check_weights(plain, CFG)


def test_torch_matches_reference_and_round_trips():
    torch = pytest.importorskip("torch")
    import moe_torch

    w, x = init_weights(CFG, 0), _x()
    moe = moe_torch.MoE(**CFG.to_kwargs())
    assert moe.config == CFG and tuple(moe.shared_expert_gate.weight.shape) == (1, CFG.dim)
    moe.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    with torch.no_grad():
        y = moe(torch.from_numpy(x)).numpy()
    ref, _ = reference.moe_forward(w, x, CFG)
    np.testing.assert_allclose(y, ref, **F32)
    sd = moe.state_dict()
    np.testing.assert_array_equal(sd["shared_expert_gate.weight"].numpy(), w["shared_expert_gate.weight"])
    plain = moe_torch.MoE(**CFG.to_kwargs(shared_expert_gate=False))
    assert plain.shared_expert_gate is None
    with pytest.raises(StateDictError, match="shared_expert_gate.weight"):
        plain.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    with pytest.raises(StateDictError, match="shared_expert_gate.weight"):
        moe.load_state_dict({k: torch.from_numpy(v) for k, v in w.items() if k != "shared_expert_gate.weight"})


def test_jax_matches_reference_and_round_trips():
    pytest.importorskip("jax")
    from flax import nnx

    import moe_jax

    w, x = init_weights(CFG, 0), _x()
    moe = moe_jax.MoE(**CFG.to_kwargs(), rngs=nnx.Rngs(0))
    assert moe.config == CFG
    moe_jax.load_state_dict(moe, w)
    sd = moe_jax.state_dict(moe)
    assert sorted(sd) == sorted(w)
    np.testing.assert_array_equal(sd["shared_expert_gate.weight"], w["shared_expert_gate.weight"])  # [1, D]
    moe.eval()
    ref, _ = reference.moe_forward(w, x, CFG)
    np.testing.assert_allclose(np.asarray(moe(x)), ref, **F32)
    plain = moe_jax.MoE(**CFG.to_kwargs(shared_expert_gate=False), rngs=nnx.Rngs(0))
    with pytest.raises(StateDictError, match="shared_expert_gate.weight"):
        moe_jax.load_state_dict(plain, w)


def test_harness_reference_with_locked_routing_keeps_the_gate():
    from parity.backends.reference_backend import reference_forward

    w, x = init_weights(CFG, 0), _x()
    ref, aux = reference.moe_forward(w, x, CFG)
    locked, _ = reference_forward(w, x, CFG, selected_experts=aux["selected_experts"])
    np.testing.assert_array_equal(locked, ref)
