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
# # 4. Training parity: does the port *train* the same?
#
# Notebook 3 checked one forward pass, one gradient and a few bias updates. A training run is
# hundreds of those in a row, and small differences can grow: Adam divides by $\sqrt{\hat v}$, so
# a rounding difference in a tiny gradient becomes a visible difference in the step, and a
# routing decision near a tie can flip and send a token to another expert from then on.
# Two *correct* ports therefore never agree bit for bit after a few steps. How far apart may they
# drift before we call one of them wrong?
#
# `moe-parity train` (`parity.train`) answers with a **band**. It trains four runs of the layer from
# the same canonical weights on the same data (regressing a teacher layer's output): PyTorch and
# JAX in float32, and each of them again in float64, its own *truth*. At every step it measures
# $d(\text{torch}, \text{jax})$ and each port's drift from its truth, and asks
#
# $$d(\text{torch}, \text{jax}) \le f \cdot \max\big(d(\text{torch}, \text{torch}_{64}),\ d(\text{jax}, \text{jax}_{64})\big) + 1\ \text{ULP}.$$
#
# By the triangle inequality two ports whose float64 runs agree can never leave this band for
# $f \ge 2$, however much the training amplifies their rounding; a port whose *maths* differs moves
# its float64 run too, and leaves it. This notebook runs a clean port, then plants a one-character
# bug in the JAX optimizer and watches which curves notice.

# %%
# %matplotlib inline
import optax
import torch

from parity.presets import get_preset
from parity.train import OptimizerSpec, TrainSettings, run_training
from parity.train.plots import plot_drift, plot_loss, plot_routing_agreement

torch.set_num_threads(1)  # tiny layers: one thread is fastest

cfg = get_preset("default").config  # sigmoid top-1 of 8 experts, the expert bias on
spec = OptimizerSpec(name="adamw", lr=1e-3, weight_decay=0.01, eps=1e-8, clip_norm=1.0)
settings = TrainSettings(cfg=cfg, optimizer=spec, steps=30, batch=4, seq_len=16, invariance=False)

# %% [markdown]
# ## A clean port
#
# The optimizers are matched field by field (`parity.train.optim`): `torch.optim.AdamW` and
# `optax.adamw` both add $\varepsilon$ *outside* the square root of the bias-corrected second
# moment, both scale the decoupled weight decay by the learning rate, and the gradient clipping
# uses torch's rule on both sides.

# %%
clean = run_training(settings)
print(clean.verdict.summary())
for line in clean.headline():
    print(line)
plot_drift(clean, title="clean port: weight drift (log scale)")

# %% [markdown]
# The black line (torch vs JAX) stays inside the green band: it is of the same size as the blue and
# orange lines (each port against its own float64 run), a few float32 ULPs of the weights. The
# green dotted line, the two float64 runs against each other, sits about nine orders of magnitude
# lower (here 2e-6 against 9e-15 after 30 steps).
#
# ## The planted bug: epsilon inside the square root
#
# A port of an Adam variant that writes $\sqrt{\hat v + \varepsilon}$ where the reference writes
# $\sqrt{\hat v} + \varepsilon$ (in optax: `eps_root` instead of `eps`). Both are legitimate
# optimizers, so nothing crashes and no tolerance check of a single step looks alarming; only the
# training trajectory is no longer PyTorch's.

# %%
buggy_tx = optax.chain(optax.clip_by_global_norm(spec.clip_norm),
                       optax.adamw(spec.lr, eps=0.0, eps_root=spec.eps, weight_decay=spec.weight_decay))
buggy = run_training(settings, jax_tx=buggy_tx)
print(buggy.verdict.summary())
for line in buggy.headline():
    print(line)

# %% [markdown]
# ## What the loss curves show: nothing

# %%
plot_loss(buggy, title="epsilon inside the square root (JAX): the loss curves")

# %% [markdown]
# The four loss curves lie on top of each other: both optimizers train the layer, at the same
# speed. A researcher comparing loss curves would call the port correct.
#
# ## What the drift shows: the bug, at step 0

# %%
plot_drift(buggy, title="epsilon inside the square root (JAX): weight drift (log scale)")

# %% [markdown]
# Torch vs JAX (black) leaves the band at the very first step and keeps climbing, while each port's
# drift from its own float64 run (blue, orange) stays at rounding level. The telling line is the
# green one: the two **float64** runs now disagree as much as the float32 ones. Rounding cannot
# do that; different maths does. The report names the metric that left the band first and when:

# %%
first = buggy.verdict.first
print(f"first out of the band: {first.metric} at step {first.first_exit}")
for row in buggy.verdict.rows:
    print(f"  {row.metric:18s} {row.status}  first exit {row.first_exit}")

# %% [markdown]
# Why is the difference so large? For a weight whose gradient is about $10^{-4}$, $\hat v \approx
# 10^{-8} = \varepsilon$: $\sqrt{\hat v} + \varepsilon \approx 10^{-4}$ but $\sqrt{\hat v + \varepsilon}
# \approx 1.4 \cdot 10^{-4}$, so that weight's step is 30% smaller. Most of an MoE layer's expert
# weights see gradients of that size (each expert gets only its share of the tokens).
#
# The routing agreement (share of tokens whose experts equal the float64 run's) stays at 1 for
# both: each port agrees with *its own* truth. The bug is in the optimizer, not in the routing.

# %%
plot_routing_agreement(buggy, title="routing agreement with each port's own float64 run")

# %% [markdown]
# ## What to notice
#
# * A loss curve is a weak witness: two different optimizers can train equally well.
# * Comparing float32 runs directly says only "they differ"; comparing each with its own float64
#   run says whether the difference is rounding (inside the band) or maths (outside).
# * The band needs no tolerance tuned per model: its scale is the port's own rounding drift, so it
#   adapts to the preset, the optimizer and the number of steps.
# * `moe-parity train --out DIR` writes these plots (`loss.png`, `drift.png`, `routing.png`,
#   `expert_load.png`) and the invariance rows: gradient accumulation, activation checkpointing
#   and bitwise determinism over two reruns.
