"""moe_jax.parallel: EP / TP / EP x TP with shard_map on 4 host devices == the single-device layer.

JAX fixes its device count when its backend starts, and this test session already started it with
one device, so every sharded run happens in one subprocess (``parity.mesh_jax.run_worker`` with
``--xla_force_host_platform_device_count=4``); the single-device answers (``JaxRunner``, concatenated
batch) are computed here. "skewed" cases steer every token to two hot experts (0 and 5), so most shards
receive no tokens for most of their experts (ep=4: shards 1 and 3 receive none at all).
``JOBS_2P`` run in 2 processes of 1 CPU device each, joined by ``jax.distributed.initialize`` on
127.0.0.1 (gloo CPU collectives), with a global mesh: a multi-host run on one machine.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from parity.backends.jax_backend import JaxRunner
from parity.mesh_jax import read_result, run_jax_mesh, run_mesh_jobs, run_worker
from parity.mesh_job import STALL_TIMEOUT_S, MeshJob, write_job
from tests.cases import HOT, STEPS, TOLERANCES, make_job
from tests.setup_once import SetupOnce

pytestmark = pytest.mark.distributed



JOBS = {
    "ep2-shared-switch-skewed": make_job("shared_expert", {"ep": 2}, skew=True, load_balance_loss="switch"),
    "ep4-sequence-zloss-skewed": make_job("sequence_loss_zloss", {"ep": 4}, skew=True),
    "ep2xtp2-groups-bias": make_job("groups_top2_sum_bias", {"ep": 2, "tp": 2}),
    "tp2-after-skewed": make_job("softmax_top2_after", {"tp": 2}, skew=True),
    "ep2xtp2-shared-gate": make_job("shared_expert", {"ep": 2, "tp": 2}, shared_expert_gate=True),  # Qwen2-MoE
    # issue 21: data parallel next to ep (experts replicated over dp, aux losses and bias counts over dp x ep)
    "dp2xep2-groups-bias": make_job("groups_top2_sum_bias", {"dp": 2, "ep": 2}),
}
# issue 21: the same layer in 2 processes (1 CPU device each) joined by jax.distributed.initialize
JOBS_2P = {
    "2proc-ep2-shared-switch-skewed": make_job("shared_expert", {"ep": 2}, skew=True, load_balance_loss="switch"),
    "2proc-ep2-groups-bias": make_job("groups_top2_sum_bias", {"ep": 2}),
    "2proc-dp2-sequence-zloss": make_job("sequence_loss_zloss", {"dp": 2}),
}


def start_world():
    """(sharded results by job, error checks, single-device results by job); the single-device runs
    happen here while the worker runs. The worker reports progress after each job, and only
    ``STALL_TIMEOUT_S`` seconds without progress end it (a hang), however loaded the machine is."""
    with tempfile.TemporaryDirectory(prefix="moe_test_jax_parallel_") as tmp:
        for i, job in enumerate(JOBS.values()):
            write_job(os.path.join(tmp, f"job{i}"), job)
        with ThreadPoolExecutor(1) as pool:
            worker = pool.submit(run_worker, "tests.jax.parallel_worker:jobs_then_checks", tmp, len(JOBS),
                                 devices=4, timeout_s=STALL_TIMEOUT_S)
            single = {name: single_device(job) for name, job in JOBS.items()}
            worker.result()
        results = {name: read_result(os.path.join(tmp, f"job{i}")) for i, name in enumerate(JOBS)}
        with open(os.path.join(tmp, "checks.json")) as f:
            checks = json.load(f)
    return results, checks, single


WORLD = SetupOnce("the 4-device JAX worker of tests/jax/test_parallel.py", start_world)


def start_two_processes():
    """(sharded results by job, single-device results by job) of ``JOBS_2P`` on 2 JAX processes."""
    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(run_mesh_jobs, list(JOBS_2P.values()), STALL_TIMEOUT_S, 2)
        single = {name: single_device(job) for name, job in JOBS_2P.items()}
        results = dict(zip(JOBS_2P, worker.result(), strict=True))
    return results, single


WORLD_2P = SetupOnce("the 2-process JAX run of tests/jax/test_parallel.py", start_two_processes)


@pytest.fixture
def world(request):
    return WORLD.get(request)


@pytest.fixture
def world_2p(request):
    return WORLD_2P.get(request)


def single_device(job: MeshJob) -> dict:
    r = JaxRunner("cpu")
    return {"forward": r.forward(job.cfg, job.weights, job.x, job.dtype),
            "grad": r.grad(job.cfg, job.weights, job.x, job.dtype, job.cotangent),
            "bias_steps": r.bias_steps(job.cfg, job.weights, job.xs, job.dtype, job.lr)}


MAX_ERR: dict[str, float] = {}


@pytest.mark.parametrize("name", list(JOBS))
def test_sharded_matches_single_device(world, name):
    check_against_single_device(name, JOBS[name], world[0][name], world[2][name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(JOBS_2P))
def test_two_processes_match_single_device(world_2p, name):
    """jax.distributed on 127.0.0.1, 2 processes x 1 CPU device, a global mesh: == one device."""
    got = world_2p[0][name]
    check_against_single_device(name, JOBS_2P[name], got, world_2p[1][name])
    assert np.any(got["bias_steps"][-1]["expert_bias"] != 0)  # the bias moved, the same in both processes


def check_against_single_device(name, job, got, want):
    tol = TOLERANCES[job.dtype]
    for part in ("forward", "grad"):
        assert sorted(got[part]) == sorted(want[part]), (part, sorted(got[part]), sorted(want[part]))
        for key, expected in want[part].items():
            MAX_ERR[f"{name}:{part}/{key}"] = float(np.max(np.abs(got[part][key] - expected), initial=0.0))
            np.testing.assert_allclose(got[part][key], expected, **tol, err_msg=f"{name}: {part}/{key}")
    # expert_bias bit-identical to the single device after every step, and identical on every shard
    for i, (g, w) in enumerate(zip(got["bias_steps"], want["bias_steps"], strict=True)):
        for key in ("tokens_per_expert", "selected_experts", "expert_bias"):
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"{name}: bias step {i} {key}")
    assert len(got["bias_steps"]) == STEPS
    assert max(got["rank_spread"].values()) == 0.0, {k: v for k, v in got["rank_spread"].items() if v}


def test_skewed_routing_leaves_experts_empty(world):
    """ep=4 shards 1 and 3 own experts 2-3 and 6-7, which receive no token at all."""
    counts = world[0]["ep4-sequence-zloss-skewed"]["forward"]["tokens_per_expert"]
    assert set(np.flatnonzero(counts)) == set(HOT)
    assert np.any(world[0]["ep4-sequence-zloss-skewed"]["bias_steps"][-1]["expert_bias"] != 0)


def test_expert_gradient_not_scaled_by_ep(world):
    job = JOBS["ep2-shared-switch-skewed"]
    want = world[2]["ep2-shared-switch-skewed"]["grad"]["experts.w1"]
    got = world[0]["ep2-shared-switch-skewed"]["grad"]["experts.w1"]
    hot = list(HOT)
    assert np.abs(want[hot]).max() > 1e-3
    np.testing.assert_allclose(got[hot], want[hot], rtol=1e-5, atol=1e-6)
    cold = [e for e in range(job.cfg.num_experts) if e not in HOT]
    assert np.all(got[cold] == 0)


def test_errors_on_real_meshes(world):
    c = world[1]
    assert "no axis named 'ep'" in c["missing_ep"] and "('tp',)" in c["missing_ep"], c["missing_ep"]
    assert "no axis named 'tp'" in c["missing_tp"] and "('ep',)" in c["missing_tp"], c["missing_tp"]
    assert c["not_divisible"].startswith("ValueError") and "num_experts=6" in c["not_divisible"]
    assert "'ep' mesh size 4" in c["not_divisible"], c["not_divisible"]
    assert "hidden_dim=5" in c["hidden_not_divisible"], c["hidden_not_divisible"]
    assert "shared_hidden_dim=5" in c["shared_not_divisible"], c["shared_not_divisible"]
    assert "batch 2, not divisible by the 'ep' mesh size 4" in c["batch_not_divisible"], c["batch_not_divisible"]
    assert "exchange='nccl'" in c["exchange"], c["exchange"]
    assert c["not_a_mesh"].startswith("TypeError"), c["not_a_mesh"]


# ----------------------------------------------------------------------------- failures end runs
def test_failing_worker_ends_run_with_its_error():
    job = make_job("shared_expert", {"ep": 2})
    job.extra["fail"] = True
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker .* failed.*injected failure in the JAX mesh worker"):
        run_mesh_jobs([job], timeout_s=120)
    assert time.monotonic() - start < 120


def test_failing_process_ends_multi_process_run_with_its_traceback():
    """Process 1 of 2 raises after jax.distributed is up; process 0 (waiting for it in a collective) is
    killed and the run fails with process 1's exception and traceback, not a hang."""
    job = make_job("shared_expert", {"ep": 2})
    job.extra["fail_process"] = 1
    with pytest.raises(RuntimeError, match=r"(?s)process 1 of 2, failed.*injected failure in the JAX mesh "
                                           r"worker \(process 1\).*Traceback"):
        run_mesh_jobs([job], timeout_s=120, processes=2)


@pytest.mark.slow
def test_hung_process_ends_multi_process_run():
    """Process 1 of 2 hangs after jax.distributed is up: no progress for timeout_s ends the run."""
    job = make_job("shared_expert", {"ep": 2})
    job.extra["stall_process"] = 1
    with pytest.raises(TimeoutError, match=r"\(2 processes\): no progress for timeout_s=20"):
        run_mesh_jobs([job], timeout_s=20, processes=2)


def test_processes_must_divide_devices():
    job = make_job("shared_expert", {"ep": 2})
    with pytest.raises(ValueError, match="processes=4 does not divide the 2 devices"):
        run_mesh_jobs([job], processes=4)


def test_stalled_worker_is_killed_at_timeout():
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(TimeoutError, match="no progress for timeout_s=3"):
        run_worker("tests.jax.parallel_worker:stall", tmp, devices=2, timeout_s=3)


def test_slow_worker_that_reports_progress_is_not_killed():
    # 8 steps of 0.75 s = 6 s in all, twice the bound: the old fixed timeout killed it at 3 s
    with tempfile.TemporaryDirectory() as tmp:
        run_worker("tests.jax.parallel_worker:slow_with_progress", tmp, 8, 0.75, devices=1, timeout_s=3)


@pytest.mark.parametrize("mesh, batch, match", [
    ({"etp": 2}, 4, "mesh axis 'etp' is not supported"),
    ({"ep": 0}, 4, "ep=0"),
    ({"ep": 4}, 2, "batch=2 is not divisible by ep=4"),
])
def test_run_jax_mesh_checks_mesh_first(mesh, batch, match):
    job = make_job("shared_expert", {"ep": 2})
    with pytest.raises(ValueError, match=match):
        run_jax_mesh(job.cfg, job.weights, job.x[:batch], job.cotangent[:batch], mesh)
