"""A sharded run's description, shared by the torch and JAX mesh runners.

``MeshJob`` holds the arguments of one run; ``write_job`` stores it as ``.npz`` (NumPy arrays, read back
without pickle) + ``.json`` for the worker processes; ``check_mesh`` validates a mesh before any
process starts. Pure NumPy: importing it loads no framework.

Hang detection (one place for the torch ranks and the JAX worker): a worker calls
``report_progress(label)`` after each step of its work (process group up, each job's forward,
gradients, bias steps); the parent's ``wait_for`` polls the processes and fails with ``TimeoutError``
only after ``timeout_s`` seconds *without progress*, so a slow, loaded machine is not a hang.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from parity.config import MoEConfig

#: mesh axes in mesh order (outermost first, as torchtitan's dp_shard > ep-in-dp_shard > tp): a rank's
#: token shard is its (dp, ep) index in row-major order; tp ranks share their tokens
MESH_AXES = ("dp", "ep", "tp")
BUFFERS = ("expert_bias", "tokens_per_expert")
#: environment variable naming the file a worker appends its progress lines to
PROGRESS_ENV = "MOE_PARITY_PROGRESS"
#: default bound on the seconds a sharded run may go without progress (not on its total time)
STALL_TIMEOUT_S = 300.0


def report_progress(label: str) -> None:
    """Worker side: append ``label`` as one line to the file named by ``$MOE_PARITY_PROGRESS`` (no-op
    when unset). Each call restarts the parent's no-progress clock (``wait_for``)."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (label.replace("\n", " ") + "\n").encode())
        finally:
            os.close(fd)


def wait_for(procs: Sequence, progress_path: str, timeout_s: float, what: str,
             on_exit: Callable[[list], bool], poll_s: float = 0.05) -> None:
    """Parent side: poll ``procs`` (``subprocess.Popen``) until ``on_exit(exit codes)`` returns True
    (it may raise, e.g. for a failed worker).

    Raises ``TimeoutError`` naming ``what``, the bound and the last progress line when
    ``progress_path`` (the workers' ``$MOE_PARITY_PROGRESS``) has not grown for ``timeout_s`` seconds;
    the caller terminates the processes. Between two progress lines any amount of slowness is fine.
    """
    size, last, label = -1, time.monotonic(), "none yet (starting up)"
    while not on_exit([p.poll() for p in procs]):
        now = time.monotonic()
        new = os.path.getsize(progress_path) if os.path.exists(progress_path) else 0
        if new != size:
            if new > 0:
                with open(progress_path, "rb") as f:
                    f.seek(max(0, new - 400))
                    label = f.read().decode(errors="replace").splitlines()[-1]
            size, last = new, now
        elif now - last > timeout_s:
            raise TimeoutError(f"{what}: no progress for timeout_s={timeout_s:g} s (a hang, not slowness: the "
                               f"bound restarts at every progress line; last: {label}); terminated")
        time.sleep(poll_s)


def run_world(commands: Sequence[tuple[list[str], dict]], log_dir: str, err_files: Sequence[str], timeout_s: float,
              what: str, failure: Callable[[int, int, str], str]) -> None:
    """Start one process per ``(argv, env)`` in ``commands`` and wait for all to exit 0 (``wait_for``;
    the progress file is ``env[PROGRESS_ENV]`` of the first command).

    Each process's stderr goes to ``log_dir/stderr{i}.log``; it writes its exception and traceback to
    ``err_files[i]`` before it exits non-zero. The first process to fail (by its error file's mtime; the
    others failed after it, waiting in a collective) ends the run: ``RuntimeError(failure(i, exit code,
    the last 4000 characters of its error file, or of its stderr without one))``. ``TimeoutError`` from
    ``wait_for`` on a hang. Every process still running is killed on the way out, success or not.
    """
    import subprocess

    logs = [open(os.path.join(log_dir, f"stderr{i}.log"), "wb") for i in range(len(commands))]

    def finished(codes) -> bool:
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i = min(failed, key=lambda i: os.path.getmtime(err_files[i]) if os.path.exists(err_files[i])
                    else float("inf"))
            path = err_files[i] if os.path.exists(err_files[i]) else logs[i].name
            logs[i].flush()
            with open(path, errors="replace") as f:
                text = f.read()[-4000:]
            raise RuntimeError(failure(i, codes[i], text))
        return all(c == 0 for c in codes)

    procs = []
    try:
        for (argv, env), log in zip(commands, logs, strict=True):
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log))
        wait_for(procs, commands[0][1][PROGRESS_ENV], timeout_s, what, finished)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()


@dataclass
class MeshJob:
    """One sharded run: the arguments of ``run_torch_mesh`` / ``run_jax_mesh`` (see there)."""

    cfg: MoEConfig
    weights: Mapping[str, np.ndarray]
    x: np.ndarray
    cotangent: np.ndarray
    mesh: dict[str, int]
    steps: int = 3
    lr: float = 1e-3
    dtype: str = "float32"
    xs: Sequence[np.ndarray] | None = None
    selected_experts: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def token_shards(mesh: Mapping[str, int]) -> int:
    """How many different token shards ``mesh`` has: ``dp * ep`` (tp ranks share theirs)."""
    return mesh.get("dp", 1) * mesh.get("ep", 1)


def check_mesh(mesh: Mapping[str, int], batch: int, runner: str = "torch", cfg: MoEConfig | None = None) -> None:
    """``ValueError`` for an axis not in ``MESH_AXES``, a size < 1 or a batch not divisible by
    ``dp * ep`` (each token-parallel rank takes an equal batch shard); with ``cfg`` also for sizes the
    sharded layers refuse: ``num_experts`` not divisible by ``ep`` (each ep rank owns
    ``num_experts / ep`` experts), ``hidden_dim`` or ``shared_hidden_dim`` (the shared experts'
    total) not divisible by ``tp`` (each tp rank owns a slice of the hidden units)."""
    if not mesh:
        raise ValueError("mesh is empty; expected e.g. {'ep': 2}, {'tp': 2}, {'dp': 2, 'ep': 2}")
    for axis, size in mesh.items():
        if axis not in MESH_AXES:
            raise ValueError(f"mesh axis {axis!r} is not supported by the {runner} mesh runner; supported: {MESH_AXES}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh size {axis}={size!r} must be an integer >= 1")
    ep, shards = mesh.get("ep", 1), token_shards(mesh)
    if batch % shards:
        what = f"ep={ep}" if "dp" not in mesh else f"dp*ep={shards}"
        raise ValueError(f"batch={batch} is not divisible by {what}: each token-parallel rank (shard) takes an "
                         f"equal batch shard")
    if cfg is None:
        return
    tp = mesh.get("tp", 1)
    if cfg.num_experts % ep:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by ep={ep}: each ep rank owns "
                         f"num_experts / ep experts")
    for name, value in (("hidden_dim", cfg.hidden_dim),
                        ("shared_hidden_dim", cfg.shared_dim if cfg.num_shared_experts else 0)):
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tp={tp}: each tp rank owns hidden_dim / tp "
                             f"of every expert's hidden units")


def check_processes(mesh: Mapping[str, int], processes: int | None, framework: str) -> int:
    """The number of processes a sharded ``framework`` run of ``mesh`` uses (``processes`` None: the default).

    torch: one gloo process per rank, so ``processes`` must be ``prod(mesh)`` (the default).
    jax: ``processes`` (default 1) joined by ``jax.distributed.initialize``, each with
    ``prod(mesh) / processes`` CPU devices, so it must divide ``prod(mesh)``.
    Raises ``ValueError`` naming the value and what was expected.
    """
    world = math.prod(mesh.values())
    if processes is None:
        return world if framework == "torch" else 1
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes={processes!r} must be an integer >= 1")
    if framework == "torch" and processes != world:
        raise ValueError(f"processes={processes}: the torch runner starts one gloo process per rank, so it needs "
                         f"processes = {world} (the product of the mesh sizes)")
    if world % processes:
        raise ValueError(f"processes={processes} does not divide the {world} devices of the mesh: each process "
                         f"holds the same number of devices")
    return processes


def write_job(path: str, job: MeshJob) -> None:
    """Write ``job`` as ``path.npz`` (arrays, float64 / int64) + ``path.json`` (config, mesh, steps, lr, dtype)."""
    arrays = {f"w/{k}": np.asarray(v, np.float64) for k, v in job.weights.items()}
    arrays["x"], arrays["cot"] = np.asarray(job.x, np.float64), np.asarray(job.cotangent, np.float64)
    xs = list(job.xs) if job.xs is not None else [job.x] * job.steps
    for i, xi in enumerate(xs):
        arrays[f"xs/{i}"] = np.asarray(xi, np.float64)
    if job.selected_experts is not None:
        arrays["sel"] = np.asarray(job.selected_experts, np.int64)
    np.savez(path + ".npz", **arrays)
    meta = dict(cfg=job.cfg.to_dict(), mesh=dict(job.mesh), steps=len(xs), lr=job.lr, dtype=job.dtype,
                extra=job.extra)
    with open(path + ".json", "w") as f:
        json.dump(meta, f)


def unflatten_result(flat: Mapping[str, np.ndarray], rank_spread: dict, dtypes: dict) -> dict:
    """Worker output ``{"forward/out": ..., "grad/x": ..., "bias/<i>/<name>": ...}`` -> the runners' result.

    Returns ``{"forward": {name: array}, "grad": {name: array}, "bias_steps": [{name: array}, ...],
    "rank_spread": rank_spread, "dtypes": dtypes}`` (see ``parity.mesh_torch.run_torch_mesh``).
    """
    result: dict = {"forward": {}, "grad": {}, "bias_steps": [], "rank_spread": rank_spread, "dtypes": dtypes}
    for key, value in flat.items():
        kind, _, name = key.partition("/")
        if kind == "bias":
            i, _, name = name.partition("/")
            while len(result["bias_steps"]) <= int(i):
                result["bias_steps"].append({})
            result["bias_steps"][int(i)][name] = value
        else:
            result[kind][name] = value
    return result
