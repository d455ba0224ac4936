"""Do issue 15's new options slow the families that do not use them? HEAD against the working tree.

Side by side in one run: ``git archive HEAD`` of ``moe_torch``, ``moe_jax`` and ``parity`` is unpacked
into a temporary directory, and worker processes of the two trees (``PYTHONPATH`` set to one or the
other) alternate, round after round, each timing the eval-mode forward of the same layers: a Mixtral-like
router (softmax, top-2, renormalised) and a DeepSeek-V3-like one (sigmoid, expert bias, groups, a shared
expert), ``D=256, H=512, E=16``, 2048 float32 tokens, ``moe_torch`` (kernel "auto") and ``moe_jax``
(``nnx.jit``, kernel "auto"). Neither layer uses an option issue 15 added (router input norm, p-norm,
per-expert scale, expert input norm, router or expert biases, other activations), so the working
tree must match HEAD within noise. Prints each side's median over rounds of the per-round minimum
time and the ratio tree / HEAD.

Run from the repository root: ``python benchmarks/bench_options_overhead.py [--rounds 5] [--reps 20]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CONFIGS = {
    "mixtral-like": dict(dim=256, hidden_dim=512, num_experts=16, top_k=2, score_func="softmax", route_norm=True,
                         score_before_experts=False),
    "deepseek-v3-like": dict(dim=256, hidden_dim=512, num_experts=16, top_k=4, score_func="sigmoid", route_norm=True,
                             route_scale=2.5, num_expert_groups=4, num_limited_groups=2, group_score="top2_sum",
                             use_expert_bias=True, num_shared_experts=1, score_before_experts=False),
}
TOKENS = (2, 1024)

WORKER = r"""
import json, sys, time
import numpy as np
configs, reps, tokens = json.loads(sys.argv[1]), int(sys.argv[2]), tuple(json.loads(sys.argv[3]))
from parity.config import MoEConfig
from parity.weights import init_weights
out = {}
import torch
import moe_torch
import jax
from flax import nnx
import moe_jax
for name, fields in configs.items():
    cfg = MoEConfig(**fields)
    w = init_weights(cfg, 0)
    x = np.random.default_rng(0).standard_normal((*tokens, cfg.dim)).astype(np.float32)
    m = moe_torch.MoE(**cfg.to_kwargs())
    m.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    m.eval()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        for _ in range(3):
            m(xt)
        times = []
        for _ in range(reps):
            t = time.perf_counter(); m(xt); times.append(time.perf_counter() - t)
    out[f"{name}/torch"] = min(times)
    mj = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
    moe_jax.load_state_dict(mj, w)
    mj.eval()
    f = nnx.jit(lambda mod, xx: mod(xx))
    xj = jax.numpy.asarray(x)
    for _ in range(3):
        f(mj, xj).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); f(mj, xj).block_until_ready(); times.append(time.perf_counter() - t)
    out[f"{name}/jax"] = min(times)
print("RESULT " + json.dumps(out))
"""


def run_worker(tree: str, reps: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(CONFIGS), str(reps), json.dumps(TOKENS)],
                          env=env, cwd=tree, capture_output=True, text=True, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as head:
        archive = subprocess.run(["git", "-C", root, "archive", "HEAD", "moe_torch", "moe_jax", "parity"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", head], input=archive, check=True)
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        results: dict[str, list[dict[str, float]]] = {"HEAD": [], "tree": []}
        for r in range(args.rounds):
            for side, tree in (("HEAD", head), ("tree", root)) if r % 2 == 0 else (("tree", root), ("HEAD", head)):
                results[side].append(run_worker(tree, args.reps))
            print(f"round {r + 1}/{args.rounds}: HEAD {json.dumps(results['HEAD'][-1])} tree "
                  f"{json.dumps(results['tree'][-1])}", file=sys.stderr, flush=True)
    print(f"forward, eval, float32, {TOKENS[0]}x{TOKENS[1]} tokens, D=256 H=512 E=16; HEAD={rev} vs working tree; "
          f"median over {args.rounds} rounds of the min of {args.reps} calls")
    print(f"{'layer/backend':28} {'HEAD ms':>9} {'tree ms':>9} {'tree/HEAD':>9}")
    for key in results["HEAD"][0]:
        h = statistics.median(r[key] for r in results["HEAD"]) * 1e3
        t = statistics.median(r[key] for r in results["tree"]) * 1e3
        print(f"{key:28} {h:9.2f} {t:9.2f} {t / h:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
