"""A sharded column starts its worker processes once per run (issue 14: ``Runner.plan``)."""

from __future__ import annotations

import pytest

from parity.backends import make_runner
from parity.harness import Settings, run_parity
from parity.mesh import MeshRunner
from parity.presets import get_preset
from parity.weights import init_weights

pytestmark = pytest.mark.distributed


def test_planned_mesh_run_starts_the_worker_once_with_the_same_verdicts(monkeypatch):
    pytest.importorskip("moe_jax")
    starts = []
    real_run = MeshRunner._run

    def counting_run(self, jobs):
        starts.append(len(jobs))
        return real_run(self, jobs)

    monkeypatch.setattr(MeshRunner, "_run", counting_run)
    cfg = get_preset("default").config
    settings = Settings(cfg=cfg, batch=2, seq_len=4, steps=2)
    weights = init_weights(cfg, 0)
    report = run_parity(settings, weights, [make_runner("jax:cpu"), MeshRunner("jax", {"ep": 2})])
    assert report.passed
    assert starts == [3]  # forward + gradient, float64 gradient, bias steps: one start, three jobs
    kinds = {(c.kind, c.tensor) for c in report.checks if c.backend == "jax:cpu[ep=2]"}
    assert {("forward", "out"), ("grad", "x"), ("bias", "expert_bias")} <= kinds
    # the planned results are the ones compared: sharded == single device on every pairwise row
    pairwise = [c for c in report.checks if {c.backend, c.against} == {"jax:cpu", "jax:cpu[ep=2]"}]
    assert pairwise and all(c.status == "PASS" for c in pairwise)
    # (unplanned, the same run started the worker 4 times: forward, gradients, float64 gradient, bias)
