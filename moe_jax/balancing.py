"""Load balancing: auxiliary losses and the auxiliary-loss-free expert-bias update (DESIGN.md).

All in float32 (the losses in float64 for float64 scores). The losses are differentiable through ``scores`` / ``logits`` only (the routed
fractions ``f_i`` are counts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def load_balance_loss(scores: jax.Array, selected_experts: jax.Array, num_experts: int, coeff: float,
                      kind: str = "switch", batch: int = 1, kept: jax.Array | None = None) -> jax.Array:
    """Switch-style balance loss ``coeff * E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4). Scalar f32.

    scores (N, E) f32; selected_experts (N, k) int. ``f_i``: fraction of the N*k routed slots that
    chose expert i (no gradient); ``P_i``: mean over tokens of ``scores[:, i] / scores.sum(-1)``.
    kind="switch" uses the whole batch; kind="sequence" (DeepSeek-V3 sequence-wise balance loss,
    arXiv:2412.19437 eqs. 17-20) computes it per sequence (``batch`` sequences of N/batch tokens) and
    averages over the batch. No tokens (N = 0, or batch = 0): exactly 0 with a zero gradient (the
    mean over no tokens is taken as 0; DESIGN.md). Raises ValueError for another ``kind``.
    """
    n, k = selected_experts.shape
    if kind == "switch":
        batch = 1
    elif kind != "sequence":
        raise ValueError(f"load_balance_loss={kind!r} is not one of ('switch', 'sequence')")
    dt = jnp.promote_types(scores.dtype, jnp.float32)
    scores = scores.astype(dt)
    if n == 0:
        return scores.sum() * jnp.asarray(0, dt)  # an empty sum: exactly 0, connected to ``scores``
    probs = (scores / scores.sum(-1, keepdims=True)).reshape(batch, n // batch, num_experts)
    onehot = jax.nn.one_hot(selected_experts, num_experts, dtype=dt)  # (N, k, E)
    if kept is not None:  # (6a) capacity_stats="kept": only kept slots count, still over N*k
        onehot = jnp.where(kept[..., None], onehot, jnp.zeros((), dt))
    onehot = onehot.sum(1)  # (N, E)
    frac = onehot.reshape(batch, n // batch, num_experts).sum(1) / (n // batch * k)  # (B, E)
    frac = lax.stop_gradient(frac)
    return jnp.asarray(coeff * num_experts, dt) * (frac * probs.mean(1)).sum(-1).mean()


def router_z_loss(logits: jax.Array, coeff: float) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): ``coeff * mean(logsumexp(logits)^2)``. Scalar f32."""
    dt = jnp.promote_types(logits.dtype, jnp.float32)
    if logits.shape[0] == 0:  # no tokens: exactly 0 with a zero gradient (DESIGN.md)
        return logits.astype(dt).sum() * jnp.asarray(0, dt)
    z = jax.nn.logsumexp(logits.astype(dt), axis=-1)
    return jnp.asarray(coeff, dt) * jnp.mean(z**2)


def _bias_update_numpy(expert_bias, tokens_per_expert, lr, center: bool) -> np.ndarray:
    """The float32 NumPy operations of ``parity.reference.update_expert_bias``, in the same order."""
    bias = np.asarray(expert_bias, dtype=np.float32)
    counts = np.asarray(tokens_per_expert, dtype=np.float32)
    sign = np.sign(counts.mean(dtype=np.float32) - counts).astype(np.float32)
    if center:
        sign = sign - sign.mean(dtype=np.float32)
    return (bias + np.float32(lr) * sign).astype(np.float32)


def expert_bias_update(expert_bias: jax.Array, tokens_per_expert: jax.Array, lr: float,
                       center: bool = False) -> jax.Array:
    """The new bias, ``expert_bias + lr * sign(mean(counts) - counts)`` in float32 (pure function).

    Auxiliary-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2; Wang et al. 2024); with
    ``center=True`` the signs are made zero-mean first (torchtitan's variant). (E,) f32 -> (E,) f32.

    NOTE: compiled, XLA rewrites ``sum / E`` as ``sum * (1 / E)`` and fuses the multiply-add, each of
    which can change the last bit. Bit identity with ``parity.reference.update_expert_bias`` is the
    contract and the vector has only E entries, so the update runs as those same NumPy operations on
    the host (``jax.pure_callback``), under ``jit`` as well as eagerly.
    """
    num_experts = expert_bias.shape[0]
    lr = jnp.asarray(lr, jnp.float32)
    return jax.pure_callback(
        lambda b, c, r: _bias_update_numpy(b, c, r, center),
        jax.ShapeDtypeStruct((num_experts,), jnp.float32),
        expert_bias.astype(jnp.float32), tokens_per_expert.astype(jnp.float32), lr)


def update_expert_bias(moe, lr: float = 1e-3, group: str | tuple[str, ...] | None = None, center: bool = False,
                       num_recomputations: int = 1) -> None:
    """Update ``moe.expert_bias`` from ``moe.tokens_per_expert`` in place, then zero the counts.

    ``moe``: a ``moe_jax.MoE`` (any module with ``expert_bias`` and ``tokens_per_expert`` variables).
    ``lr``: float step, default 1e-3 (the original module's). ``group``: None, or the name of a mapped
    mesh axis, or a tuple of them (e.g. ``("tp", "cp", "dp")``; inside ``shard_map`` / ``pmap``) over
    which the counts are summed first. ``num_recomputations``: the router's passes per forward
    (activation recomputation counts the tokens again); the counts are divided by it first, the rule
    of ``moe_torch.update_expert_bias`` (eagerly, counts that are not multiples of it raise
    ``ValueError``). ``expert_bias`` stays float32.
    """
    if isinstance(num_recomputations, bool) or not isinstance(num_recomputations, int) or num_recomputations < 1:
        raise ValueError(f"num_recomputations={num_recomputations!r} must be an integer >= 1")
    counts = moe.tokens_per_expert[...]
    if num_recomputations > 1:
        if not isinstance(counts, jax.core.Tracer) and bool(jnp.any(jnp.remainder(counts, num_recomputations))):
            raise ValueError(f"tokens_per_expert={np.asarray(counts).tolist()} is not a multiple of "
                             f"num_recomputations={num_recomputations}: the router's passes of one step "
                             f"did not count the same tokens")
        counts = counts / num_recomputations
    if group is not None:
        counts = lax.psum(counts, group)
    moe.expert_bias[...] = expert_bias_update(moe.expert_bias[...], counts, lr, center)
    moe.tokens_per_expert[...] = jnp.zeros_like(moe.tokens_per_expert[...])


@jax.custom_vjp
def aux_loss_auto_scaler(output: jax.Array, aux_loss: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
    """``output`` unchanged; the backward pass also gives ``aux_loss`` the gradient ``scale`` (ones-like
    times the per-step scale), so the auxiliary loss trains the router without being added to the
    returned loss. The JAX form of ``moe_torch.MoEAuxLossAutoScaler`` (the idea is Megatron-Core's);
    the scale is an argument (no global state), e.g. the main loss's own backward scale."""
    return output


def _scaler_fwd(output, aux_loss, scale):
    return output, (aux_loss, scale)


def _scaler_bwd(res, g):
    aux_loss, scale = res
    scale = jnp.asarray(scale)
    return g, jnp.ones_like(aux_loss) * scale.astype(aux_loss.dtype), jnp.zeros_like(scale)


aux_loss_auto_scaler.defvjp(_scaler_fwd, _scaler_bwd)
