"""Routed experts, step (7) of DESIGN.md: E SwiGLU experts run on expert-major sorted rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.feed_forward import check_input_dtype, normal_init
from moe_jax.kernels import KERNELS, resolve_kernel


class GroupedExperts(nnx.Module):
    """``num_experts`` SwiGLU experts stored as 3-D parameters.

    Parameters (JAX ``x @ w`` layout; canonical ``experts.w1`` etc. are these with the last two axes
    swapped, see ``moe_jax.weights``): ``w1``, ``w3``: (E, dim, hidden_dim); ``w2``: (E, hidden_dim, dim).

    ``expert_kernel``: "auto" | "ragged_dot" | "blocked" | "dense" (``moe_jax.kernels``); "auto" is
    resolved when called, from the platform and dtype (``kernels.resolve_kernel``).

    Call: ``x`` (rows, dim) sorted expert-major, ``counts`` (E,) int rows per expert -> (rows, dim).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, expert_kernel: str = "auto", *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        resolve_kernel(expert_kernel)  # ValueError for an unknown kernel, listing the JAX kernels
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.expert_kernel = expert_kernel
        e, d, h = num_experts, dim, hidden_dim
        self.w1 = nnx.Param(normal_init(rngs.params(), (e, d, h), d, param_dtype))
        self.w2 = nnx.Param(normal_init(rngs.params(), (e, h, d), h, param_dtype))
        self.w3 = nnx.Param(normal_init(rngs.params(), (e, d, h), d, param_dtype))

    def kernel_name(self, dtype=None) -> str:
        """The kernel this module runs for inputs of ``dtype`` on the default backend."""
        return resolve_kernel(self.expert_kernel, dtype=dtype)

    def __call__(self, x: jax.Array, counts: jax.Array) -> jax.Array:
        check_input_dtype(x, self.w1, "GroupedExperts")
        kernel = KERNELS[self.kernel_name(x.dtype)]
        # (7) y = (silu(x W1[e]) * x W3[e]) W2[e] per row of expert e, in the input dtype
        return kernel(self.w1[...], self.w2[...], self.w3[...], x, counts)
