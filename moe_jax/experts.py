"""Routed experts, step (7) of DESIGN.md: E gated-MLP experts (SwiGLU by default) on expert-major rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.feed_forward import check_input_dtype, normal_init
from moe_jax.kernels import KERNELS, resolve_kernel
from parity.config import validate_experts


class GroupedExperts(nnx.Module):
    """``num_experts`` gated-MLP experts stored as 3-D parameters.

    Parameters (JAX ``x @ w`` layout; canonical ``experts.w1`` etc. are these with the last two axes
    swapped, see ``moe_jax.weights``): ``w1``, ``w3``: (E, dim, hidden_dim); ``w2``: (E, hidden_dim, dim);
    with ``expert_proj_bias`` also ``b1``, ``b3`` (E, hidden_dim) and ``b2`` (E, dim) (zeros; canonical
    ``experts.b1`` etc., the same layout).

    ``expert_kernel``: "auto" | "ragged_dot" | "blocked" | "dense" (``moe_jax.kernels``); "auto" is
    resolved when called, from the platform and dtype (``kernels.resolve_kernel``).
    ``expert_activation``: "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma 4) | "clamped_swiglu" (GPT-OSS,
    ``swiglu_alpha`` 1.702, ``swiglu_limit`` 7.0); ``expert_proj_bias``: biases on the gate, up and down
    projections (GPT-OSS). Fixed at construction; invalid values raise ``ValueError``
    (``parity.config.validate_experts``).

    Call: ``x`` (rows, dim) sorted expert-major, ``counts`` (E,) int rows per expert -> (rows, dim).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, expert_kernel: str = "auto", *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, expert_activation: str = "silu",
                 swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, expert_proj_bias: bool = False):
        resolve_kernel(expert_kernel)  # ValueError for an unknown kernel, listing the JAX kernels
        validate_experts(expert_activation=expert_activation, swiglu_alpha=swiglu_alpha,
                         swiglu_limit=swiglu_limit, expert_proj_bias=expert_proj_bias)
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.expert_kernel = expert_kernel
        self.expert_activation = expert_activation
        self.swiglu_alpha, self.swiglu_limit = float(swiglu_alpha), float(swiglu_limit)
        e, d, h = num_experts, dim, hidden_dim
        self.w1 = nnx.Param(normal_init(rngs.params(), (e, d, h), d, param_dtype))
        self.w2 = nnx.Param(normal_init(rngs.params(), (e, h, d), h, param_dtype))
        self.w3 = nnx.Param(normal_init(rngs.params(), (e, d, h), d, param_dtype))
        if expert_proj_bias:
            self.b1 = nnx.Param(jnp.zeros((e, h), param_dtype))
            self.b2 = nnx.Param(jnp.zeros((e, d), param_dtype))
            self.b3 = nnx.Param(jnp.zeros((e, h), param_dtype))
        else:
            self.b1 = self.b2 = self.b3 = None

    @property
    def expert_proj_bias(self) -> bool:
        """Whether the projections carry biases ``b1``, ``b2``, ``b3`` (fixed at construction)."""
        return self.b1 is not None

    def kernel_name(self, dtype=None) -> str:
        """The kernel this module runs for inputs of ``dtype`` on the default backend."""
        return resolve_kernel(self.expert_kernel, dtype=dtype)

    def kernel_options(self) -> dict:
        """The kernels' keyword options for this module (empty for SwiGLU without biases: the
        original call, the original ops)."""
        options = {}
        if self.b1 is not None:
            options.update(b1=self.b1[...], b2=self.b2[...], b3=self.b3[...])
        if self.expert_activation != "silu":
            options["activation"] = self.expert_activation
            if self.expert_activation == "clamped_swiglu":
                options.update(alpha=self.swiglu_alpha, limit=self.swiglu_limit)
        return options

    def __call__(self, x: jax.Array, counts: jax.Array) -> jax.Array:
        check_input_dtype(x, self.w1, "GroupedExperts")
        kernel = KERNELS[self.kernel_name(x.dtype)]
        # (7) y = act(x W1[e] (+ b1[e]), x W3[e] (+ b3[e])) W2[e] (+ b2[e]) per row of expert e, in the
        # input dtype
        return kernel(self.w1[...], self.w2[...], self.w3[...], x, counts, **self.kernel_options())
