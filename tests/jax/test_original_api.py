"""moe_jax's mirror of the original module's API (issue 13): the constructor, the bias update's
defaults and ``num_recomputations``, and the aux-loss auto scaler."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_jax
from parity import reference


def test_constructor_positional_order_and_original_defaults():
    params = [p.name for p in inspect.signature(moe_jax.MoE.__init__).parameters.values()
              if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    assert params == ["dim", "hidden_dim", "num_experts", "top_k", "score_before_experts", "load_balance_coeff"]
    moe = moe_jax.MoE(16, 24, 8, 2, False, 0.01, rngs=nnx.Rngs(0))
    assert (moe.top_k, moe.score_before_experts, moe.load_balance_coeff, moe.load_balance_loss) == \
        (2, False, 0.01, "switch")
    assert moe.use_expert_bias and moe.router.route_order == "scale_first"
    plain = moe_jax.MoE(16, 24, 8, rngs=nnx.Rngs(0))
    assert plain.load_balance_coeff is None and plain.load_balance_loss is None
    _, aux = moe(jnp.ones((1, 4, 16)), return_aux=True)
    assert aux["load_balance_loss"].shape == ()


def test_update_expert_bias_default_lr_and_num_recomputations():
    assert inspect.signature(moe_jax.update_expert_bias).parameters["lr"].default == 1e-3
    moe = moe_jax.MoE(8, 8, 4, rngs=nnx.Rngs(0))
    counts = np.array([5.0, 0, 1, 2], np.float32)
    moe.tokens_per_expert[...] = jnp.asarray(2 * counts)  # two passes of the router (recomputation)
    moe_jax.update_expert_bias(moe, num_recomputations=2)
    np.testing.assert_array_equal(np.asarray(moe.expert_bias[...]),
                                  reference.update_expert_bias(np.zeros(4), counts, 1e-3))
    assert not np.asarray(moe.tokens_per_expert[...]).any()
    moe.tokens_per_expert[...] = jnp.asarray([3.0, 1, 0, 0])
    with pytest.raises(ValueError, match="not a multiple of num_recomputations=2"):
        moe_jax.update_expert_bias(moe, num_recomputations=2)
    with pytest.raises(ValueError, match="num_recomputations=0"):
        moe_jax.update_expert_bias(moe, num_recomputations=0)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_aux_loss_auto_scaler(scale):
    """grad of ``sum(scaler(out, aux))`` == grad of ``sum(out) + scale * aux``; the value is ``out``."""
    w = jnp.arange(6.0).reshape(2, 3) / 10

    def aux_of(w):
        return jnp.sum(w ** 2)

    def injected(w):
        out = jnp.tanh(w)
        return jnp.sum(moe_jax.aux_loss_auto_scaler(out, aux_of(w), scale))

    def added(w):
        return jnp.sum(jnp.tanh(w)) + scale * aux_of(w)

    assert float(injected(w)) == pytest.approx(float(jnp.sum(jnp.tanh(w))))
    np.testing.assert_allclose(jax.grad(injected)(w), jax.grad(added)(w), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(injected))(w), jax.grad(added)(w), rtol=1e-6)
