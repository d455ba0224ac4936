"""The two backends side by side: weights round trip through files, and the same error classes."""

import numpy as np
import pytest

from parity.weights import load_weights, save_weights
from tests.cases import CASES, make_case

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
moe_torch = pytest.importorskip("moe_torch")
moe_jax = pytest.importorskip("moe_jax")

CFG = CASES["shared_expert"]  # every canonical tensor, non-square sizes (D=16, H=24, Hs=32)


def test_torch_to_file_to_jax_to_file_is_byte_identical(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tm = moe_torch.MoE(**CFG.to_kwargs())
    tm.init_weights()
    with torch.no_grad():  # non-zero buffers so they travel too
        tm.expert_bias.copy_(torch.linspace(-0.1, 0.1, CFG.num_experts))
        tm.tokens_per_expert.copy_(torch.arange(CFG.num_experts, dtype=torch.float32))
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp_path / "torch.safetensors"))

    jm = moe_jax.MoE(**CFG.to_kwargs(), rngs=nnx.Rngs(1))
    moe_jax.load_state_dict(jm, load_weights(tmp_path / "torch.safetensors", CFG))
    save_weights(tmp_path / "jax.safetensors", moe_jax.state_dict(jm))

    a = load_weights(tmp_path / "torch.safetensors")
    b = load_weights(tmp_path / "jax.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k

    # and back into torch: the same module state, bit for bit
    tm2 = moe_torch.MoE(**CFG.to_kwargs())
    tm2.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in b.items()})
    for k, v in tm.state_dict().items():
        assert torch.equal(v, tm2.state_dict()[k]), k


def _both(cfg, weights, dtype="float32"):
    tm = moe_torch.MoE(**cfg.to_kwargs())
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    jm = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(jm, weights)
    return tm, jm


@pytest.mark.parametrize("bad, cls, words", [
    (lambda x: x[0], ValueError, "expected [batch, seq_len, dim=16]"),        # wrong rank
    (lambda x: x[..., :7], ValueError, "expected [batch, seq_len, dim=16]"),  # wrong last dim
    (lambda x: x.astype(np.float16), TypeError, "dtype"),                    # dtype mismatch
])
def test_bad_input_same_error_class_in_both_backends(bad, cls, words):
    weights, x = make_case(CFG)
    tm, jm = _both(CFG, weights)
    xb = bad(x)
    with pytest.raises(cls) as torch_err:
        tm(torch.from_numpy(xb))
    with pytest.raises(cls) as jax_err:
        jm(jnp.asarray(xb))
    assert words in str(torch_err.value) and words in str(jax_err.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
    (dict(num_expert_groups=3, num_limited_groups=1), "does not divide"),
    (dict(score_func="relu"), "score_func='relu'"),
    (dict(hidden_dim=0), "hidden_dim=0"),
])
def test_bad_config_same_error_in_both_backends(kwargs, words):
    base = dict(dim=16, hidden_dim=24, num_experts=8, top_k=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=words):
        moe_torch.MoE(**base)
    with pytest.raises(ValueError, match=words):
        moe_jax.MoE(**base, rngs=nnx.Rngs(0))


def test_unknown_kernel_lists_each_backends_kernels():
    with pytest.raises(ValueError, match="ragged_dot"):  # a JAX kernel is not a torch kernel...
        moe_torch.MoE(dim=16, hidden_dim=24, num_experts=8, expert_kernel="ragged_dot")
    with pytest.raises(ValueError, match="grouped_mm"):  # ...and the other way round
        moe_jax.MoE(dim=16, hidden_dim=24, num_experts=8, expert_kernel="grouped_mm", rngs=nnx.Rngs(0))
