"""A sharded run's description, shared by the torch and JAX mesh runners.

``MeshJob`` holds the arguments of one run; ``write_job`` stores it as ``.npz`` (NumPy arrays, read back
without pickle) + ``.json`` for the worker processes; ``check_mesh`` validates a mesh before any
process starts. Pure NumPy: importing it loads no framework.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from parity.config import MoEConfig

MESH_AXES = ("ep", "tp")
BUFFERS = ("expert_bias", "tokens_per_expert")


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


def check_mesh(mesh: Mapping[str, int], batch: int, runner: str = "torch") -> None:
    """``ValueError`` for an axis not in ``MESH_AXES``, a size < 1 or a batch not divisible by ``ep``."""
    if not mesh:
        raise ValueError("mesh is empty; expected e.g. {'ep': 2}, {'tp': 2} or {'ep': 2, 'tp': 2}")
    for axis, size in mesh.items():
        if axis not in MESH_AXES:
            raise ValueError(f"mesh axis {axis!r} is not supported by the {runner} mesh runner; supported: {MESH_AXES}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh size {axis}={size!r} must be an integer >= 1")
    ep = mesh.get("ep", 1)
    if batch % ep:
        raise ValueError(f"batch={batch} is not divisible by ep={ep}: each ep rank (shard) takes an equal batch shard")


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
