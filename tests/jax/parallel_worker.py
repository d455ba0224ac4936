"""Worker side of tests/jax/test_parallel.py, run by ``parity.mesh_jax.run_worker`` with 4 host devices.

``jobs_then_checks(folder, count)`` runs the sharded jobs (``parity.mesh_jax.run_jobs``) and the error
checks of ``moe_jax.parallel`` on real multi-device meshes, writing ``folder/checks.json``. ``stall``
never returns (the timeout test). Imports jax only inside the functions.
"""

from __future__ import annotations

import json
import os
import time


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def jobs_then_checks(folder: str, count: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    import moe_jax
    from moe_jax.parallel import shard_moe, sharded_call
    from parity.config import MoEConfig
    from parity.mesh_jax import run_jobs

    run_jobs(folder, count)
    devices = np.array(jax.devices())
    assert devices.size == 4, devices
    ep4 = Mesh(devices, ("ep",))
    tp2 = Mesh(devices[:2], ("tp",))
    ep2tp2 = Mesh(devices.reshape(2, 2), ("ep", "tp"))

    def moe(**kw):
        cfg = MoEConfig(**{**dict(dim=8, hidden_dim=12, num_experts=8, top_k=2), **kw})
        return moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0))

    x = jnp.ones((4, 2, 8), jnp.float32)
    checks = {
        "missing_ep": _error(lambda: shard_moe(moe(), tp2, "ep")),
        "missing_tp": _error(lambda: sharded_call(moe(), x, ep4, ep_axis="ep", tp_axis="tp")),
        "not_divisible": _error(lambda: shard_moe(moe(num_experts=6), ep4, "ep")),
        "hidden_not_divisible": _error(lambda: shard_moe(moe(hidden_dim=5), ep2tp2, "ep", "tp")),
        "shared_not_divisible": _error(lambda: shard_moe(moe(num_shared_experts=1, shared_hidden_dim=5),
                                                         ep2tp2, "ep", "tp")),
        "batch_not_divisible": _error(lambda: sharded_call(moe(), x[:2], ep4)),
        "exchange": _error(lambda: sharded_call(moe(), x, ep4, exchange="nccl")),
        "not_a_mesh": _error(lambda: shard_moe(moe(), "ep")),
    }
    with open(os.path.join(folder, "checks.json"), "w") as f:
        json.dump(checks, f)


def stall(folder: str) -> None:
    time.sleep(120)


def slow_with_progress(folder: str, steps: int, pause_s: float) -> None:
    """Slow but alive: ``steps`` pauses of ``pause_s`` seconds, reporting progress after each."""
    from parity.mesh_job import report_progress

    for i in range(steps):
        time.sleep(pause_s)
        report_progress(f"slow step {i + 1}/{steps}")
