"""Step 6a in all three implementations: the same kept set, bit for bit, on random routings (ties
in the weights included), for every policy, group, capacity rounding and renormalisation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from parity import reference as ref
from parity.config import MoEConfig

torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

from moe_jax import capacity as jax_capacity  # noqa: E402
from moe_torch import capacity as torch_capacity  # noqa: E402


def _routing(seed: int, n: int, k: int, e: int):
    """A top-k routing and float32 weights with many exact ties (weights drawn from 6 values)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    w = rng.choice(np.float32([0.1, 0.2, 0.25, 0.3, 0.5, 0.7]), size=(n, k)).astype(np.float32)
    return idx, w


@pytest.mark.parametrize("policy, group, rounding", list(itertools.product(
    ("probs", "position", "slot_major"), ("sequence", "batch"), ("megatron", "maxtext", "gshard"))))
def test_kept_sets_agree_bit_for_bit(policy, group, rounding):
    batch, seq, k, e = 3, 10, 2, 5
    idx, w = _routing(sum(map(ord, policy + group + rounding)), batch * seq, k, e)  # a fixed seed per case
    cfg = MoEConfig(num_experts=e, top_k=k, capacity_factor=0.8, capacity_policy=policy, capacity_group=group,
                    capacity_rounding=rounding, capacity_renorm=True)
    kept, w_ref, ranks = ref.drop_tokens(idx, w.astype(np.float64), cfg, batch)
    kt, wt, rt = torch_capacity.drop_tokens(torch.from_numpy(idx), torch.from_numpy(w), cfg, batch)
    kj, wj, rj = jax_capacity.drop_tokens(jnp.asarray(idx), jnp.asarray(w), cfg, batch)
    assert 0 < (~kept).sum() < kept.size
    for name, (k_, r_) in {"torch": (kt.numpy(), rt.numpy()), "jax": (np.asarray(kj), np.asarray(rj))}.items():
        np.testing.assert_array_equal(k_, kept, err_msg=name)
        np.testing.assert_array_equal(r_, ranks, err_msg=name)
    np.testing.assert_allclose(wt.numpy(), w_ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(wj), w_ref, rtol=1e-6)
