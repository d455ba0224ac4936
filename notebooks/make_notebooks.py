"""Write the teaching notebooks (01_routing, 02_load_balancing, 03_parity) from the cells below.

The notebooks are committed output-free; this script is their source. Edit the cells here and run

    python notebooks/make_notebooks.py            # rewrite notebooks/*.ipynb
    python notebooks/make_notebooks.py --check    # exit 1 if a committed notebook differs

tests/test_notebooks.py executes every notebook and checks that the committed files match this
script and carry no outputs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


# ================================================================================================
ROUTING = [
    md(r"""
    # 1. Routing: how a token picks its experts

    A Mixture-of-Experts (MoE) layer holds $E$ expert feed-forward networks and sends each token to
    $k$ of them. The **router** decides which. This notebook walks through its five steps
    (numbered as in `DESIGN.md` and in the comments of `moe_torch`, `moe_jax` and the float64
    reference `parity/reference.py`), for a batch of 12 tokens, in **both frameworks side by side**:

    1. logits $\ell = x\,G^\top$ (in float32), scores $s = \mathrm{softmax}(\ell)$ or $\sigma(\ell)$;
    2. selection scores $s' = s + b$ with the expert bias $b$ (only with `use_expert_bias`);
    3. group-limited routing: keep the `num_limited_groups` best of `num_expert_groups` groups;
    4. the top-$k$ of $s'$ (ties go to the lower expert index);
    5. routing weights $w = s[\text{top-}k]$ (unbiased), divided by their sum if `route_norm`, times `route_scale`.

    `moe_torch.MoE` and `moe_jax.MoE` take the same keyword arguments (the fields of
    `parity.config.MoEConfig`) and load the same **canonical weights** (a flat name → array mapping
    in PyTorch layout), so every picture below is drawn twice from the same numbers.
    """),
    code("""
    %matplotlib inline
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
    """),
    md(r"""
    One helper builds the layer in both frameworks from one config, loads the same canonical weights
    (`moe.load_state_dict` in PyTorch, `moe_jax.load_state_dict` in JAX) and returns the auxiliary
    outputs of `moe(x, return_aux=True)`: `scores` $[N, E]$, `selected_experts` $[N, k]$,
    `routing_weights` $[N, k]$, ... It checks that both chose the same experts.
    """),
    code("""
    def route_both(cfg, weights, x, verbose=True):
        \"\"\"(torch aux, jax aux) as NumPy arrays for the same config, weights and input.\"\"\"
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
    """),
    md(r"""
    ## Softmax or sigmoid scores

    * **softmax** (Switch Transformer, Mixtral, Qwen, OLMoE): $s_i = e^{\ell_i} / \sum_j e^{\ell_j}$.
      Experts compete: the scores of a token sum to 1.
    * **sigmoid** (DeepSeek-V3): $s_i = 1 / (1 + e^{-\ell_i})$, each expert scored on its own, in $(0, 1)$.

    Both are increasing in the logit, so without a bias or groups they pick **the same experts**;
    they differ in the routing weights that multiply the experts' outputs. Below: top-2 of 8 experts.
    Red boxes mark the chosen experts (1 = first slot), the bottom row shows the weights.
    """),
    code("""
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
    """),
    md(r"""
    ## `route_norm` and `route_scale`

    Step 5 turns the chosen scores into weights. With `route_norm=True` they are renormalised,
    $w \leftarrow w / (\sum w + 10^{-20})$, so each token's weights sum to 1 (Mixtral, Qwen3, DeepSeek-V3);
    `route_scale` then multiplies them (DeepSeek-V3's `routed_scaling_factor` = 2.5), which keeps
    the routed output on the scale of the shared expert's. Sigmoid scores make the difference obvious:
    their raw sum over the top-2 lies anywhere in $(0, 2)$.
    """),
    code("""
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
    """),
    md(r"""
    ## Group-limited routing with an expert bias (DeepSeek-V3)

    DeepSeek-V3 (arXiv:2412.19437, sec. 2.1.2) splits its 256 experts into 8 groups (one per node)
    and lets a token use experts of at most 4 groups, to bound the cross-node traffic. The
    **group score** is the sum of the two largest selection scores in the group (`group_score="top2_sum"`;
    DeepSeek-V2 used the maximum, `"max"`). The selection scores include the **expert bias** $b$
    that auxiliary-loss-free balancing learns (notebook 2): the bias decides *which* experts are
    chosen, while the weights stay the unbiased scores $s$.

    Scaled down: 16 experts in 4 groups of 4, keep 2 groups, top-4, sigmoid, `route_norm`,
    `route_scale=2.5`. We give the last group a bias of +0.25 to see it steer the choice.
    The grey cells are the experts of the dropped groups (the mask of step 3, computed with the
    float64 reference `parity.reference.group_limited_mask`); white lines separate the groups.
    """),
    code("""
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
    """),
    md(r"""
    What did the groups and the bias change? The same layer without groups, and without the bias:
    """),
    code("""
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
    """),
    md(r"""
    ## Takeaways

    * Softmax and sigmoid rank experts alike; they differ in the weights (and in how a bias compares with them).
    * `route_norm` makes each token's weights sum to 1, `route_scale` rescales them; neither changes the choice.
    * Group-limited routing and the expert bias change the choice; the bias never enters the weights.
    * Both frameworks choose the same experts from the same canonical weights; where scores tie
      (to float32 precision) they may not: notebook 3 shows how the parity harness reports that.

    References: Fedus, Zoph, Shazeer 2021, *Switch Transformers* (arXiv:2101.03961);
    DeepSeek-AI 2024, *DeepSeek-V2* (arXiv:2405.04434) and *DeepSeek-V3 Technical Report* (arXiv:2412.19437);
    Jiang et al. 2024, *Mixtral of Experts* (arXiv:2401.04088).
    """),
]

# ================================================================================================
BALANCING = [
    md(r"""
    # 2. Load balancing: keeping every expert busy

    Left alone, a router tends to **collapse**: an expert that wins a few more tokens early gets
    more gradient, becomes better, and wins even more tokens, until a handful of experts do all the
    work. This notebook trains a small MoE layer (top-1 of 8 experts, softmax scores) in **both
    frameworks** on a task where that happens, and compares four remedies:

    | | how | source |
    |---|---|---|
    | none | | |
    | `load_balance_loss="switch"` | add $\alpha\,E \sum_i f_i P_i$ to the loss | Switch Transformer (Fedus et al. 2021, eq. 4) |
    | `load_balance_loss="sequence"` | the same per sequence, averaged over the batch | DeepSeek-V3 (arXiv:2412.19437, eqs. 17-20) |
    | `use_expert_bias=True` | after each step, $b_i \mathrel{+}= \gamma\,\mathrm{sign}(\bar c - c_i)$ | DeepSeek-V3 sec. 2.1.2; Wang et al. 2024 (arXiv:2408.15664) |

    with $f_i$ the fraction of the $N k$ routed slots that chose expert $i$, $P_i$ the mean over tokens
    of $s_i / \sum_j s_j$, $c_i$ the tokens expert $i$ received since the last update and $\bar c$
    their mean. $f_i$ is a count (no gradient); the gradient of $\sum_i f_i P_i$ lowers the scores of
    the busiest experts. The bias needs no gradient at all: it only enters the *selection* (step 2 of
    notebook 1), never the weights, so it does not distort the loss ("auxiliary-loss-free").

    (The ST-MoE router z-loss, $c_z \cdot \mathrm{mean}(\mathrm{logsumexp}(\ell)^2)$, Zoph et al. 2022,
    arXiv:2202.08906, `router_z_loss_coeff`, keeps the logits small for stability; it does not balance.)
    """),
    code("""
    %matplotlib inline
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
    """),
    md(r"""
    ## A task that collapses

    Tokens come from 8 clusters that share a common offset $m$ (think of a frequent direction in the
    residual stream); the target is mostly one smooth function of the token, plus a cluster-specific
    linear part. Because every token has the offset, whatever raises one expert's logit along $m$
    raises it for *all* tokens, and an expert that has been trained on many tokens fits every
    cluster fairly well: the rich get richer. The initial gate leans towards expert 0 along $m$
    (about half of the tokens pick it at the first step).
    """),
    code("""
    E, D, H, CLUSTERS = 8, 16, 32, 8
    BATCH, SEQ, STEPS = 8, 32, 300
    rng = np.random.default_rng(0)
    centres = 0.5 * rng.standard_normal((CLUSTERS, D)).astype(np.float32)
    offset = rng.standard_normal(D).astype(np.float32)
    offset *= 4.0 / np.linalg.norm(offset)
    shared_map = rng.standard_normal((D, D)).astype(np.float32) / np.sqrt(D)
    cluster_maps = rng.standard_normal((CLUSTERS, D, D)).astype(np.float32) / np.sqrt(D)


    def make_batch(step):
        \"\"\"x, y [BATCH, SEQ, D] float32: the same batches for every run and both frameworks.\"\"\"
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
        \"\"\"Canonical weights with the gate tilted towards expert 0 along the shared offset.\"\"\"
        w = init_weights(cfg, seed=2)
        w["router.gate.weight"][0] += 1.5 * offset / (offset @ offset)  # +1.5 on expert 0's logit
        return w
    """),
    md(r"""
    ## Training loops

    The same loop in each framework: Adam on the mean squared error plus the balance loss that the
    layer returns in `aux["load_balance_loss"]` (when enabled); with the expert bias,
    `update_expert_bias(moe, lr)` after every step (it reads the `tokens_per_expert` counts that
    training-mode forwards accumulate, updates `expert_bias` and zeroes the counts). We record
    `aux["tokens_per_expert"]`, the load of each expert at each step. The JAX step runs under `nnx.jit`.
    """),
    code("""
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
    """),
    md(r"""
    ## Who gets the tokens

    Each panel stacks the share of the tokens each expert received (one colour per expert, moving
    average over 10 steps); top row PyTorch, bottom row JAX. Without balancing, expert 0 swallows
    everything within a few steps; each remedy brings all eight colours back.
    """),
    code("""
    plot_load_over_steps(loads, smooth=10)
    """),
    md(r"""
    The same story in one number per step, $\max_i c_i / \bar c$: 1 is perfect balance, $E = 8$ means
    every token went to one expert (solid: PyTorch, dashed: JAX).
    """),
    code("""
    plot_load_imbalance(loads, smooth=10)
    """),
    code("""
    print(f"{'':28s} {'max/mean load, last 50 steps':>30s} {'MSE, last 50 steps':>22s}")
    for name, by_framework in loads.items():
        imb = "  ".join(f"{fw} {load_imbalance(arr[-50:]).mean():4.2f}" for fw, arr in by_framework.items())
        mse = "  ".join(f"{v:.3f}" for v in final_mse[name])
        print(f"{name:28s} {imb:>30s} {mse:>22s}")
    """),
    md(r"""
    ## What to notice

    * **Collapse** without balancing: the imbalance climbs to $E$; seven experts receive no tokens
      and no gradient. On this toy target one expert fits well enough, so the loss hardly shows it;
      in a real model the collapsed layer has the capacity of one expert at the cost of eight.
    * The **switch** and **sequence-wise** losses recover within about a hundred steps. Here every
      sequence mixes all clusters, so balancing per sequence and per batch nearly coincide; the
      sequence-wise loss matters when sequences are homogeneous (DeepSeek-V3 uses it only as a
      complement, with a tiny $\alpha$).
    * The **expert bias** balances without touching the gradients. It moves by at most $\gamma$
      (`BIAS_LR`) per step, so here it first loses the race against the collapse and needs a few
      dozen steps to catch up. Its fixed step keeps nudging the experts back and forth, so it settles
      a little above the losses here; a larger $\gamma$ reacts faster but jitters more.
    * With 256 tokens per step, even a router that picks experts uniformly at random shows
      max/mean ≈ 1.35 from sampling noise alone: the balanced runs sit near that floor.
    * PyTorch and JAX follow the same curves: same weights, same data, same maths. Small float32
      differences can flip a near-tied routing decision, after which the runs drift apart slowly.
    """),
]

# ================================================================================================
PARITY = [
    md(r"""
    # 3. Parity: do PyTorch and JAX compute the same layer?

    The `parity` harness loads **one weights file** into every backend, runs the same input, and
    compares the forward output, every auxiliary tensor and loss, the gradients of a fixed objective
    and the expert-bias updates: between the backends and against a **float64 NumPy reference**
    (`parity/reference.py`), so a failing check says *which side* drifted.

    This notebook: write a weights file, load it into both frameworks by hand, run the harness
    (the `moe-parity` command and its Python API), read the report, provoke a near-tie routing
    divergence and remove it with `--lock-routing`, and measure bfloat16 against float32 error in ULPs.
    """),
    code("""
    %matplotlib inline
    import json
    from pathlib import Path

    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from rich.console import Console

    import moe_jax
    import moe_torch
    from parity import cli, reference
    from parity.backends import make_runner
    from parity.config import MoEConfig
    from parity.harness import Settings, cast_weights, make_input, run_parity
    from parity.metrics import round_to, ulp_distance
    from parity.plots import plot_error_histograms, plot_expert_load, plot_ulp_histograms
    from parity.presets import get_preset
    from parity.report import Report
    from parity.weights import init_weights, load_weights, save_weights

    torch.set_num_threads(1)  # tiny layers: one thread is fastest
    console = Console(width=150)
    """),
    md(r"""
    ## One weights file

    `moe-parity init-weights` writes deterministic canonical weights for a preset (here Mixtral's
    routing, scaled down: softmax, top-2 of 8, renormalised, weights after the experts) as
    safetensors, with the config in its metadata. `cli.main([...])` runs the command in this process,
    exactly as `moe-parity init-weights --preset mixtral-8x7b --out weights.safetensors` in a shell
    would. (`parity.weights.init_weights` + `save_weights` do the same from Python.)
    """),
    code("""
    preset = get_preset("mixtral-8x7b")
    cfg = preset.config
    print(preset.source, "|", preset.scaling)
    cli.main(["init-weights", "--preset", "mixtral-8x7b", "--out", "weights.safetensors"])
    weights = load_weights("weights.safetensors", cfg)
    print({name: list(w.shape) for name, w in weights.items()})
    """),
    md(r"""
    Loading it into both frameworks is one call each. Same input, same output, up to float32 rounding:
    """),
    code("""
    torch_moe = moe_torch.MoE(**cfg.to_kwargs())
    torch_moe.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()})
    jax_moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(jax_moe, weights)

    x = make_input(cfg, batch=2, seq_len=8, seed=0)
    with torch.no_grad():
        out_t, aux_t = torch_moe(torch.from_numpy(x), return_aux=True)
    out_j, aux_j = jax_moe(jnp.asarray(x), return_aux=True)
    print("same experts:", np.array_equal(aux_t["selected_experts"].numpy(), np.asarray(aux_j["selected_experts"])))
    print(f"max |out_torch - out_jax| = {np.abs(out_t.numpy() - np.asarray(out_j)).max():.2e}"
          f" (outputs of size ~{np.abs(out_t.numpy()).max():.1f})")
    """),
    md(r"""
    ## Run the harness

    `moe-parity run --weights weights.safetensors --out report` checks every backend present
    (absent ones, such as a GPU here, are reported as SKIP, never as passed), prints the table
    worst first and writes `report.json`, `report.md` and PNG plots to `report/`. Columns: the
    largest absolute and relative error, the largest error in ULPs (units in the last place of the
    compared dtype), the error in ULPs *at the tensor's largest magnitude*, the cosine similarity,
    and the *tolerance ratio* (below 1 passes). The command returns its exit code (0 = pass).
    """),
    code("""
    exit_code = cli.main(["run", "--weights", "weights.safetensors", "--out", "report", "--max-rows", "12", "--quiet"])
    print("exit code", exit_code)
    """),
    md(r"""
    `report.json` has stable keys: `summary`, `settings`, `environment`, `backends`, `checks` (one row
    per comparison, worst first; `id` = `kind/tensor/backend~against`), `routing` (the routing
    findings), `expert_load` and `bias_trajectory`. `parity.report.Report.load` reads it back.
    """),
    code("""
    data = json.loads(Path("report/report.json").read_text())
    print("keys:", list(data))
    print("summary:", data["summary"])
    print("backends:", [(b["name"], b["status"]) for b in data["backends"]])
    print("kinds of checks:", sorted({c["kind"] for c in data["checks"]}))
    worst_grad = next(c for c in data["checks"] if c["kind"] == "grad")
    print("worst gradient check:", {k: worst_grad[k] for k in ("id", "status", "max_abs", "ulp_at_scale", "tol_ratio")})
    report = Report.load("report/report.json")
    plot_expert_load(report, title="tokens per expert in the checked forward")
    """),
    md(r"""
    ## A near-tie routing divergence

    Top-k is discontinuous: when two experts' scores are equal to within rounding, float32 and
    float64 (or two float32 implementations) may pick different experts, and the outputs of that
    token then differ by a whole expert. The harness does not hide this inside a tolerance: it
    reports the tokens whose expert sets differ, with the **selection margin** (gap between the
    $k$-th and $(k{+}1)$-th selection score) that the float64 reference sees. All margins below
    `--tie-tol` (default $10^{-4}$): a near-tie, status WARN, and those tokens are masked from the
    token-wise comparisons; a larger margin is a FAIL (a backend chose an expert the maths does not support).

    We craft one: top-1 routing, and two gate rows (experts 0 and 1) that point along token 5 and
    differ in one weight by a single float32 ULP of $10^{-6}$. In float64 expert 1 leads by ~$10^{-14}$;
    float32 cannot resolve that and sees a tie, which goes to the lower index, expert 0. (Any other
    token whose best two experts are 0 and 1 ties the same way.)
    """),
    code("""
    tie_cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=1)  # sigmoid, top-1
    tie_weights = init_weights(tie_cfg, seed=0)
    tie_x = make_input(tie_cfg, batch=2, seq_len=8, seed=0)
    TOKEN = 5
    tok = tie_x.reshape(-1, tie_cfg.dim)[TOKEN]
    j = int(np.argmax(tok))
    row = (4.0 * tok / (tok @ tok)).astype(np.float32)  # logit ~4 for this token, far above the rest
    row[j] = np.float32(1e-6)
    gate = tie_weights["router.gate.weight"]
    gate[0], gate[1] = row, row
    gate[1, j] = np.nextafter(np.float32(1e-6), np.float32(1))  # one float32 ULP larger

    _, ref_aux = reference.moe_forward(tie_weights, tie_x, tie_cfg)
    print("float64 reference picks expert", ref_aux["selected_experts"][TOKEN, 0], "for token", TOKEN)

    runners = [make_runner("torch:cpu"), make_runner("jax:cpu")]
    tie_report = run_parity(Settings(cfg=tie_cfg, batch=2, seq_len=8, steps=0, grads=False, preset="near tie"),
                            tie_weights, runners, x=tie_x)
    for finding in tie_report.routing:
        print(f"{finding.backend:10s} vs {finding.against:10s} {finding.status}: {finding.summary()}")
        if finding.count:
            print(f"{'':24s} experts {finding.backend_experts} vs {finding.against_experts}")
    console.print(tie_report.rich_table(max_rows=6))
    """),
    md(r"""
    ## `--lock-routing`

    To compare the expert arithmetic alone, `--lock-routing` feeds every backend *and the reference*
    the first backend's `selected_experts` (the layers accept them as `moe(x, selected_experts=...)`).
    The divergence disappears, nothing is masked, and the note records which tokens had differed.
    We save the crafted weights and a config file and use the command line this time.
    """),
    code("""
    save_weights("tie.safetensors", tie_weights)
    Path("tie.json").write_text(json.dumps(tie_cfg.to_dict()))
    cli.main(["run", "--config", "tie.json", "--weights", "tie.safetensors", "--steps", "0", "--no-grads",
              "--lock-routing", "--out", "tie_locked", "--max-rows", "4", "--quiet"])
    locked = json.loads(Path("tie_locked/report.json").read_text())
    for finding in locked["routing"]:
        print(f"{finding['backend']:10s} vs {finding['against']:10s} {finding['status']}: {finding['count']} token(s) differ")
    out_row = next(c for c in locked["checks"] if c["id"] == "forward/out/jax:cpu~reference")
    print(out_row["status"], "masked tokens:", out_row["masked_tokens"], "| note:", out_row["note"])
    """),
    md(r"""
    ## bfloat16 against float32, in ULPs

    Absolute errors mean little across dtypes; **ULPs** (units in the last place) count how many
    representable numbers of the compared dtype lie between a result and the exact answer rounded to
    that dtype: 0 = correctly rounded. bfloat16 keeps 8 significant bits (ULP $= 2^{-7}$ relative),
    float32 24 bits ($2^{-23}$), so the *same* algorithm lands a few ULPs away in either, while the
    absolute error differs by a factor of ~$2^{16}$.

    Below, each layer runs in both dtypes; the exact answer is the float64 reference fed the *same*
    rounded weights and input (`parity.harness.cast_weights`, `parity.metrics.round_to`), so only
    the arithmetic differs. `parity.metrics.ulp_distance` counts the ULPs per element.
    """),
    code("""
    x = make_input(cfg, batch=4, seq_len=16, seed=1)
    ulps, abs_err = {}, {}
    for dtype, torch_dtype, jax_dtype in (("float32", torch.float32, jnp.float32),
                                          ("bfloat16", torch.bfloat16, jnp.bfloat16)):
        w = cast_weights(weights, cfg, dtype)  # rounded to dtype, returned as float64
        xr = round_to(x, dtype)
        expected, _ = reference.moe_forward(w, xr, cfg)
        t = moe_torch.MoE(**cfg.to_kwargs())
        t.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in w.items()})
        t.to(torch_dtype)
        with torch.no_grad():
            got_t = t(torch.from_numpy(xr.astype(np.float32)).to(torch_dtype)).float().numpy()
        j = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0), param_dtype=jax_dtype)
        moe_jax.load_state_dict(j, w)
        got_j = np.asarray(j(jnp.asarray(xr, dtype=jax_dtype)).astype(jnp.float32))
        for name, got in (("torch", got_t), ("jax", got_j)):
            ulps[f"{name} {dtype}"] = ulp_distance(got, expected, dtype)
            abs_err[f"{name} {dtype}"] = np.abs(got - expected).max()
    for k in ulps:
        print(f"{k:15s} max |error| {abs_err[k]:.1e}   median {np.median(ulps[k]):g} ULP, max {ulps[k].max()} ULP")
    plot_ulp_histograms(ulps, title="layer output vs float64 reference: error in ULPs of each dtype")
    """),
    md(r"""
    A few elements sit far out in the tail: outputs close to zero, where a tiny absolute error spans
    many ULPs (the spacing shrinks with the magnitude). That is why the report also gives the error
    in ULPs *at the tensor's largest magnitude* (`ulp_at_scale`). The harness does all this for
    every tensor; a bfloat16 run (no gradients, to stay quick):
    """),
    code("""
    bf16 = run_parity(Settings(cfg=cfg, dtype="bfloat16", batch=4, seq_len=16, steps=0, grads=False,
                               preset="mixtral-8x7b"), weights, runners)
    console.print(bf16.rich_table(max_rows=6))
    plot_error_histograms(bf16, kinds=("forward",))
    """),
    md(r"""
    ## Takeaways

    * One canonical weights file (safetensors, PyTorch layout) loads into both frameworks;
      the harness checks them against each other *and* against float64, so a failure names the culprit.
    * Routing near-ties are findings (WARN, with token and margin), not hidden tolerances;
      `--lock-routing` isolates the expert arithmetic.
    * Measure errors in ULPs of the compared dtype: both dtypes land a handful of ULPs from the
      exact answer (bfloat16 mostly within 1: its grid is so coarse that the final rounding
      dominates; float32 a few: the intermediate roundings of the long sums show), while their
      absolute errors differ by four orders of magnitude.

    More: `moe-parity --help`, `moe-parity presets`, `moe-parity compare a/report.json b/report.json`.
    """),
]

NOTEBOOKS = {"01_routing.ipynb": ROUTING, "02_load_balancing.ipynb": BALANCING, "03_parity.ipynb": PARITY}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(cells):
        cell = nbformat.from_dict(cell)
        cell["id"] = f"cell-{i:02d}"  # stable ids keep the diffs readable
        nb.cells.append(cell)
    return nb


def render(cells) -> str:
    return nbformat.writes(build(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a notebook differs from this script")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        text = render(cells)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/make_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
