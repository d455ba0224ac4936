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
# # 3. Parity: do PyTorch and JAX compute the same layer?
#
# The `parity` harness loads **one weights file** into every backend, runs the same input, and
# compares the forward output, every auxiliary tensor and loss, the gradients of a fixed objective
# and the expert-bias updates: between the backends and against a **float64 NumPy reference**
# (`parity/reference.py`), so a failing check says *which side* drifted.
#
# This notebook: write a weights file, load it into both frameworks by hand, run the harness
# (the `moe-parity` command and its Python API), read the report, provoke a near-tie routing
# divergence and remove it with `--lock-routing`, and measure bfloat16 against float32 error in ULPs.

# %%
# %matplotlib inline
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

# %% [markdown]
# ## One weights file
#
# `moe-parity init-weights` writes deterministic canonical weights for a preset (here Mixtral's
# routing, scaled down: softmax, top-2 of 8, renormalised, weights after the experts) as
# safetensors, with the config in its metadata. `cli.main([...])` runs the command in this process,
# exactly as `moe-parity init-weights --preset mixtral-8x7b --out weights.safetensors` in a shell
# would. (`parity.weights.init_weights` + `save_weights` do the same from Python.)

# %%
preset = get_preset("mixtral-8x7b")
cfg = preset.config
print(preset.source, "|", preset.scaling)
cli.main(["init-weights", "--preset", "mixtral-8x7b", "--out", "weights.safetensors"])
weights = load_weights("weights.safetensors", cfg)
print({name: list(w.shape) for name, w in weights.items()})

# %% [markdown]
# Loading it into both frameworks is one call each. Same input, same output, up to float32 rounding:

# %%
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

# %% [markdown]
# ## Run the harness
#
# `moe-parity run --weights weights.safetensors --out report` checks every backend present
# (absent ones, such as a GPU here, are reported as SKIP, never as passed), prints the table
# worst first and writes `report.json`, `report.md` and PNG plots to `report/`. Columns: the
# largest absolute and relative error, the largest error in ULPs (units in the last place of the
# compared dtype), the error in ULPs *at the tensor's largest magnitude*, the cosine similarity,
# and the *tolerance ratio* (below 1 passes). The command returns its exit code (0 = pass).

# %%
exit_code = cli.main(["run", "--weights", "weights.safetensors", "--out", "report", "--max-rows", "12", "--quiet"])
print("exit code", exit_code)

# %% [markdown]
# `report.json` has stable keys: `summary`, `settings`, `environment`, `backends`, `checks` (one row
# per comparison, worst first; `id` = `kind/tensor/backend~against`), `routing` (the routing
# findings), `expert_load` and `bias_trajectory`. `parity.report.Report.load` reads it back.

# %%
data = json.loads(Path("report/report.json").read_text())
print("keys:", list(data))
print("summary:", data["summary"])
print("backends:", [(b["name"], b["status"]) for b in data["backends"]])
print("kinds of checks:", sorted({c["kind"] for c in data["checks"]}))
worst_grad = next(c for c in data["checks"] if c["kind"] == "grad")
print("worst gradient check:", {k: worst_grad[k] for k in ("id", "status", "max_abs", "ulp_at_scale", "tol_ratio")})
report = Report.load("report/report.json")
plot_expert_load(report, title="tokens per expert in the checked forward")

# %% [markdown]
# ## A near-tie routing divergence
#
# Top-k is discontinuous: when two experts' scores are equal to within rounding, float32 and
# float64 (or two float32 implementations) may pick different experts, and the outputs of that
# token then differ by a whole expert. The harness does not hide this inside a tolerance: it
# reports the tokens whose expert sets differ, with the **selection margin** (gap between the
# $k$-th and $(k{+}1)$-th selection score) that the float64 reference sees. All margins below
# `--tie-tol` (default $10^{-4}$): a near-tie, status WARN, and those tokens are masked from the
# token-wise comparisons; a larger margin is a FAIL (a backend chose an expert the maths does not support).
#
# We craft one: top-1 routing, and two gate rows (experts 0 and 1) that point along token 5 and
# differ in one weight by a single float32 ULP of $10^{-6}$. In float64 expert 1 leads by ~$10^{-14}$;
# float32 cannot resolve that and sees a tie, which goes to the lower index, expert 0. (Any other
# token whose best two experts are 0 and 1 ties the same way.)

# %%
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

# %% [markdown]
# ## `--lock-routing`
#
# To compare the expert arithmetic alone, `--lock-routing` feeds every backend *and the reference*
# the first backend's `selected_experts` (the layers accept them as `moe(x, selected_experts=...)`).
# The divergence disappears, nothing is masked, and the note records which tokens had differed.
# We save the crafted weights and a config file and use the command line this time.

# %%
save_weights("tie.safetensors", tie_weights)
Path("tie.json").write_text(json.dumps(tie_cfg.to_dict()))
cli.main(["run", "--config", "tie.json", "--weights", "tie.safetensors", "--steps", "0", "--no-grads",
          "--lock-routing", "--out", "tie_locked", "--max-rows", "4", "--quiet"])
locked = json.loads(Path("tie_locked/report.json").read_text())
for finding in locked["routing"]:
    print(f"{finding['backend']:10s} vs {finding['against']:10s} {finding['status']}: {finding['count']} token(s) differ")
out_row = next(c for c in locked["checks"] if c["id"] == "forward/out/jax:cpu~reference")
print(out_row["status"], "masked tokens:", out_row["masked_tokens"], "| note:", out_row["note"])

# %% [markdown]
# ## bfloat16 against float32, in ULPs
#
# Absolute errors mean little across dtypes; **ULPs** (units in the last place) count how many
# representable numbers of the compared dtype lie between a result and the exact answer rounded to
# that dtype: 0 = correctly rounded. bfloat16 keeps 8 significant bits (ULP $= 2^{-7}$ relative),
# float32 24 bits ($2^{-23}$), so the *same* algorithm lands a few ULPs away in either, while the
# absolute error differs by a factor of ~$2^{16}$.
#
# Below, each layer runs in both dtypes; the exact answer is the float64 reference fed the *same*
# rounded weights and input (`parity.harness.cast_weights`, `parity.metrics.round_to`), so only
# the arithmetic differs. `parity.metrics.ulp_distance` counts the ULPs per element.

# %%
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

# %% [markdown]
# A few elements sit far out in the tail: outputs close to zero, where a tiny absolute error spans
# many ULPs (the spacing shrinks with the magnitude). That is why the report also gives the error
# in ULPs *at the tensor's largest magnitude* (`ulp_at_scale`). The harness does all this for
# every tensor; a bfloat16 run (no gradients, to stay quick):

# %%
bf16 = run_parity(Settings(cfg=cfg, dtype="bfloat16", batch=4, seq_len=16, steps=0, grads=False,
                           preset="mixtral-8x7b"), weights, runners)
console.print(bf16.rich_table(max_rows=6))
plot_error_histograms(bf16, kinds=("forward",))

# %% [markdown]
# ## Takeaways
#
# * One canonical weights file (safetensors, PyTorch layout) loads into both frameworks;
#   the harness checks them against each other *and* against float64, so a failure names the culprit.
# * Routing near-ties are findings (WARN, with token and margin), not hidden tolerances;
#   `--lock-routing` isolates the expert arithmetic.
# * Measure errors in ULPs of the compared dtype: both dtypes land a handful of ULPs from the
#   exact answer (bfloat16 mostly within 1: its grid is so coarse that the final rounding
#   dominates; float32 a few: the intermediate roundings of the long sums show), while their
#   absolute errors differ by four orders of magnitude.
#
# More: `moe-parity --help`, `moe-parity presets`, `moe-parity compare a/report.json b/report.json`.
