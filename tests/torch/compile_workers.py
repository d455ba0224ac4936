"""Rank-side entry point of the compiled sharded-layer test (``parity.mesh_torch.spawn``; issue 18)."""

from __future__ import annotations

import copy
import json
import os


def compiled_expert_parallel(rank: int, world: int, folder: str, backend: str) -> None:
    """``torch.compile(moe, fullgraph=False)`` of an ``ExpertParallel`` layer against the same layer eager.

    Writes ``compile.rank{R}.json``: max |compiled - eager| of the output and of every gradient over three
    training steps with different routings, the number of graphs dynamo compiled and its graph breaks.
    """
    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_torch import MoE
    from moe_torch.parallel import ExpertParallel

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    eager = MoE(16, 32, 4, top_k=2, expert_kernel="grouped_mm", load_balance_coeff=0.01)
    comp = copy.deepcopy(eager)
    for m in (eager, comp):
        parallelize_module(m, mesh, ExpertParallel())
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(comp, backend=counter, fullgraph=False)
    gen = torch.Generator().manual_seed(10 + rank)
    worst: dict[str, float] = {}
    counts, frames = [], []
    for _ in range(3):
        x = torch.randn(2, 8, 16, generator=gen)
        results = []
        for module, call in ((eager, eager), (comp, compiled)):
            xt = x.clone().requires_grad_()
            out, aux = call(xt, return_aux=True)
            (out.square().sum() + aux["load_balance_loss"]).backward()
            grads = {"x": xt.grad}
            for name, p in module.named_parameters():
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                grads[name] = g.clone()
                p.grad = None
            results.append({"out": out.detach(), **grads})
            if module is eager:
                counts.append(aux["tokens_per_expert"].tolist())
        frames.append(counter.frame_count)
        for key in results[0]:
            diff = float((results[0][key] - results[1][key]).abs().max())
            worst[key] = max(worst.get(key, 0.0), diff)
    with open(os.path.join(folder, f"compile.rank{rank}.json"), "w") as f:
        json.dump({"max_diff": worst, "frames": counter.frame_count, "frames_after_call": frames,
                   "graph_breaks": sum(counters["graph_break"].values()),
                   "break_reasons": sorted({r.splitlines()[0][:200] for r in counters["graph_break"]}),
                   "counts": counts}, f)
