"""Run ``moe_jax``'s sharded layer (EP / TP / EP x TP with ``jax.shard_map``) on N host devices and gather the results.

``run_jax_mesh(cfg, weights, x, cotangent, mesh, steps, lr, dtype)`` mirrors ``parity.mesh_torch.run_torch_mesh``
(same arguments, same result keys): it starts one ``python -c`` subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N = the product of the mesh sizes; the flag must
be set before JAX starts, which the calling process has usually done already with one device), builds
a ``jax.sharding.Mesh`` with axes ("ep", "tp") as given, and returns NumPy arrays:

- ``"forward"``: ``out`` [B, S, D] and the aux tensors of an eval-mode ``moe_jax.parallel.sharded_call``
  (``tokens_per_expert`` the whole batch's counts, losses whole-batch values).
- ``"grad"``: gradients of ``sum(out * cotangent) + enabled aux losses`` w.r.t. ``"x"`` and every parameter
  by canonical name (full canonical shapes; expert gradients are the sharded ones, never reduced over ``ep``).
- ``"bias_steps"``: one dict per step, computed *inside* one ``shard_map`` as a data-parallel training loop
  would: each shard's training-mode ``parallel_call`` on its batch shard, then
  ``moe_jax.update_expert_bias(moe, lr, group="ep")`` (counts ``psum``-ed over ``ep``): ``tokens_per_expert``
  (summed over ``ep``), ``selected_experts`` (concatenated), ``expert_bias`` (shard 0's).
- ``"rank_spread"``: name -> max |shard r - shard 0| over the shards' copies of every replicated value
  (and of every shard's own ``expert_bias`` after each step, ``bias/<i>/expert_bias``): 0 means bit-identical.
- ``"dtypes"``: ``"forward/<name>"``, ``"grad/<name>"``, ``"bias/<i>/<name>"`` -> the dtype JAX computed it in.

Mesh: ``{"ep": n}``, ``{"tp": n}`` or ``{"ep": n, "tp": m}``; shards along ``ep`` take consecutive batch
shards (``B % ep == 0``). Errors: ``ValueError`` (before the subprocess starts) for an unknown axis, a
size < 1, a batch not divisible by ``ep`` or a config the mesh cannot shard (``num_experts % ep``,
``hidden_dim % tp``: ``parity.mesh_job.check_mesh``); ``RuntimeError`` with the worker's exception and
traceback when it fails; ``TimeoutError`` (the worker is killed) after ``timeout_s`` seconds without
progress (``run_worker``).

jax is imported only in the worker, so ``import parity.mesh_jax`` stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
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
    report_progress,
    unflatten_result,
    wait_for,
    write_job,
)

LOSSES = ("load_balance_loss", "router_z_loss")


# ------------------------------------------------------------------------------------ parent side
def run_worker(fn: str, folder: str, *args, devices: int, timeout_s: float = STALL_TIMEOUT_S) -> None:
    """Run ``fn(folder, *args)`` ("module:function") in a fresh Python with ``devices`` host CPU devices.

    Raises ``RuntimeError`` (the worker's exception and traceback) when it fails and ``TimeoutError``
    (the worker killed) after ``timeout_s`` seconds *without progress*: the worker reports progress
    with ``parity.mesh_job.report_progress`` (``run_jobs`` does after each job and stage), so a slow
    run on a loaded machine goes on and a hang ends (``parity.mesh_job.wait_for``).
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), *sys.path, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-c", "from parity.mesh_jax import _child; _child()", fn, folder, json.dumps(args)]
    with tempfile.TemporaryDirectory(prefix="moe_jax_worker_") as tmp:
        env[PROGRESS_ENV] = os.path.join(tmp, "progress.log")
        with open(os.path.join(tmp, "stderr.log"), "w+b") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
            try:
                wait_for([proc], env[PROGRESS_ENV], timeout_s, f"JAX {devices}-device worker {fn}",
                         lambda codes: codes[0] is not None)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            log.seek(0)
            stderr = log.read().decode(errors="replace")
    if proc.returncode != 0:
        err = os.path.join(folder, "worker.err")
        text = open(err).read() if os.path.exists(err) else stderr
        raise RuntimeError(f"JAX {devices}-device worker {fn} failed (exit code {proc.returncode}): {text[-4000:]}")


def _child() -> None:
    """Worker entry (``python -c``): argv = fn, folder, JSON args; exceptions go to ``folder/worker.err``."""
    import traceback
    from importlib import import_module

    fn_name, folder, args = sys.argv[1:4]
    try:
        module, _, name = fn_name.partition(":")
        getattr(import_module(module), name)(folder, *json.loads(args))
    except BaseException as exc:
        with open(os.path.join(folder, "worker.err"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        sys.exit(1)


def run_mesh_jobs(jobs: Sequence[MeshJob], timeout_s: float = STALL_TIMEOUT_S) -> list[dict]:
    """Run several jobs in one worker (JAX start-up paid once) with as many devices as the largest mesh.

    Returns one result dict per job (the layout of ``run_jax_mesh``). Raises as ``run_jax_mesh``.
    """
    if not jobs:
        return []
    for j in jobs:
        check_mesh(j.mesh, np.shape(j.x)[0], runner="jax", cfg=j.cfg)
    with tempfile.TemporaryDirectory(prefix="moe_jax_mesh_") as tmp:
        for i, job in enumerate(jobs):
            write_job(os.path.join(tmp, f"job{i}"), job)
        devices = max(math.prod(j.mesh.values()) for j in jobs)
        run_worker("parity.mesh_jax:run_jobs", tmp, len(jobs), devices=devices, timeout_s=timeout_s)
        return [read_result(os.path.join(tmp, f"job{i}")) for i in range(len(jobs))]


def run_jax_mesh(cfg: MoEConfig, weights: Mapping[str, np.ndarray], x: np.ndarray, cotangent: np.ndarray,
                 mesh: Mapping[str, int], steps: int = 3, lr: float = 1e-3, dtype: str = "float32", *,
                 xs: Sequence[np.ndarray] | None = None, selected_experts: np.ndarray | None = None,
                 timeout_s: float = STALL_TIMEOUT_S) -> dict:
    """The sharded JAX layer's forward, gradients and bias steps (module docstring for keys and errors).

    Args as ``parity.mesh_torch.run_torch_mesh``: ``cfg``; ``weights`` canonical (buffers optional);
    ``x`` and ``cotangent`` [B, S, D]; ``mesh`` e.g. ``{"ep": 2}``; ``steps`` bias steps (of ``xs`` when
    given, else of ``x``); ``lr``; ``dtype`` "float32" | "bfloat16" | "float16" | "float64";
    ``selected_experts`` [B*S, k] replaces the top-k of the forward/gradient run (not the bias steps).
    """
    job = MeshJob(cfg, weights, x, cotangent, dict(mesh), steps, lr, dtype, xs, selected_experts)
    return run_mesh_jobs([job], timeout_s=timeout_s)[0]


def read_result(path: str) -> dict:
    """Read ``path.result.npz`` / ``.json`` (written by the worker) into the result layout."""
    with np.load(f"{path}.result.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    with open(f"{path}.result.json") as f:
        meta = json.load(f)
    return unflatten_result(arrays, meta["rank_spread"], meta["dtypes"])


# ------------------------------------------------------------------------------------ worker side
def run_jobs(folder: str, count: int) -> None:
    """Worker side of ``run_mesh_jobs``: run ``folder/job{i}`` for i < count, writing ``job{i}.result.*``."""
    for i in range(count):
        run_job(os.path.join(folder, f"job{i}"))
        report_progress(f"job {i + 1}/{count} done")


def make_mesh(mesh: Mapping[str, int]):
    """A ``jax.sharding.Mesh`` over the first prod(sizes) devices, axes in ``MESH_AXES`` order."""
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
    """Max |copy - first copy| over the device copies of each index of a (possibly replicated) array."""
    by_index: dict = {}
    for s in getattr(a, "addressable_shards", []):
        by_index.setdefault(str(s.index), []).append(np.asarray(s.data, np.float64))
    return max((float(np.max(np.abs(c - cs[0]), initial=0.0)) for cs in by_index.values() for c in cs),
               default=0.0)


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
    np.savez(f"{path}.result.npz", **out)
    with open(f"{path}.result.json", "w") as f:
        json.dump({"rank_spread": spread, "dtypes": dtypes}, f)


def _job(meta: dict, arrays: dict) -> tuple[dict, dict, dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax import lax
    from jax.sharding import PartitionSpec as P

    import moe_jax
    from moe_jax.parallel import parallel_call, param_specs, shard_moe, sharded_call
    from parity.backends.jax_backend import host_cast

    cfg = MoEConfig.from_dict(meta["cfg"])
    mesh = make_mesh(meta["mesh"])
    ep_axis = "ep" if "ep" in meta["mesh"] else None
    tp_axis = "tp" if "tp" in meta["mesh"] else None
    dtype = meta["dtype"]
    acc = jnp.float64 if dtype == "float64" else jnp.float32
    weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}

    def as_x(a):
        return jax.device_put(host_cast(a, dtype))

    out, spread, dtypes = {}, {}, {}

    def put(key, a):
        dtypes[key] = str(np.dtype(a.dtype))
        spread[key] = _spread(a)
        a = np.asarray(a)
        out[key] = a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64)

    if meta["extra"].get("fail"):  # test hook: the worker fails
        raise RuntimeError("injected failure in the JAX mesh worker")

    # forward + gradients (eval mode, as the JAX backend's grad)
    moe = build_moe(cfg, weights, dtype)
    moe.eval()
    shard_moe(moe, mesh, ep_axis, tp_axis)
    sel = None
    if "sel" in arrays:
        if arrays["sel"].size and (arrays["sel"].min() < 0 or arrays["sel"].max() >= cfg.num_experts):
            raise ValueError(f"selected_experts holds values in [{arrays['sel'].min()}, {arrays['sel'].max()}]; "
                             f"expected expert indices in [0, num_experts={cfg.num_experts})")
        sel = jax.device_put(arrays["sel"].astype(np.int32))
    cot = jax.device_put(np.asarray(arrays["cot"], np.dtype(acc)))

    def objective(module, x, sel, cot):
        o, aux = sharded_call(module, x, mesh, ep_axis=ep_axis, tp_axis=tp_axis, return_aux=True,
                              selected_experts=sel)
        loss = (o.astype(acc) * cot).sum()
        for key in LOSSES:
            if key in aux:
                loss = loss + aux[key].astype(acc)
        return loss, (o, aux)

    # one compiled program for the forward and both gradients (op by op, every operation compiled apart);
    # sel and cot are arguments, not constants: MoE checks a concrete sel's values, which jit cannot
    (_, (o, aux)), (g_module, g_x) = nnx.jit(nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        moe, as_x(arrays["x"]), sel, cot)
    put("forward/out", o)
    for key, value in aux.items():
        put(f"forward/{key}", value)
    put("grad/x", g_x)
    grads = g_module
    for name, g in moe_jax.state_dict(grads).items():
        if name not in BUFFERS:
            dtypes[f"grad/{name}"] = str(g.dtype)
            out[f"grad/{name}"] = np.asarray(g, np.float64)
    for p, v in nnx.to_flat_state(grads):
        spread["grad/" + ".".join(map(str, p))] = _spread(v[...])
    report_progress("forward + gradients")

    # bias steps: a training loop inside one shard_map, counts psum-ed by update_expert_bias(group="ep")
    steps = meta["steps"]
    if steps:
        moe = build_moe(cfg, weights, dtype)
        moe.train()
        graphdef, state = nnx.split(moe)
        specs = param_specs(state, ep_axis, tp_axis)
        xs = jax.device_put(np.stack([host_cast(arrays[f"xs/{i}"], dtype) for i in range(steps)]))
        shards = tuple(mesh.axis_names)

        def body(state, xs):
            m = nnx.merge(graphdef, state)
            counts, sels, biases = [], [], []
            for i in range(steps):
                _, a = parallel_call(m, xs[i], ep_axis=ep_axis, tp_axis=tp_axis, return_aux=True)
                c = m.tokens_per_expert[...]
                counts.append(c if ep_axis is None else lax.psum(c, ep_axis))
                sels.append(a["selected_experts"])
                moe_jax.update_expert_bias(m, meta["lr"], group=ep_axis)
                biases.append(m.expert_bias[...][None])  # this shard's copy
            return jnp.stack(counts), jnp.stack(sels), jnp.stack(biases, 1)

        counts, sels, biases = jax.jit(jax.shard_map(
            body, mesh=mesh, in_specs=(specs, P(None, ep_axis)),
            out_specs=(P(), P(None, ep_axis), P(shards)), check_vma=False))(state, xs)
        biases = np.asarray(biases)  # (shards, steps, E): every shard's own expert_bias
        for i in range(steps):
            put(f"bias/{i}/tokens_per_expert", counts[i])
            put(f"bias/{i}/selected_experts", sels[i])
            put(f"bias/{i}/expert_bias", biases[0, i])
            spread[f"bias/{i}/expert_bias"] = float(np.max(np.abs(biases[:, i] - biases[:1, i])))
    return out, spread, dtypes
