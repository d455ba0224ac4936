"""Run ``moe_jax``'s sharded layer (DP / EP / TP with ``jax.shard_map``) on N CPU devices, in one or several
processes, and gather the results.

``run_jax_mesh(cfg, weights, x, cotangent, mesh, steps, lr, dtype, processes=1)`` mirrors
``parity.mesh_torch.run_torch_mesh`` (same arguments, same result keys). It starts ``processes`` fresh
``python -c`` subprocesses, each with ``XLA_FLAGS=--xla_force_host_platform_device_count=N/processes``
(N = the product of the mesh sizes; the flag must be set before JAX starts, which the calling process
has usually done already with one device). With ``processes > 1`` they join one JAX runtime, as the
hosts of a cluster do: ``jax.distributed.initialize(coordinator_address="127.0.0.1:<free port>",
num_processes, process_id)`` with gloo CPU collectives (``jax_cpu_collectives_implementation="gloo"``),
so ``jax.devices()`` lists all N devices and the mesh spans processes. Every process runs the same
program on global arrays (``moe_jax.parallel.place``: each builds its own shards) and gathers the
results with ``jax.experimental.multihost_utils.process_allgather``. The mesh has axes ("dp", "ep",
"tp") as given (dp and ep outermost: with 2 processes and ``ep=2`` each process holds one ep shard).
Returns NumPy arrays:

- ``"forward"``: ``out`` [B, S, D] and the aux tensors of an eval-mode ``moe_jax.parallel.sharded_call``
  (``tokens_per_expert`` the whole batch's counts, losses whole-batch values).
- ``"grad"``: gradients of ``sum(out * cotangent) + enabled aux losses`` w.r.t. ``"x"`` and every parameter
  by canonical name (full canonical shapes; expert gradients are the sharded ones, never reduced over ``ep``).
- ``"bias_steps"``: one dict per step, computed *inside* one ``shard_map`` as a data-parallel training loop
  would: each shard's training-mode ``parallel_call`` on its batch shard, then
  ``moe_jax.update_expert_bias(moe, lr, group=("dp", "ep"))`` (counts ``psum``-ed over the token
  axes): ``tokens_per_expert`` (summed), ``selected_experts`` (concatenated), ``expert_bias`` (shard 0's).
- ``"rank_spread"``: name -> max |copy - first copy| over the device copies of every replicated value, over
  every shard's own ``expert_bias`` after each step (``bias/<i>/expert_bias``), and over the processes'
  gathered results: 0 means bit-identical everywhere.
- ``"dtypes"``: ``"forward/<name>"``, ``"grad/<name>"``, ``"bias/<i>/<name>"`` -> the dtype JAX computed it in.

Errors: ``ValueError`` (before any subprocess starts) for an unknown axis, a size < 1, a batch not
divisible by ``dp * ep``, a config the mesh cannot shard (``num_experts % ep``, ``hidden_dim % tp``:
``parity.mesh_job.check_mesh``) or a ``processes`` that does not divide N (``check_processes``);
``RuntimeError`` with the failing process's exception and traceback (the others are killed);
``TimeoutError`` (all killed) after ``timeout_s`` seconds without progress (``run_worker``).

jax is imported only in the worker, so ``import parity.mesh_jax`` stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
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
    check_processes,
    report_progress,
    run_world,
    unflatten_result,
    write_job,
)

LOSSES = ("load_balance_loss", "router_z_loss")
#: environment variable telling a worker "coordinator address,num_processes,process_id"
DIST_ENV = "MOE_PARITY_JAX_DISTRIBUTED"
#: seconds ``jax.distributed.initialize`` waits for every process to join
INIT_TIMEOUT_S = 120


# ------------------------------------------------------------------------------------ parent side
def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _err_file(folder: str, process: int, processes: int) -> str:
    return os.path.join(folder, "worker.err" if processes == 1 else f"worker{process}.err")


def run_worker(fn: str, folder: str, *args, devices: int, timeout_s: float = STALL_TIMEOUT_S,
               processes: int = 1) -> None:
    """Run ``fn(folder, *args)`` ("module:function") in ``processes`` fresh Pythons with ``devices`` host
    CPU devices in all (``devices / processes`` each; with ``processes > 1`` joined by
    ``jax.distributed.initialize`` on 127.0.0.1, see the module docstring).

    Raises ``RuntimeError`` (the first failing process's exception and traceback; the others are
    killed) and ``TimeoutError`` (all killed) after ``timeout_s`` seconds *without progress*: the
    workers report progress with ``parity.mesh_job.report_progress`` (``run_jobs`` does after each job
    and stage), so a slow run on a loaded machine goes on and a hang ends (``parity.mesh_job.wait_for``).
    A process that dies makes its peers wait in a collective; they are killed at once, not left to hang.
    """
    if processes < 1 or devices % processes:
        raise ValueError(f"processes={processes} must be >= 1 and divide devices={devices}")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices // processes}"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), *sys.path, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-c", "from parity.mesh_jax import _child; _child()", fn, folder, json.dumps(args)]
    address = f"127.0.0.1:{free_port()}" if processes > 1 else None
    what = f"JAX {devices}-device worker {fn}" + (f" ({processes} processes)" if processes > 1 else "")
    with tempfile.TemporaryDirectory(prefix="moe_jax_worker_") as tmp:
        env[PROGRESS_ENV] = os.path.join(tmp, "progress.log")
        commands = [(cmd, dict(env, **({DIST_ENV: f"{address},{processes},{i}"} if address else {})))
                    for i in range(processes)]

        def failure(i, code, text):
            who = f", process {i} of {processes}," if processes > 1 else ""
            return f"{what}{who} failed (exit code {code}): {text}"

        run_world(commands, tmp, [_err_file(folder, i, processes) for i in range(processes)], timeout_s, what,
                  failure)


def _child() -> None:
    """Worker entry (``python -c``): argv = fn, folder, JSON args; with ``$MOE_PARITY_JAX_DISTRIBUTED``
    set, first ``jax.distributed.initialize`` (gloo CPU collectives). Exceptions go to
    ``folder/worker.err`` (``worker{process}.err`` with several processes); exit code 1."""
    import traceback
    from importlib import import_module

    fn_name, folder, args = sys.argv[1:4]
    dist = os.environ.get(DIST_ENV)
    process, processes = (int(dist.split(",")[2]), int(dist.split(",")[1])) if dist else (0, 1)
    try:
        if dist:
            import jax

            address = dist.split(",")[0]
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address=address, num_processes=processes, process_id=process,
                                       initialization_timeout=INIT_TIMEOUT_S)
            report_progress(f"process {process}: jax.distributed up ({jax.device_count()} devices)")
        module, _, name = fn_name.partition(":")
        getattr(import_module(module), name)(folder, *json.loads(args))
    except BaseException as exc:
        with open(_err_file(folder, process, processes), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        sys.stdout.flush()
        sys.stderr.flush()
        # NOTE: os._exit: a normal exit would wait in jax.distributed's shutdown barrier for peers
        # that may be stuck in a collective with this process
        os._exit(1)
    if dist:
        import jax

        jax.distributed.shutdown()


def run_mesh_jobs(jobs: Sequence[MeshJob], timeout_s: float = STALL_TIMEOUT_S, processes: int | None = None) -> list[dict]:
    """Run several jobs in one start of the workers (JAX start-up paid once) with as many devices as the
    largest mesh, in ``processes`` processes (default 1; ``parity.mesh_job.check_processes``).

    Returns one result dict per job (the layout of ``run_jax_mesh``). Raises as ``run_jax_mesh``.
    """
    if not jobs:
        return []
    for j in jobs:
        check_mesh(j.mesh, np.shape(j.x)[0], runner="jax", cfg=j.cfg)
    largest = max(jobs, key=lambda j: math.prod(j.mesh.values())).mesh
    devices = math.prod(largest.values())
    processes = check_processes(largest, processes, "jax")
    if processes > 1 and any(math.prod(j.mesh.values()) != devices for j in jobs):
        raise ValueError(f"jobs on meshes of different sizes {sorted({math.prod(j.mesh.values()) for j in jobs})} "
                         f"cannot share {processes} processes (each mesh must span them all); run them separately")
    with tempfile.TemporaryDirectory(prefix="moe_jax_mesh_") as tmp:
        for i, job in enumerate(jobs):
            write_job(os.path.join(tmp, f"job{i}"), job)
        run_worker("parity.mesh_jax:run_jobs", tmp, len(jobs), devices=devices, timeout_s=timeout_s,
                   processes=processes)
        return [read_result(os.path.join(tmp, f"job{i}"), processes) for i in range(len(jobs))]


def run_jax_mesh(cfg: MoEConfig, weights: Mapping[str, np.ndarray], x: np.ndarray, cotangent: np.ndarray,
                 mesh: Mapping[str, int], steps: int = 3, lr: float = 1e-3, dtype: str = "float32", *,
                 xs: Sequence[np.ndarray] | None = None, selected_experts: np.ndarray | None = None,
                 timeout_s: float = STALL_TIMEOUT_S, processes: int | None = None) -> dict:
    """The sharded JAX layer's forward, gradients and bias steps (module docstring for keys and errors).

    Args as ``parity.mesh_torch.run_torch_mesh``: ``cfg``; ``weights`` canonical (buffers optional);
    ``x`` and ``cotangent`` [B, S, D]; ``mesh`` e.g. ``{"ep": 2}``; ``steps`` bias steps (of ``xs`` when
    given, else of ``x``); ``lr``; ``dtype`` "float32" | "bfloat16" | "float16" | "float64";
    ``selected_experts`` [B*S, k] replaces the top-k of the forward/gradient run (not the bias steps);
    ``processes`` how many JAX processes share the mesh's devices (default 1).
    """
    job = MeshJob(cfg, weights, x, cotangent, dict(mesh), steps, lr, dtype, xs, selected_experts)
    return run_mesh_jobs([job], timeout_s=timeout_s, processes=processes)[0]


def _result_path(path: str, process: int) -> str:
    return f"{path}.result" + (f".p{process}" if process else "")


def read_result(path: str, processes: int = 1) -> dict:
    """Read the workers' ``path.result[.pN].npz`` / ``.json`` into the result layout; with several
    processes the spread also covers the differences between the processes' gathered results."""
    results = []
    for p in range(processes):
        with np.load(_result_path(path, p) + ".npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        with open(_result_path(path, p) + ".json") as f:
            results.append((arrays, json.load(f)))
    (first, meta), spread = results[0], dict(results[0][1]["rank_spread"])
    for arrays, other in results[1:]:
        for k, v in other["rank_spread"].items():
            spread[k] = max(spread.get(k, 0.0), v)
        for k, a in arrays.items():
            diff = float(np.max(np.abs(a.astype(np.float64) - first[k].astype(np.float64)), initial=0.0))
            spread[k] = max(spread.get(k, 0.0), diff)
    return unflatten_result(first, spread, meta["dtypes"])


# ------------------------------------------------------------------------------------ worker side
def run_jobs(folder: str, count: int) -> None:
    """Worker side of ``run_mesh_jobs``: run ``folder/job{i}`` for i < count, writing ``job{i}.result.*``."""
    for i in range(count):
        run_job(os.path.join(folder, f"job{i}"))
        report_progress(f"job {i + 1}/{count} done")


def make_mesh(mesh: Mapping[str, int]):
    """A ``jax.sharding.Mesh`` over the first prod(sizes) devices (of every process), axes in ``MESH_AXES`` order."""
    import jax
    from jax.sharding import Mesh

    names = tuple(n for n in MESH_AXES if n in mesh)
    shape = tuple(mesh[n] for n in names)
    devices = jax.devices()
    if len(devices) < math.prod(shape):
        raise RuntimeError(f"mesh {dict(mesh)} needs {math.prod(shape)} devices, JAX has {len(devices)}")
    return Mesh(np.array(devices[:math.prod(shape)]).reshape(shape), names)


def build_moe(cfg: MoEConfig, weights: Mapping[str, np.ndarray], dtype: str):
    """A ``moe_jax.MoE`` in ``dtype`` holding ``weights`` (float64 arrays; buffers float32, default 0)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import moe_jax
    from parity.backends.jax_backend import host_cast

    # traced abstractly and filled from host-cast arrays: no random initialisation or cast is compiled
    moe = nnx.eval_shape(lambda: moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0), param_dtype=jnp.dtype(dtype)))
    for _, var in nnx.to_flat_state(nnx.state(moe)):
        var.set_value(jax.device_put(np.zeros(var.shape, var.dtype)))
    mapping = {k: host_cast(v, "float32" if k in BUFFERS else dtype) for k, v in weights.items()}
    for k in BUFFERS:
        mapping.setdefault(k, np.zeros((cfg.num_experts,), np.float32))
    moe_jax.load_state_dict(moe, mapping)
    return moe


def _spread(a) -> float:
    """Max |copy - first copy| over this process's device copies of each index of a (possibly replicated) array."""
    by_index: dict = {}
    for s in getattr(a, "addressable_shards", []):
        by_index.setdefault(str(s.index), []).append(np.asarray(s.data, np.float64))
    return max((float(np.max(np.abs(c - cs[0]), initial=0.0)) for cs in by_index.values() for c in cs),
               default=0.0)


def to_host(a) -> np.ndarray:
    """The whole value of a (global) array as NumPy: gathered from every process when it spans several
    (``multihost_utils.process_allgather``; every process must call it)."""
    import jax

    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def run_job(path: str) -> None:
    import contextlib

    import jax

    with open(path + ".json") as f:
        meta = json.load(f)
    with np.load(path + ".npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    with contextlib.ExitStack() as stack:
        if meta["dtype"] == "float64":
            stack.enter_context(jax.enable_x64(True))
        out, spread, dtypes = _job(meta, arrays)
    result = _result_path(path, jax.process_index())
    np.savez(result + ".npz", **out)
    with open(result + ".json", "w") as f:
        json.dump({"rank_spread": spread, "dtypes": dtypes}, f)


def _job(meta: dict, arrays: dict) -> tuple[dict, dict, dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import moe_jax
    from moe_jax.parallel import parallel_call, param_specs, place, shard_moe, sharded_call
    from parity.backends.jax_backend import host_cast

    cfg = MoEConfig.from_dict(meta["cfg"])
    mesh = make_mesh(meta["mesh"])
    dp_axis = "dp" if "dp" in meta["mesh"] else None
    ep_axis = "ep" if "ep" in meta["mesh"] else None
    tp_axis = "tp" if "tp" in meta["mesh"] else None
    token_axes = tuple(a for a in (dp_axis, ep_axis) if a) or None  # shards with different tokens
    dtype = meta["dtype"]
    acc = jnp.float64 if dtype == "float64" else jnp.float32
    weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}

    def glob(a, spec):  # every process holds the whole host array; each places its own shards
        return place(a, NamedSharding(mesh, spec))

    out, spread, dtypes = {}, {}, {}

    def put(key, a):
        dtypes[key] = str(np.dtype(a.dtype))
        spread[key] = _spread(a)
        a = to_host(a)
        out[key] = a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64)

    if meta["extra"].get("fail") or meta["extra"].get("fail_process") == jax.process_index():  # test hooks
        raise RuntimeError(f"injected failure in the JAX mesh worker (process {jax.process_index()})")
    if meta["extra"].get("stall_process") == jax.process_index():  # test hook: this process hangs
        import time

        time.sleep(600)

    # forward + gradients (eval mode, as the JAX backend's grad)
    moe = build_moe(cfg, weights, dtype)
    moe.eval()
    shard_moe(moe, mesh, ep_axis, tp_axis, dp_axis)
    sel = None
    if "sel" in arrays:
        if arrays["sel"].size and (arrays["sel"].min() < 0 or arrays["sel"].max() >= cfg.num_experts):
            raise ValueError(f"selected_experts holds values in [{arrays['sel'].min()}, {arrays['sel'].max()}]; "
                             f"expected expert indices in [0, num_experts={cfg.num_experts})")
        sel = glob(arrays["sel"].astype(np.int32), P(token_axes))
    cot = glob(np.asarray(arrays["cot"], np.dtype(acc)), P(token_axes))

    def objective(module, x, sel, cot):
        o, aux = sharded_call(module, x, mesh, ep_axis=ep_axis, tp_axis=tp_axis, dp_axis=dp_axis, return_aux=True,
                              selected_experts=sel)
        loss = (o.astype(acc) * cot).sum()
        for key in LOSSES:
            if key in aux:
                loss = loss + aux[key].astype(acc)
        return loss, (o, aux)

    # one compiled program for the forward and both gradients (op by op, every operation compiled apart);
    # sel and cot are arguments, not constants: MoE checks a concrete sel's values, which jit cannot
    (_, (o, aux)), (g_module, g_x) = nnx.jit(nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        moe, glob(host_cast(arrays["x"], dtype), P(token_axes)), sel, cot)
    put("forward/out", o)
    for key, value in aux.items():
        put(f"forward/{key}", value)
    put("grad/x", g_x)
    for p, v in nnx.to_flat_state(g_module):
        spread["grad/" + ".".join(map(str, p))] = _spread(v[...])
    grads = jax.tree.map(to_host, g_module)
    for name, g in moe_jax.state_dict(grads).items():
        if name not in BUFFERS:
            dtypes[f"grad/{name}"] = str(g.dtype)
            out[f"grad/{name}"] = np.asarray(g, np.float64)
    report_progress(f"process {jax.process_index()}: forward + gradients")

    # bias steps: a training loop inside one shard_map, counts psum-ed by update_expert_bias over dp x ep
    steps = meta["steps"]
    if steps:
        moe = build_moe(cfg, weights, dtype)
        moe.train()
        shard_moe(moe, mesh, ep_axis, tp_axis, dp_axis)
        graphdef, state = nnx.split(moe)
        specs = param_specs(state, ep_axis, tp_axis)
        xs = glob(np.stack([host_cast(arrays[f"xs/{i}"], dtype) for i in range(steps)]), P(None, token_axes))
        shards = tuple(mesh.axis_names)

        def body(state, xs):
            m = nnx.merge(graphdef, state)
            counts, sels, biases = [], [], []
            for i in range(steps):
                _, a = parallel_call(m, xs[i], ep_axis=ep_axis, tp_axis=tp_axis, dp_axis=dp_axis, return_aux=True)
                c = m.tokens_per_expert[...]
                counts.append(c if token_axes is None else lax.psum(c, token_axes))
                sels.append(a["selected_experts"])
                moe_jax.update_expert_bias(m, meta["lr"], group=token_axes)
                biases.append(m.expert_bias[...][None])  # this shard's copy
            return jnp.stack(counts), jnp.stack(sels), jnp.stack(biases, 1)

        counts, sels, biases = jax.jit(jax.shard_map(
            body, mesh=mesh, in_specs=(specs, P(None, token_axes)),
            out_specs=(P(), P(None, token_axes), P(shards)), check_vma=False))(state, xs)
        counts_spread = _spread(counts)  # over this process's copies of the replicated counts
        counts, sels = to_host(counts), to_host(sels)
        biases = to_host(biases)  # (shards, steps, E): every shard's own expert_bias, from every process
        for i in range(steps):
            put(f"bias/{i}/tokens_per_expert", counts[i])
            spread[f"bias/{i}/tokens_per_expert"] = counts_spread
            put(f"bias/{i}/selected_experts", sels[i])
            put(f"bias/{i}/expert_bias", biases[0, i])
            spread[f"bias/{i}/expert_bias"] = float(np.max(np.abs(biases[:, i] - biases[:1, i])))
        report_progress(f"process {jax.process_index()}: bias steps")
    return out, spread, dtypes
