"""RMSNorm of the layer's input, as Gemma 4 writes it (DESIGN.md steps 1 and 6).

The float64 form is ``parity.reference.rms_norm``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, eps: float, weight: jax.Array | None = None) -> jax.Array:
    """``x * (mean(x**2, -1) + eps) ** -0.5`` (times ``weight`` (D,) when given), in float32.

    x (N, D) any float dtype -> (N, D) float32 (float64 for float64 x); the caller casts. RMSNorm:
    Zhang & Sennrich 2019, in the order of transformers' ``Gemma4RMSNorm`` (a weight that multiplies
    as is, no ``1 +``).
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    y = xf * jnp.power(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.asarray(eps, acc), -0.5)
    return y if weight is None else y * weight.astype(acc)
