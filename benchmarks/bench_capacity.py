"""Capacity rows (DESIGN.md step 6a): the whole MoE layer with a capacity vs dropless, both frameworks.

Per framework, forward+backward of ``sum(out * cotangent)`` (median of ``--rounds`` timed calls after
warm-up; JAX under ``jit``), printed side by side as ratios to that framework's dropless layer:

- torch: dropless ("auto" kernel), capacity (``capacity_factor``, same kernel), capacity padded to
  ``[E, G*C]`` rows (``capacity_pad``, fixed shapes);
- JAX: dropless ("auto"), capacity with "auto", capacity with the "static" kernel (fixed ``[E, G*C]``
  buffers, the TPU-style static-shape path).

Timings are wall-clock on whatever machine runs this (a shared CPU inflates and scatters them); the
ratio is what to compare. ``--json PATH`` writes the rows. Usage::

    python benchmarks/bench_capacity.py [--sizes D,H,E,k,B,S] [--cf 1.25] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from parity.config import MoEConfig, capacity_groups, capacity_per_expert
from parity.weights import init_weights


def _median_time(fn, rounds: int) -> float:
    fn()  # warm-up (compilation under jit)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_rows(base: MoEConfig, weights, x, cot, rounds: int) -> dict[str, float]:
    import torch

    import moe_torch

    def layer(cfg):
        moe = moe_torch.MoE(**cfg.to_kwargs())
        moe.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}, strict=False)
        return moe

    xt, ct = torch.from_numpy(x), torch.from_numpy(cot)
    rows = {}
    for name, cfg in (("dropless", base), ("capacity", base.replace(capacity_factor=CF)),
                      ("capacity padded", base.replace(capacity_factor=CF, capacity_pad=True))):
        moe = layer(cfg)

        def step(moe=moe):
            xg = xt.clone().requires_grad_(True)
            (moe(xg) * ct).sum().backward()

        rows[name] = _median_time(step, rounds)
    return rows


def jax_rows(base: MoEConfig, weights, x, cot, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import moe_jax

    @nnx.jit
    def step(moe, xj, cj):
        return nnx.grad(lambda m, v: (m(v) * cj).sum(), argnums=(0, 1))(moe, xj)

    xj, cj = jnp.asarray(x), jnp.asarray(cot)
    rows = {}
    for name, cfg in (("dropless", base), ("capacity", base.replace(capacity_factor=CF)),
                      ("capacity static", base.replace(capacity_factor=CF, expert_kernel="static"))):
        moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))
        moe_jax.load_state_dict(moe, weights, strict=False)
        rows[name] = _median_time(lambda moe=moe: jax.block_until_ready(step(moe, xj, cj)), rounds)
    return rows


CF = 1.25


def main(argv=None) -> int:
    global CF
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,512,8,2,4,256", help="D,H,E,k,B,S")
    p.add_argument("--cf", type=float, default=1.25, help="capacity_factor of the capacity rows")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write the rows to this path")
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    if len(sizes) != 6:
        raise SystemExit(f"--sizes={args.sizes!r}: expected 6 integers D,H,E,k,B,S")
    d, h, e, k, b, s = sizes
    CF = args.cf
    base = MoEConfig(dim=d, hidden_dim=h, num_experts=e, top_k=k, score_func="softmax", route_norm=True,
                     score_before_experts=False)
    weights = init_weights(base, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, s, d)).astype(np.float32)
    cot = rng.standard_normal((b, s, d)).astype(np.float32)
    groups, tokens = capacity_groups("sequence", b, s)
    cap = capacity_per_expert(base.replace(capacity_factor=CF), tokens)
    t, j = torch_rows(base, weights, x, cot, args.rounds), jax_rows(base, weights, x, cot, args.rounds)
    print(f"capacity rows: D={d} H={h} E={e} k={k} B={b} S={s}, cf={CF} (C={cap} per expert and sequence, "
          f"{groups * cap} rows per expert), float32 forward+backward, median of {args.rounds}")
    print(f"{'torch':<18}{'s':>9}{'ratio':>8}   {'jax':<18}{'s':>9}{'ratio':>8}")
    for (tn, tv), (jn, jv) in zip(t.items(), j.items(), strict=True):
        print(f"{tn:<18}{tv:>9.4f}{tv / t['dropless']:>8.2f}   {jn:<18}{jv:>9.4f}{jv / j['dropless']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes": sizes, "cf": CF, "capacity": cap, "torch": t, "jax": j}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
