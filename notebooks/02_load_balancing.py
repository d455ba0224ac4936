# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Load balancing: keeping every expert busy
#
# Left alone, a router tends to **collapse**: an expert that wins a few more tokens early gets
# more gradient, becomes better, and wins even more tokens, until a handful of experts do all the
# work. This notebook trains a small MoE layer (top-1 of 8 experts, softmax scores) in **both
# frameworks** on a task where that happens, and compares four remedies:
#
# | | how | source |
# |---|---|---|
# | none | | |
# | `load_balance_loss="switch"` | add $\alpha\,E \sum_i f_i P_i$ to the loss | Switch Transformer (Fedus et al. 2021, eq. 4) |
# | `load_balance_loss="sequence"` | the same per sequence, averaged over the batch | DeepSeek-V3 (arXiv:2412.19437, eqs. 17-20) |
# | `use_expert_bias=True` | after each step, $b_i \mathrel{+}= \gamma\,\mathrm{sign}(\bar c - c_i)$ | DeepSeek-V3 sec. 2.1.2; Wang et al. 2024 (arXiv:2408.15664) |
#
# with $f_i$ the fraction of the $N k$ routed slots that chose expert $i$, $P_i$ the mean over tokens
# of $s_i / \sum_j s_j$, $c_i$ the tokens expert $i$ received since the last update and $\bar c$
# their mean. $f_i$ is a count (no gradient); the gradient of $\sum_i f_i P_i$ lowers the scores of
# the busiest experts. The bias needs no gradient at all: it only enters the *selection* (step 2 of
# notebook 1), never the weights, so it does not distort the loss ("auxiliary-loss-free").
#
# (The ST-MoE router z-loss, $c_z \cdot \mathrm{mean}(\mathrm{logsumexp}(\ell)^2)$, Zoph et al. 2022,
# arXiv:2202.08906, `router_z_loss_coeff`, keeps the logits small for stability; it does not balance.)

# %%
# %matplotlib inline
import time

import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import moe_jax
import moe_torch
from parity.config import MoEConfig
from parity.plots import load_imbalance, plot_load_imbalance, plot_load_over_steps
from parity.weights import init_weights

torch.set_num_threads(1)  # tiny layers: one thread is fastest

# %% [markdown]
# ## A task that collapses
#
# Tokens come from 8 clusters that share a common offset $m$ (think of a frequent direction in the
# residual stream); the target is mostly one smooth function of the token, plus a cluster-specific
# linear part. Because every token has the offset, whatever raises one expert's logit along $m$
# raises it for *all* tokens, and an expert that has been trained on many tokens fits every
# cluster fairly well: the rich get richer. The initial gate leans towards expert 0 along $m$
# (about half of the tokens pick it at the first step).

# %%
E, D, H, CLUSTERS = 8, 16, 32, 8
BATCH, SEQ, STEPS = 8, 32, 300
rng = np.random.default_rng(0)
centres = 0.5 * rng.standard_normal((CLUSTERS, D)).astype(np.float32)
offset = rng.standard_normal(D).astype(np.float32)
offset *= 4.0 / np.linalg.norm(offset)
shared_map = rng.standard_normal((D, D)).astype(np.float32) / np.sqrt(D)
cluster_maps = rng.standard_normal((CLUSTERS, D, D)).astype(np.float32) / np.sqrt(D)


def make_batch(step):
    """x, y [BATCH, SEQ, D] float32: the same batches for every run and both frameworks."""
    r = np.random.default_rng(1000 + step)
    c = r.integers(0, CLUSTERS, (BATCH, SEQ))
    x = centres[c] + 0.3 * r.standard_normal((BATCH, SEQ, D)).astype(np.float32) + offset
    y = 0.9 * np.tanh(x @ shared_map.T) + 0.1 * np.einsum("bsd,bsed->bse", x, cluster_maps[c])
    return x.astype(np.float32), (3.0 * y).astype(np.float32)


base = MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=1, score_func="softmax",
                 score_before_experts=False)
runs = {
    "no balancing": base,
    "switch loss": base.replace(load_balance_loss="switch", load_balance_coeff=0.1),
    "sequence-wise loss": base.replace(load_balance_loss="sequence", load_balance_coeff=0.1),
    "expert bias (aux-loss-free)": base.replace(use_expert_bias=True),
}
LR, BIAS_LR = 1e-2, 1e-2


def initial_weights(cfg):
    """Canonical weights with the gate tilted towards expert 0 along the shared offset."""
    w = init_weights(cfg, seed=2)
    w["router.gate.weight"][0] += 1.5 * offset / (offset @ offset)  # +1.5 on expert 0's logit
    return w


# %% [markdown]
# ## Training loops
#
# The same loop in each framework: Adam on the mean squared error plus the balance loss that the
# layer returns in `aux["load_balance_loss"]` (when enabled); with the expert bias,
# `update_expert_bias(moe, lr)` after every step (it reads the `tokens_per_expert` counts that
# training-mode forwards accumulate, updates `expert_bias` and zeroes the counts). We record
# `aux["tokens_per_expert"]`, the load of each expert at each step. The JAX step runs under `nnx.jit`.

# %%
def train_torch(cfg):
    moe = moe_torch.MoE(**cfg.to_kwargs())
    moe.load_state_dict({k: torch.from_numpy(v) for k, v in initial_weights(cfg).items()})
    opt = torch.optim.Adam(moe.parameters(), lr=LR)
    loads, losses = [], []
    for step in range(STEPS):
        x, y = map(torch.from_numpy, make_batch(step))
        out, aux = moe(x, return_aux=True)
        mse = ((out - y) ** 2).mean()
        opt.zero_grad()
        (mse + aux.get("load_balance_loss", 0.0)).backward()
        opt.step()
        if cfg.use_expert_bias:
            moe_torch.update_expert_bias(moe, BIAS_LR)
        loads.append(aux["tokens_per_expert"].numpy().copy())
        losses.append(mse.item())
    return np.array(loads), np.array(losses)


def train_jax(cfg):
    moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(moe, initial_weights(cfg))
    opt = nnx.Optimizer(moe, optax.adam(LR), wrt=nnx.Param)

    @nnx.jit
    def train_step(moe, opt, x, y):
        def loss_fn(moe):
            out, aux = moe(x, return_aux=True)
            mse = jnp.mean((out - y) ** 2)
            return mse + aux.get("load_balance_loss", 0.0), (mse, aux["tokens_per_expert"])

        (_, (mse, counts)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(moe)
        opt.update(moe, grads)
        if cfg.use_expert_bias:
            moe_jax.update_expert_bias(moe, BIAS_LR)
        return mse, counts

    loads, losses = [], []
    for step in range(STEPS):
        x, y = map(jnp.asarray, make_batch(step))
        mse, counts = train_step(moe, opt, x, y)
        loads.append(np.asarray(counts))
        losses.append(float(mse))
    return np.array(loads), np.array(losses)


loads, final_mse = {}, {}
for name, cfg in runs.items():
    t0 = time.perf_counter()
    (lt, mt), (lj, mj) = train_torch(cfg), train_jax(cfg)
    loads[name] = {"torch": lt, "jax": lj}
    final_mse[name] = (mt[-50:].mean(), mj[-50:].mean())
    print(f"{name:28s} {time.perf_counter() - t0:5.1f} s")

# %% [markdown]
# ## Who gets the tokens
#
# Each panel stacks the share of the tokens each expert received (one colour per expert, moving
# average over 10 steps); top row PyTorch, bottom row JAX. Without balancing, expert 0 swallows
# everything within a few steps; each remedy brings all eight colours back.

# %%
plot_load_over_steps(loads, smooth=10)

# %% [markdown]
# The same story in one number per step, $\max_i c_i / \bar c$: 1 is perfect balance, $E = 8$ means
# every token went to one expert (solid: PyTorch, dashed: JAX).

# %%
plot_load_imbalance(loads, smooth=10)

# %%
print(f"{'':28s} {'max/mean load, last 50 steps':>30s} {'MSE, last 50 steps':>22s}")
for name, by_framework in loads.items():
    imb = "  ".join(f"{fw} {load_imbalance(arr[-50:]).mean():4.2f}" for fw, arr in by_framework.items())
    mse = "  ".join(f"{v:.3f}" for v in final_mse[name])
    print(f"{name:28s} {imb:>30s} {mse:>22s}")

# %% [markdown]
# ## What to notice
#
# * **Collapse** without balancing: the imbalance climbs to $E$; seven experts receive no tokens
#   and no gradient. On this toy target one expert fits well enough, so the loss hardly shows it;
#   in a real model the collapsed layer has the capacity of one expert at the cost of eight.
# * The **switch** and **sequence-wise** losses recover within about a hundred steps. Here every
#   sequence mixes all clusters, so balancing per sequence and per batch nearly coincide; the
#   sequence-wise loss matters when sequences are homogeneous (DeepSeek-V3 uses it only as a
#   complement, with a tiny $\alpha$).
# * The **expert bias** balances without touching the gradients. It moves by at most $\gamma$
#   (`BIAS_LR`) per step, so here it first loses the race against the collapse and needs a few
#   dozen steps to catch up. Its fixed step keeps nudging the experts back and forth, so it settles
#   a little above the losses here; a larger $\gamma$ reacts faster but jitters more.
# * With 256 tokens per step, even a router that picks experts uniformly at random shows
#   max/mean ≈ 1.35 from sampling noise alone: the balanced runs sit near that floor.
# * PyTorch and JAX follow the same curves: same weights, same data, same maths. Small float32
#   differences can flip a near-tied routing decision, after which the runs drift apart slowly.
