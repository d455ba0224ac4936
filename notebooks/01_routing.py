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
# # 1. Routing: how a token picks its experts
#
# A Mixture-of-Experts (MoE) layer holds $E$ expert feed-forward networks and sends each token to
# $k$ of them. The **router** decides which. This notebook walks through its five steps
# (numbered as in `DESIGN.md` and in the comments of `moe_torch`, `moe_jax` and the float64
# reference `parity/reference.py`), for a batch of 12 tokens, in **both frameworks side by side**:
#
# 1. logits $\ell = x\,G^\top$ (in float32), scores $s = \mathrm{softmax}(\ell)$ or $\sigma(\ell)$;
# 2. selection scores $s' = s + b$ with the expert bias $b$ (only with `use_expert_bias`);
# 3. group-limited routing: keep the `num_limited_groups` best of `num_expert_groups` groups;
# 4. the top-$k$ of $s'$ (ties go to the lower expert index);
# 5. routing weights $w = s[\text{top-}k]$ (unbiased), divided by their sum if `route_norm`, times `route_scale`.
#
# `moe_torch.MoE` and `moe_jax.MoE` take the same keyword arguments (the fields of
# `parity.config.MoEConfig`) and load the same **canonical weights** (a flat name → array mapping
# in PyTorch layout), so every picture below is drawn twice from the same numbers.

# %%
# %matplotlib inline
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import moe_jax
import moe_torch
from parity import reference
from parity.config import MoEConfig
from parity.plots import plot_routing
from parity.weights import init_weights

torch.set_num_threads(1)  # tiny layers: one thread is fastest
x = np.random.default_rng(42).standard_normal((2, 6, 16)).astype(np.float32)  # [batch, seq, dim]


# %% [markdown]
# One helper builds the layer in both frameworks from one config, loads the same canonical weights
# (`moe.load_state_dict` in PyTorch, `moe_jax.load_state_dict` in JAX) and returns the auxiliary
# outputs of `moe(x, return_aux=True)`: `scores` $[N, E]$, `selected_experts` $[N, k]$,
# `routing_weights` $[N, k]$, ... It checks that both chose the same experts.

# %%
def route_both(cfg, weights, x, verbose=True):
    """(torch aux, jax aux) as NumPy arrays for the same config, weights and input."""
    torch_moe = moe_torch.MoE(**cfg.to_kwargs())
    torch_moe.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()})
    jax_moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(jax_moe, weights)
    with torch.no_grad():
        _, aux_t = torch_moe(torch.from_numpy(x), return_aux=True)
    _, aux_j = jax_moe(jnp.asarray(x), return_aux=True)
    aux_t = {k: v.numpy() for k, v in aux_t.items()}
    aux_j = {k: np.asarray(v) for k, v in aux_j.items()}
    assert np.array_equal(aux_t["selected_experts"], aux_j["selected_experts"]), "different experts!"
    if verbose:
        print(f"same experts in torch and JAX; max |score difference| = "
              f"{np.abs(aux_t['scores'] - aux_j['scores']).max():.1e}")
    return aux_t, aux_j


# %% [markdown]
# ## Softmax or sigmoid scores
#
# * **softmax** (Switch Transformer, Mixtral, Qwen, OLMoE): $s_i = e^{\ell_i} / \sum_j e^{\ell_j}$.
#   Experts compete: the scores of a token sum to 1.
# * **sigmoid** (DeepSeek-V3): $s_i = 1 / (1 + e^{-\ell_i})$, each expert scored on its own, in $(0, 1)$.
#
# Both are increasing in the logit, so without a bias or groups they pick **the same experts**;
# they differ in the routing weights that multiply the experts' outputs. Below: top-2 of 8 experts.
# Red boxes mark the chosen experts (1 = first slot), the bottom row shows the weights.

# %%
softmax_cfg = MoEConfig(dim=16, hidden_dim=32, num_experts=8, top_k=2, score_func="softmax")
sigmoid_cfg = softmax_cfg.replace(score_func="sigmoid")
weights = init_weights(softmax_cfg, seed=0)  # the same canonical weights for every layer below

soft_t, soft_j = route_both(softmax_cfg, weights, x)
sig_t, sig_j = route_both(sigmoid_cfg, weights, x)
print("softmax and sigmoid choose the same experts:",
      np.array_equal(soft_t["selected_experts"], sig_t["selected_experts"]))
plot_routing({"softmax, moe_torch": soft_t, "softmax, moe_jax": soft_j,
              "sigmoid, moe_torch": sig_t, "sigmoid, moe_jax": sig_j},
             title="top-2 of 8 experts: softmax vs sigmoid scores (same weights, same tokens)")

# %% [markdown]
# ## `route_norm` and `route_scale`
#
# Step 5 turns the chosen scores into weights. With `route_norm=True` they are renormalised,
# $w \leftarrow w / (\sum w + 10^{-20})$, so each token's weights sum to 1 (Mixtral, Qwen3, DeepSeek-V3);
# `route_scale` then multiplies them (DeepSeek-V3's `routed_scaling_factor` = 2.5), which keeps
# the routed output on the scale of the shared expert's. Sigmoid scores make the difference obvious:
# their raw sum over the top-2 lies anywhere in $(0, 2)$.

# %%
variants = {
    "sigmoid": sigmoid_cfg,
    "+ route_norm": sigmoid_cfg.replace(route_norm=True),
    "+ route_norm, route_scale=2.5": sigmoid_cfg.replace(route_norm=True, route_scale=2.5),
}
panels = {}
for name, cfg in variants.items():
    aux_t, aux_j = route_both(cfg, weights, x, verbose=False)
    sums = aux_t["routing_weights"].sum(-1)
    print(f"  {name:32s} weight sum per token: {sums.min():.3f} .. {sums.max():.3f}; "
          f"max |w_torch - w_jax| = {np.abs(aux_t['routing_weights'] - aux_j['routing_weights']).max():.1e}")
    panels[f"{name} (torch)"] = aux_t
plot_routing(panels, title="route_norm and route_scale change the weights, not the choice")

# %% [markdown]
# ## Group-limited routing with an expert bias (DeepSeek-V3)
#
# DeepSeek-V3 (arXiv:2412.19437, sec. 2.1.2) splits its 256 experts into 8 groups (one per node)
# and lets a token use experts of at most 4 groups, to bound the cross-node traffic. The
# **group score** is the sum of the two largest selection scores in the group (`group_score="top2_sum"`;
# DeepSeek-V2 used the maximum, `"max"`). The selection scores include the **expert bias** $b$
# that auxiliary-loss-free balancing learns (notebook 2): the bias decides *which* experts are
# chosen, while the weights stay the unbiased scores $s$.
#
# Scaled down: 16 experts in 4 groups of 4, keep 2 groups, top-4, sigmoid, `route_norm`,
# `route_scale=2.5`. We give the last group a bias of +0.25 to see it steer the choice.
# The grey cells are the experts of the dropped groups (the mask of step 3, computed with the
# float64 reference `parity.reference.group_limited_mask`); white lines separate the groups.

# %%
dsv3_cfg = MoEConfig(dim=16, hidden_dim=32, num_experts=16, top_k=4, score_func="sigmoid",
                     num_expert_groups=4, num_limited_groups=2, group_score="top2_sum",
                     use_expert_bias=True, route_norm=True, route_scale=2.5)
dsv3_weights = init_weights(dsv3_cfg, seed=1)
dsv3_weights["expert_bias"] = np.array([0.0] * 12 + [0.25] * 4, dtype=np.float32)

aux_t, aux_j = route_both(dsv3_cfg, dsv3_weights, x)
tokens = x.reshape(-1, dsv3_cfg.dim).astype(np.float64)
ref = reference.route(tokens, dsv3_weights["router.gate.weight"], dsv3_cfg, dsv3_weights["expert_bias"])
print("float64 reference agrees:", np.array_equal(ref["selected_experts"], aux_t["selected_experts"]))
mask = reference.group_limited_mask(aux_t["scores"] + dsv3_weights["expert_bias"], 4, 2, "top2_sum")
plot_routing({"moe_torch": {**aux_t, "mask": mask}, "moe_jax": {**aux_j, "mask": mask},
              "parity.reference (float64)": {**ref, "mask": mask}},
             num_expert_groups=4, title="DeepSeek-V3 routing: 4 groups keep 2 (top2_sum), top-4, bias +0.25 on group 3")


# %% [markdown]
# What did the groups and the bias change? The same layer without groups, and without the bias:

# %%
def chosen(cfg, w):
    aux_t, _ = route_both(cfg, w, x, verbose=False)
    return [set(row) for row in aux_t["selected_experts"].tolist()]

grouped = chosen(dsv3_cfg, dsv3_weights)
plain = chosen(dsv3_cfg.replace(num_expert_groups=None, num_limited_groups=None), dsv3_weights)
unbiased = chosen(dsv3_cfg, {**dsv3_weights, "expert_bias": np.zeros(16, np.float32)})
print("tokens whose experts change when the groups are removed:",
      [t for t in range(len(grouped)) if grouped[t] != plain[t]])
print("tokens whose experts change when the bias is removed:   ",
      [t for t in range(len(grouped)) if grouped[t] != unbiased[t]])
print("tokens using group 3 (experts 12-15) with / without the bias:",
      sum(any(e >= 12 for e in s) for s in grouped), "/", sum(any(e >= 12 for e in s) for s in unbiased))

# %% [markdown]
# ## Takeaways
#
# * Softmax and sigmoid rank experts alike; they differ in the weights (and in how a bias compares with them).
# * `route_norm` makes each token's weights sum to 1, `route_scale` rescales them; neither changes the choice.
# * Group-limited routing and the expert bias change the choice; the bias never enters the weights.
# * Both frameworks choose the same experts from the same canonical weights; where scores tie
#   (to float32 precision) they may not: notebook 3 shows how the parity harness reports that.
#
# References: Fedus, Zoph, Shazeer 2021, *Switch Transformers* (arXiv:2101.03961);
# DeepSeek-AI 2024, *DeepSeek-V2* (arXiv:2405.04434) and *DeepSeek-V3 Technical Report* (arXiv:2412.19437);
# Jiang et al. 2024, *Mixtral of Experts* (arXiv:2401.04088).
