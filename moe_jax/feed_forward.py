"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"): the shared expert, step (9)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.kernels import swiglu


def normal_init(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """N(0, 1/fan_in) weights, the scale of ``parity.weights.init_weights`` (trained-layer-like)."""
    return (jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)


def check_input_dtype(x: jax.Array, param: nnx.Variable, owner: str) -> None:
    """Raise TypeError when ``x`` and the parameters differ in dtype (no silent promotion)."""
    if x.dtype != param.dtype:
        raise TypeError(f"{owner}: x has dtype {x.dtype} but the parameters are {param.dtype}; "
                        f"cast x (or build the module with param_dtype={x.dtype})")


class FeedForward(nnx.Module):
    """SwiGLU: ``(silu(x @ w1) * (x @ w3)) @ w2``.

    Parameters (JAX ``x @ w`` layout; the canonical PyTorch ``nn.Linear`` weights are their transposes,
    see ``moe_jax.weights``): ``w1``, ``w3``: (dim, hidden_dim); ``w2``: (hidden_dim, dim), all in
    ``param_dtype``.

    Call: ``x`` (..., dim) of dtype ``param_dtype`` -> (..., dim), same dtype. TypeError on a dtype
    mismatch.
    """

    def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.dim, self.hidden_dim = dim, hidden_dim
        self.w1 = nnx.Param(normal_init(rngs.params(), (dim, hidden_dim), dim, param_dtype))
        self.w2 = nnx.Param(normal_init(rngs.params(), (hidden_dim, dim), hidden_dim, param_dtype))
        self.w3 = nnx.Param(normal_init(rngs.params(), (dim, hidden_dim), dim, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input_dtype(x, self.w1, "FeedForward")
        return swiglu(x, self.w1[...], self.w2[...], self.w3[...])
