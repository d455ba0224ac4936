"""Rank-side entry points of the multi-process tests (``parity.mesh_torch.spawn("tests.torch.dist_workers:...")``).

Each function runs in every rank of a gloo world and writes what it found to JSON files in ``folder``
(``name.rank{R}.json``); the test process reads them.
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


def error_checks(rank: int, world: int) -> dict:
    """The errors of ``moe_torch.parallel`` on real meshes, and ``update_expert_bias`` over a real group."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_torch import MoE, update_expert_bias
    from moe_torch.parallel import ExpertParallel, ExpertTensorParallel, TensorParallel

    tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    ep_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    unnamed = init_device_mesh("cpu", (world,))

    def moe(**kw):
        return MoE(**{"dim": 8, "hidden_dim": 8, "num_experts": 4, **kw})

    def twice():
        m = parallelize_module(moe(), ep_mesh, ExpertParallel())
        parallelize_module(m, ep_mesh, ExpertParallel())

    out = {
        "missing_ep": _error(lambda: parallelize_module(moe(), tp_mesh, ExpertParallel())),
        "missing_tp": _error(lambda: parallelize_module(moe(), ep_mesh, ExpertTensorParallel())),
        "unnamed": _error(lambda: parallelize_module(moe(), unnamed, TensorParallel())),
        "not_divisible": _error(lambda: parallelize_module(moe(num_experts=3), ep_mesh, ExpertParallel())),
        "hidden_not_divisible": _error(lambda: parallelize_module(moe(hidden_dim=5), tp_mesh, TensorParallel())),
        "shared_not_divisible": _error(lambda: parallelize_module(
            moe(num_shared_experts=1, shared_hidden_dim=5), tp_mesh, TensorParallel())),
        "wrong_module": _error(lambda: parallelize_module(nn.Linear(4, 4), ep_mesh, ExpertParallel())),
        "twice": _error(twice),
    }
    # TP router gradient: averaged over tp after accumulation, so replicas agree even when the
    # (here deliberately) different inputs per rank would give different gradients
    m = parallelize_module(moe(), tp_mesh, TensorParallel())
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(rank))
    m(x).square().sum().backward()
    out["tp_router_grad"] = m.router.gate.weight.grad.to_local().flatten().tolist()
    # the style applied to GroupedExperts alone gives the same layer output as applied to the MoE
    outs = []
    for target in ("", "experts"):
        torch.manual_seed(0)
        m = moe(top_k=2)
        parallelize_module(m.get_submodule(target), ep_mesh, ExpertParallel())
        outs.append(m(x))
    out["experts_only_max_diff"] = float((outs[0] - outs[1]).abs().max())
    # update_expert_bias over a real group: different counts per rank, one bias everywhere
    m = moe()
    counts = torch.tensor([[5.0, 0, 1, 2], [0, 0, 7, 1], [3, 3, 3, 3], [1, 9, 0, 0]])[rank % 4]
    steps = []
    for _ in range(3):
        m.tokens_per_expert.copy_(counts)
        update_expert_bias(m, 0.125, group=dist.group.WORLD)
        steps.append(m.expert_bias.tolist())
        assert not m.tokens_per_expert.any()
    out["bias_steps"] = steps
    if world == 4:
        out.update(fsdp_checks(rank))
    return out


def fsdp_checks(rank: int) -> dict:
    """``fully_shard_moe`` on a (dp=2, ep=2) mesh: placements, local shapes, "mean" = "sum" / 4, errors."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_torch import MoE
    from moe_torch.parallel import (
        DataParallel,
        ExpertParallel,
        all_reduce_dense_grads,
        expert_data_mesh,
        fully_shard_moe,
        token_mesh,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    kw = dict(dim=8, hidden_dim=8, num_experts=4, top_k=2, num_shared_experts=1, shared_hidden_dim=8)

    def build(reduce="sum"):
        torch.manual_seed(0)
        m = parallelize_module(MoE(**kw), mesh, ExpertParallel(dp_dim="dp"), src_data_rank=None)
        return fully_shard_moe(m, mesh, reduce=reduce)

    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(rank))
    grads = {}
    for reduce in ("sum", "mean"):
        m = build(reduce)
        m(x).square().sum().backward()
        grads[reduce] = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
    ratio = max(float((grads["mean"][n] * 4 - g).abs().max()) for n, g in grads["sum"].items())
    out = {
        "placements": {n: [repr(pl) for pl in p.placements] for n, p in m.named_parameters()},
        "local_rows": {n: p.to_local().shape[0] for n, p in m.named_parameters()},
        "mean_times_4_minus_sum": ratio,
        "grad_norm": float(sum(g.square().sum() for g in grads["sum"].values())),
        "token_mesh": list(token_mesh(mesh).mesh.tolist()),
        "expert_data_mesh": list(expert_data_mesh(mesh).mesh.tolist()),
        "all_reduce_on_fsdp": _error(lambda: all_reduce_dense_grads(m, None)),
        "fsdp_bad_reduce": _error(lambda: build("avg")),
        "fsdp_missing_dp": _error(lambda: fully_shard_moe(
            parallelize_module(MoE(**kw), mesh, ExpertParallel(dp_dim="dp")), mesh, dp_dim="data")),
        "fsdp_plain_experts": _error(lambda: fully_shard_moe(
            parallelize_module(MoE(**kw), mesh, DataParallel()), mesh)),
        "fsdp_no_style": _error(lambda: fully_shard_moe(MoE(**kw), init_device_mesh("cpu", (4,), mesh_dim_names=("dp",)))),
        "data_parallel_twice": _error(lambda: parallelize_module(
            parallelize_module(MoE(**kw), mesh, DataParallel()), mesh, DataParallel())),
    }
    return out


def jobs_then_checks(rank: int, world: int, folder: str, count: int) -> None:
    """``parity.mesh_torch.run_jobs_on_rank`` on ``folder``'s jobs, then ``error_checks``."""
    from parity.mesh_torch import run_jobs_on_rank

    run_jobs_on_rank(rank, world, folder, count)
    with open(os.path.join(folder, f"checks.rank{rank}.json"), "w") as f:
        json.dump(error_checks(rank, world), f)


def stall(rank: int, world: int) -> None:
    """Rank 0 waits in an all-reduce that rank 1 never joins (it sleeps): the collective timeout ends it."""
    import torch
    import torch.distributed as dist

    if rank == 1:
        time.sleep(120)
    dist.all_reduce(torch.ones(1))
