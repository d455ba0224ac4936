"""Shared helpers of the moe_jax tests: build a module from a case and compare with the reference."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

import moe_jax

KERNELS = ("blocked", "ragged_dot", "dense")


def build(cfg, weights, *, kernel="auto", param_dtype=jnp.float32, train=True):
    """A moe_jax.MoE for ``cfg`` holding the canonical ``weights``."""
    moe = moe_jax.MoE(**cfg.to_kwargs(expert_kernel=kernel), rngs=nnx.Rngs(0), param_dtype=param_dtype)
    moe_jax.load_state_dict(moe, weights)
    if not train:
        moe.eval()
    return moe


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (as a float32 array)."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def rounded_weights(weights: dict) -> dict:
    """Canonical weights rounded to bfloat16, buffers kept (they stay float32 in every backend)."""
    return {k: (v if k in ("expert_bias", "tokens_per_expert") else bf16_round(v)) for k, v in weights.items()}


def assert_close(name, got, want, tol):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, err_msg=name, **tol)
