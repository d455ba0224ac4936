"""Sharded layers as parity columns: ``moe-parity run --mesh ep=2`` (issue 5).

``make_runners(mesh, backends)`` returns one ``MeshRunner`` per framework among ``backends`` ("torch",
"jax"): "torch:cpu[ep=2]" runs ``moe_torch.parallel`` in real gloo processes
(``parity.mesh_torch.run_mesh_jobs``; with "dp" under FSDP2, ``fully_shard_moe``), "jax:cpu[ep=2]"
runs ``moe_jax.parallel`` on host devices of one process, "jax:cpu[ep=2,procs=2]" on the devices of
two processes joined by ``jax.distributed.initialize`` (``parity.mesh_jax.run_mesh_jobs``). The harness then compares them like any other column: forward,
gradients and the expert-bias trajectory against the float64 reference, against their own float64
run, and pairwise against the single-device columns (so "sharded == single device" is a row of the report).

Each runner call starts its processes once: ``forward`` one job, ``grad`` the compute-dtype and the float64
jobs together (the float64 answer is kept for the harness's next call), ``bias_steps`` one job. A
bias step whose shards disagree on ``expert_bias`` (any bit) is an error (a FAIL row).
Sharded runs are CPU-only here (gloo / host devices), whatever device the single-device columns use.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence

import numpy as np

from parity.backends.base import GRAD_INPUT, Runner, Tensors
from parity.config import MoEConfig
from parity.mesh_job import MESH_AXES, STALL_TIMEOUT_S, MeshJob, check_processes

FRAMEWORKS = ("torch", "jax")


def mesh_name(mesh: Mapping[str, int]) -> str:
    """{"ep": 2, "tp": 2} -> "ep=2xtp=2" (the CLI's spelling)."""
    return "x".join(f"{k}={v}" for k, v in mesh.items())


class MeshRunner(Runner):
    """One framework's sharded layer on ``mesh`` (CPU). ``framework``: "torch" | "jax".

    ``timeout_s``: seconds the worker processes may go without reporting progress (a hang) before
    they are terminated and the call fails (``parity.mesh_job.wait_for``); no bound on the total time.
    ``processes``: how many processes host the mesh (``parity.mesh_job.check_processes``: torch one
    per rank, the default and the only choice; jax default 1, or a divisor of the device count, joined
    by ``jax.distributed.initialize``); a JAX column with several processes is named
    "jax:cpu[ep=2,procs=2]". Raises ``ValueError`` for an unknown framework or a bad ``processes``.
    """

    capabilities = frozenset({"forward", "aux", "lock", "grad", "bias"})

    def __init__(self, framework: str, mesh: Mapping[str, int], *, timeout_s: float = STALL_TIMEOUT_S,
                 processes: int | None = None, **hooks):
        super().__init__(**hooks)
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework={framework!r} has no sharded runner; known: {FRAMEWORKS}")
        self.framework, self.mesh, self.timeout_s = framework, dict(mesh), timeout_s
        self.processes = check_processes(self.mesh, processes, framework)
        procs = f",procs={self.processes}" if framework == "jax" and self.processes > 1 else ""
        self.name = f"{framework}:cpu[{mesh_name(mesh)}{procs}]"
        self._grad64: tuple | None = None  # (key, Tensors) of the last float64 gradient run

    def unavailable(self) -> str | None:
        package = "moe_torch" if self.framework == "torch" else "moe_jax"
        for mod in (self.framework, package):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed"
        if self.framework == "torch":
            try:
                import torch.distributed as dist

                if not (dist.is_available() and dist.is_gloo_available()):
                    return "torch.distributed with gloo is not available"
            except Exception as exc:
                return f"cannot import torch.distributed: {type(exc).__name__}: {exc}".splitlines()[0]
        return None

    # ------------------------------------------------------------------------------------------
    def _run(self, jobs: Sequence[MeshJob]) -> list[dict]:
        if self.framework == "torch":
            from parity.mesh_torch import run_mesh_jobs

            return run_mesh_jobs(jobs, timeout_s=self.timeout_s)
        from parity.mesh_jax import run_mesh_jobs

        return run_mesh_jobs(jobs, timeout_s=self.timeout_s, processes=self.processes)

    def _job(self, cfg, weights, x, dtype, cotangent=None, selected_experts=None, xs=(), lr=1e-3) -> MeshJob:
        cfg, weights = self.prepare(cfg, weights)
        cot = np.zeros(np.shape(x)) if cotangent is None else cotangent
        return MeshJob(cfg, weights, np.asarray(x), np.asarray(cot), self.mesh, len(xs), lr, dtype,
                       list(xs), selected_experts)

    @staticmethod
    def _tensors(result: dict, part: str) -> Tensors:
        t = Tensors()
        for key, value in result[part].items():
            t.put(key, value, result["dtypes"].get(f"{part}/{key}", str(value.dtype)))
        return t

    @staticmethod
    def _key(kind, cfg, weights, x, dtype, selected_experts=None, cotangent=None, xs=(), lr=None) -> tuple:
        """What a call's result depends on (arrays by their bytes)."""
        def b(a):
            return None if a is None else (np.shape(a), np.asarray(a).tobytes())
        return (kind, cfg, tuple(sorted((k, b(v)) for k, v in weights.items())), b(x), dtype,
                b(selected_experts), b(cotangent), tuple(b(v) for v in xs), lr)

    def plan(self, cfg: MoEConfig, weights, x, dtype, cotangent, grad64_selected, xs, lr) -> None:
        """Run the calls a harness run will make in one start of the worker processes (their start-up,
        imports and compilation paid once instead of three times), keeping the results for ``forward``,
        ``grad`` and ``bias_steps``: the free-routing forward and gradient in ``dtype`` (one job: the
        forward does not depend on the cotangent), the float64 gradient with ``grad64_selected`` and
        the ``xs`` bias steps. A later call with other arguments (locked routing) runs as before."""
        jobs = [("fwd+grad", self._job(cfg, weights, x, dtype, cotangent))]
        if dtype != "float64":
            jobs.append(("grad64", self._job(cfg, weights, x, "float64", cotangent, grad64_selected)))
        if xs:
            jobs.append(("bias", self._job(cfg, weights, xs[0], dtype, xs=xs, lr=lr)))
        results = self._run([job for _, job in jobs])
        done = dict(zip((name for name, _ in jobs), results, strict=True))
        self._planned = {self._key("forward", cfg, weights, x, dtype): done["fwd+grad"],
                         self._key("grad", cfg, weights, x, dtype, None, cotangent): done["fwd+grad"]}
        if "grad64" in done:
            self._planned[self._key("grad", cfg, weights, x, "float64", grad64_selected, cotangent)] = done["grad64"]
        if "bias" in done:
            self._planned[self._key("bias", cfg, weights, None, dtype, xs=xs, lr=lr)] = done["bias"]

    def _take(self, key) -> dict | None:
        return getattr(self, "_planned", {}).pop(key, None)

    def forward(self, cfg: MoEConfig, weights, x, dtype, selected_experts=None) -> Tensors:
        result = self._take(self._key("forward", cfg, weights, x, dtype, selected_experts))
        if result is None:
            result = self._run([self._job(cfg, weights, x, dtype, selected_experts=selected_experts)])[0]
        return self._tensors(result, "forward")

    def grad(self, cfg: MoEConfig, weights, x, dtype, cotangent, selected_experts=None) -> Tensors:
        key = (cfg, tuple(sorted((k, np.asarray(v).tobytes()) for k, v in weights.items())),
               np.asarray(x).tobytes(), np.asarray(cotangent).tobytes(),
               None if selected_experts is None else np.asarray(selected_experts).tobytes())
        planned = self._take(self._key("grad", cfg, weights, x, dtype, selected_experts, cotangent))
        if planned is not None:
            return self._tensors(planned, "grad")
        if dtype == "float64" and self._grad64 is not None and self._grad64[0] == key:
            return self._grad64[1]
        dtypes = [dtype] if dtype == "float64" else [dtype, "float64"]
        results = self._run([self._job(cfg, weights, x, d, cotangent, selected_experts) for d in dtypes])
        grads = [self._tensors(r, "grad") for r in results]
        if dtype != "float64":
            self._grad64 = (key, grads[1])
        assert GRAD_INPUT in grads[0]
        return grads[0]

    def bias_steps(self, cfg: MoEConfig, weights, xs: Sequence[np.ndarray], dtype, lr) -> list[Tensors]:
        result = self._take(self._key("bias", cfg, weights, None, dtype, xs=xs, lr=lr))
        if result is None:
            result = self._run([self._job(cfg, weights, xs[0], dtype, xs=xs, lr=lr)])[0]
        disagree = {k: v for k, v in result["rank_spread"].items() if k.startswith("bias/") and v != 0}
        if disagree:
            raise RuntimeError(f"{self.name}: shards end with different expert_bias: {disagree}")
        steps = []
        for i, step in enumerate(result["bias_steps"]):
            t = Tensors()
            for key, value in step.items():
                t.put(key, value, result["dtypes"].get(f"bias/{i}/{key}", str(value.dtype)))
            steps.append(t)
        return steps


def make_runners(mesh: dict[str, int], backends: list[str], **kwargs) -> list[Runner]:
    """Sharded runners for ``mesh`` (e.g. {"ep": 2}) of every framework named in ``backends``
    ("torch:cpu", "jax:gpu", ...: the framework part counts; sharded runs are on CPU).

    Raises ValueError for a mesh axis other than "dp" / "ep" / "tp", a size < 1 or a ``processes``
    (in ``kwargs``) a framework cannot use. ``kwargs`` go to ``MeshRunner`` (``timeout_s``,
    ``processes``, test hooks).
    """
    if not mesh:
        raise ValueError("mesh is empty; expected e.g. ep=2, tp=2, ep=2xtp=2 or dp=2xep=2")
    for axis, size in mesh.items():
        if axis not in MESH_AXES:
            raise ValueError(f"mesh axis {axis!r} is not supported; supported: {', '.join(MESH_AXES)}")
        if size < 1:
            raise ValueError(f"mesh size {axis}={size} must be >= 1")
    frameworks = dict.fromkeys(b.split(":")[0] for b in backends)
    return [MeshRunner(f, mesh, **kwargs) for f in frameworks if f in FRAMEWORKS]
