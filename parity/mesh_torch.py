"""Run ``moe_torch``'s sharded layer (EP / TP / EP x TP) in real gloo processes and gather the results.

``run_torch_mesh(cfg, weights, x, cotangent, mesh, steps, lr, dtype)`` spawns ``prod(mesh.values())``
CPU processes (``python -c`` subprocesses, gloo, a ``FileStore`` rendezvous in a temporary folder, so no
port is needed), parallelises ``moe_torch.MoE`` with ``moe_torch.parallel`` and returns NumPy arrays:

- ``"forward"``: ``out`` [B, S, D] and the aux tensors (DESIGN.md keys: ``router_logits``, ``scores``,
  ``selected_experts`` (int64), ``routing_weights``, ``tokens_per_expert`` (counts of that forward
  summed over ranks), and the enabled losses (whole-batch values, see ``moe_torch.parallel``)), all
  of the concatenated batch, from an eval-mode forward (the torch backend's ``forward`` keys).
- ``"grad"``: gradients of ``sum(out * cotangent) + enabled aux losses`` w.r.t. ``"x"`` [B, S, D] and
  every parameter by canonical name, gathered to the full canonical shape (the backend's ``grad``
  keys): expert gradients are the sharded ones gathered, never reduced over ``ep``; dense gradients
  are summed over the token-parallel (dp x ep) ranks (``all_reduce_dense_grads``, or FSDP with dp).
- ``"bias_steps"``: one dict per step (``steps`` training-mode forwards of ``xs[i]``, or of ``x``
  each time when ``xs`` is None, each followed by ``update_expert_bias(moe, lr, group=dp x ep ranks)``):
  ``tokens_per_expert`` (the buffer before the update, summed over the dp x ep ranks),
  ``selected_experts`` (concatenated), ``expert_bias`` (after the update), as the backend's ``bias_steps``.
- ``"rank_spread"``: name -> max |rank r - rank 0| over all ranks of every value above (each rank
  gathers the full result): 0 means the ranks agree bit for bit (``bias_steps`` keys as ``bias/i/name``).
- ``"dtypes"``: ``"forward/<name>"``, ``"grad/<name>"``, ``"bias/<i>/<name>"`` -> the dtype torch computed it in.

Mesh: ``{"ep": n}`` -> ``ExpertParallel``, ``{"tp": n}`` -> ``TensorParallel``, ``{"ep": n, "tp": m}``
-> ``ExpertTensorParallel`` on an (ep, tp) mesh. With ``"dp"`` (mesh order dp, ep, tp) the style gets
``dp_dim="dp"`` (``DataParallel`` for dp alone) and the layer is put under FSDP2 by
``moe_torch.parallel.fully_shard_moe`` (experts over dp, the rest over dp x ep, gradients *summed*:
each rank's loss sums its tokens, so the sum over ranks is the single-device gradient of the full
batch); dense gradients then come from FSDP's reduce-scatter, not ``all_reduce_dense_grads``.
Ranks along dp x ep (row-major) take consecutive batch shards (``B % (dp * ep) == 0`` required);
ranks along ``tp`` take the same shard.

Errors: ``ValueError`` for an unknown mesh axis, a size < 1, a batch not divisible by ``dp * ep``, or a config
the mesh cannot shard (``parity.mesh_job.check_mesh``: ``num_experts % ep``, ``hidden_dim % tp``) (before any
process starts); ``RuntimeError`` naming the rank and its exception when a rank fails (the other
ranks are terminated); ``TimeoutError`` when the ranks make no progress for ``timeout_s`` seconds
(a hang; all ranks terminated; see ``spawn``).

torch is imported lazily (inside the functions), so ``import parity.mesh_torch`` stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from parity.config import MoEConfig
from parity.mesh_job import (
    BUFFERS,
    MESH_AXES,
    PROGRESS_ENV,
    STALL_TIMEOUT_S,
    MeshJob,
    check_mesh,
    report_progress,
    run_world,
    unflatten_result,
    write_job,
)

INIT_TIMEOUT_S = 60


# ------------------------------------------------------------------------------------ spawning
def _child() -> None:
    """Entry point of one rank (``python -c ...``): argv = fn ("module:function"), rank, world, folder,
    collective timeout, JSON args. Builds the gloo group (``timeout`` on every collective), runs
    ``fn(rank, world, *args)`` and a final barrier, writes any exception with its traceback to
    ``folder/rank{R}.err``; exits 0 or 1."""
    import sys
    import traceback

    fn_name, rank, world, folder, timeout_s, args = sys.argv[1:7]
    rank, world = int(rank), int(world)
    try:
        from datetime import timedelta
        from importlib import import_module

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        module, _, name = fn_name.partition(":")
        fn = getattr(import_module(module), name)
        store = dist.FileStore(os.path.join(folder, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=float(timeout_s)))
        report_progress(f"rank {rank}: process group up")
        fn(rank, world, *json.loads(args))
        dist.barrier()  # every rank is past its last collective
    except BaseException as exc:
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        code = 1
    else:
        code = 0
    # NOTE: os._exit skips the interpreter's teardown, where gloo's threads, still referenced by DTensor
    # meshes and autograd graphs, sometimes abort ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(fn: str, world: int, *args, timeout_s: float = STALL_TIMEOUT_S,
          collective_timeout_s: float = INIT_TIMEOUT_S) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh Python processes joined by a gloo process group.

    ``fn`` is "package.module:function" (imported by each rank; no pickling, and the caller's
    ``__main__`` is never re-imported); ``args`` must be JSON-serialisable. The rendezvous is a
    ``FileStore`` in a temporary folder (no port). The first rank to fail ends the run: the others are
    terminated and ``RuntimeError("rank R failed: <exception>\n<traceback>")`` is raised. After
    ``timeout_s`` seconds *without progress* (no rank called ``parity.mesh_job.report_progress``; the
    process group coming up counts) every rank is terminated and ``TimeoutError`` raised, so a hang
    is caught and slowness is not; every collective also times out after ``collective_timeout_s``
    (``init_process_group(timeout=...)``).
    """
    import sys

    with tempfile.TemporaryDirectory(prefix="moe_mesh_") as tmp:
        cmd = [sys.executable, "-c", "from parity.mesh_torch import _child; _child()", fn]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env[PROGRESS_ENV] = os.path.join(tmp, "progress.log")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), *sys.path, env.get("PYTHONPATH", "")) if p)
        commands = [([*cmd, str(r), str(world), tmp, str(collective_timeout_s), json.dumps(args)], env)
                    for r in range(world)]
        run_world(commands, tmp, [os.path.join(tmp, f"rank{r}.err") for r in range(world)], timeout_s,
                  f"{world}-process run of {fn}",
                  lambda r, code, text: f"rank {r} of {world} failed (exit code {code}): {text}")


def run_mesh_jobs(jobs: Sequence[MeshJob], timeout_s: float = STALL_TIMEOUT_S) -> list[dict]:
    """Run several jobs in one spawned world (start-up paid once); every job's mesh must have the same size.

    Returns one result dict per job (the layout of ``run_torch_mesh``). Raises as ``run_torch_mesh``.
    """
    if not jobs:
        return []
    worlds = {math.prod(j.mesh.values()) for j in jobs}
    for j in jobs:
        check_mesh(j.mesh, np.shape(j.x)[0], cfg=j.cfg)
    if len(worlds) != 1:
        raise ValueError(f"jobs need different world sizes {sorted(worlds)}; run them separately")
    with tempfile.TemporaryDirectory(prefix="moe_mesh_jobs_") as tmp:
        for i, job in enumerate(jobs):
            write_job(os.path.join(tmp, f"job{i}"), job)
        world = worlds.pop()
        spawn("parity.mesh_torch:run_jobs_on_rank", world, tmp, len(jobs), timeout_s=timeout_s)
        return [collect_job(os.path.join(tmp, f"job{i}"), world) for i in range(len(jobs))]


def run_torch_mesh(cfg: MoEConfig, weights: Mapping[str, np.ndarray], x: np.ndarray, cotangent: np.ndarray,
                   mesh: Mapping[str, int], steps: int = 3, lr: float = 1e-3, dtype: str = "float32", *,
                   xs: Sequence[np.ndarray] | None = None, selected_experts: np.ndarray | None = None,
                   timeout_s: float = STALL_TIMEOUT_S) -> dict:
    """The sharded layer's forward, gradients and bias steps (module docstring for keys and errors).

    Args: ``cfg``; ``weights`` canonical (``expert_bias`` / ``tokens_per_expert`` optional, default 0);
    ``x`` [B, S, D] and ``cotangent`` [B, S, D] (any float array, cast to ``dtype``); ``mesh`` e.g.
    ``{"ep": 2}``; ``steps`` bias steps (of ``xs`` when given, else of ``x``); ``lr`` the bias rate;
    ``dtype`` "float32" | "bfloat16" | "float16" | "float64"; ``selected_experts`` [B*S, k] replaces
    the top-k of the forward/gradient run (not the bias steps).
    """
    job = MeshJob(cfg, weights, x, cotangent, dict(mesh), steps, lr, dtype, xs, selected_experts)
    return run_mesh_jobs([job], timeout_s=timeout_s)[0]


def collect_job(path: str, world: int) -> dict:
    """Read the ranks' ``path.rank{R}.npz`` files into the result layout of ``run_torch_mesh``."""
    ranks = []
    for r in range(world):
        with np.load(f"{path}.rank{r}.npz", allow_pickle=False) as z:
            ranks.append({k: z[k] for k in z.files})
    with open(f"{path}.rank0.json") as f:
        dtypes = json.load(f)
    first = ranks[0]
    spread = {k: max(float(np.max(np.abs(r[k].astype(np.float64) - first[k].astype(np.float64)), initial=0.0))
                     for r in ranks) for k in first}
    return unflatten_result(first, spread, dtypes)


# ----------------------------------------------------------------------------------- rank side
def run_jobs_on_rank(rank: int, world: int, folder: str, count: int) -> None:
    """Rank side of ``run_mesh_jobs``: run ``folder/job{i}`` for i < count, writing ``job{i}.rank{rank}.*``."""
    for i in range(count):
        _run_job(rank, os.path.join(folder, f"job{i}"))
        report_progress(f"rank {rank}: job {i + 1}/{count} done")


def build_sharded_moe(cfg: MoEConfig, weights: Mapping[str, np.ndarray], dtype: str, device_mesh, train: bool,
                      fsdp: bool = True):
    """A ``moe_torch.MoE`` loaded with ``weights`` (float64 arrays), cast to ``dtype``, parallelised on
    ``device_mesh`` (dims "dp", "ep" and/or "tp"): the ep/tp style (with ``dp_dim="dp"`` when the mesh
    has "dp", ``DataParallel`` for "dp" alone), then with "dp" and ``fsdp`` FSDP2 by ``fully_shard_moe``
    (sum reduction; ``fsdp=False``: parameters replicated over "dp", gradients for
    ``all_reduce_dense_grads``). float64 uses the exact "loop" kernel, as the torch backend."""
    import torch
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_torch import MoE
    from moe_torch.parallel import (
        DataParallel,
        ExpertParallel,
        ExpertTensorParallel,
        TensorParallel,
        fully_shard_moe,
    )

    if dtype == "float64":
        cfg = cfg.replace(expert_kernel="loop")
    moe = MoE(**cfg.to_kwargs())
    tdtype = getattr(torch, dtype)
    moe = moe.to(tdtype)
    state = {k: torch.from_numpy(np.asarray(v, np.float64)).to(torch.float32 if k in BUFFERS else tdtype)
             for k, v in weights.items()}
    for k in BUFFERS:
        state.setdefault(k, torch.zeros(cfg.num_experts))
    moe.load_state_dict(state)
    names = set(device_mesh.mesh_dim_names)
    dp = "dp" if "dp" in names else None
    style = (ExpertTensorParallel(dp_dim=dp) if {"ep", "tp"} <= names else
             ExpertParallel(dp_dim=dp) if "ep" in names else
             TensorParallel(dp_dim=dp) if "tp" in names else DataParallel())
    moe = parallelize_module(moe, device_mesh, style, src_data_rank=None)
    if dp and fsdp:
        fully_shard_moe(moe, device_mesh, reduce="sum")
    return moe.train(train)


def _run_job(rank: int, path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from moe_torch import update_expert_bias
    from moe_torch.parallel import all_reduce_dense_grads, expert_data_mesh, token_mesh

    with open(path + ".json") as f:
        meta = json.load(f)
    with np.load(path + ".npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    cfg = MoEConfig.from_dict(meta["cfg"])
    mesh = meta["mesh"]
    names = tuple(n for n in MESH_AXES if n in mesh)
    dm = init_device_mesh("cpu", tuple(mesh[n] for n in names), mesh_dim_names=names)
    tokens = token_mesh(dm)  # dp x ep flattened: the ranks holding different batch shards
    group = None if tokens is None else tokens.get_group()
    shards, me = (tokens.size(), tokens.get_local_rank()) if tokens is not None else (1, 0)
    weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}
    dtype = meta["dtype"]
    tdtype = getattr(torch, dtype)
    acc = torch.float64 if dtype == "float64" else torch.float32

    def shard(a):  # this rank's batch (or token-row) shard
        n = a.shape[0] // shards
        return a[me * n:(me + 1) * n]

    def gather(t, op="cat"):
        t = t.detach()
        if group is None:
            return t
        if op == "sum":
            t = t.clone()
            dist.all_reduce(t, group=group)
            return t
        parts = [torch.empty_like(t) for _ in range(shards)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts)

    out_arrays, dtypes = {}, {}

    def put(key, t):
        t = t.detach()
        dtypes[key] = str(t.dtype).removeprefix("torch.")
        out_arrays[key] = t.numpy() if not t.is_floating_point() else t.double().numpy()

    # forward + gradients (eval mode, as the torch backend's grad)
    fsdp = meta["extra"].get("fsdp", True)  # test hook: dp without FSDP (all_reduce_dense_grads)
    moe = build_sharded_moe(cfg, weights, dtype, dm, train=False, fsdp=fsdp)
    x = torch.from_numpy(shard(arrays["x"])).to(tdtype).requires_grad_(True)
    kwargs = {"selected_experts": torch.from_numpy(shard(arrays["sel"]))} if "sel" in arrays else {}
    if meta["extra"].get("fail_rank") == rank:  # test hook: this rank fails after the others entered a collective
        raise RuntimeError(f"injected failure on rank {rank}")
    out, aux = moe(x, return_aux=True, **kwargs)
    loss = (out.to(acc) * torch.from_numpy(shard(arrays["cot"])).to(acc)).sum()
    for key in ("load_balance_loss", "router_z_loss"):
        if key in aux:
            loss = loss + aux[key].to(acc)
    loss.backward()
    if "dp" not in mesh:  # dense gradients summed over ep; the experts' already hold every ep rank's tokens
        all_reduce_dense_grads(moe, group)
    elif not fsdp:  # plain data parallel: experts summed over the dp ranks holding them, the rest over dp x ep
        all_reduce_dense_grads(moe, group, expert_data_mesh(dm).get_group())
    # else: fully_shard_moe's reduce-scatters already summed them over the same groups
    put("forward/out", gather(out))
    for key, value in aux.items():
        if key in ("load_balance_loss", "router_z_loss"):
            put(f"forward/{key}", value)
        else:
            put(f"forward/{key}", gather(value, "sum" if key == "tokens_per_expert" else "cat"))
    put("grad/x", gather(x.grad))
    for name, p in moe.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        put(f"grad/{name}", g.full_tensor() if isinstance(g, DTensor) else g)
    report_progress(f"rank {rank}: {os.path.basename(path)} forward + gradients")

    # bias steps (training mode, a fresh module as the torch backend's bias_steps)
    moe = build_sharded_moe(cfg, weights, dtype, dm, train=True, fsdp=fsdp)
    for i in range(meta["steps"]):
        with torch.no_grad():
            _, aux = moe(torch.from_numpy(shard(arrays[f"xs/{i}"])).to(tdtype), return_aux=True)
            put(f"bias/{i}/tokens_per_expert", gather(moe.tokens_per_expert, "sum"))
            put(f"bias/{i}/selected_experts", gather(aux["selected_experts"]))
            update_expert_bias(moe, meta["lr"], group=group)
            put(f"bias/{i}/expert_bias", moe.expert_bias)
        report_progress(f"rank {rank}: {os.path.basename(path)} bias step {i + 1}")
    np.savez(f"{path}.rank{rank}.npz", **out_arrays)
    with open(f"{path}.rank{rank}.json", "w") as f:
        json.dump(dtypes, f)
