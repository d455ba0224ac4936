"""moe_torch.parallel: EP / TP / EP x TP, and DP (FSDP2 or all-reduce) next to them, on 2 and 4 gloo
processes == the single-device layer.

Each world is started once (module fixture) and runs every case as a job of
``parity.mesh_torch``; each ep rank takes its own batch shard and the reference is the single-device
layer on the concatenated batch. "skewed" cases steer every token to two hot experts (0 and 5), so
most ranks receive no tokens for most of their experts (ep=4: ranks 1 and 3 receive none at all).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import pytest
import torch

from moe_torch import update_expert_bias
from parity.mesh_job import STALL_TIMEOUT_S, MeshJob, check_mesh, check_processes, write_job
from parity.mesh_torch import collect_job, run_torch_mesh, spawn
from parity.reference import update_expert_bias as ref_update_expert_bias
from tests.cases import HOT, TOLERANCES, make_job
from tests.setup_once import SetupOnce
from tests.torch.conftest import build_moe

pytestmark = pytest.mark.distributed

LOSSES = ("load_balance_loss", "router_z_loss")


WORLD2 = {
    "ep2-shared-skewed": make_job("shared_expert", {"ep": 2}, skew=True),
    "ep2-switch": make_job("switch_loss", {"ep": 2}),
    "ep2-sequence-zloss-skewed": make_job("sequence_loss_zloss", {"ep": 2}, skew=True),
    "ep2-groups-bias": make_job("groups_top2_sum_bias", {"ep": 2}),
    "ep2-grouped_mm-skewed": make_job("softmax_top2_after", {"ep": 2}, skew=True, expert_kernel="grouped_mm"),
    "ep2-shared-float64": make_job("shared_expert", {"ep": 2}, dtype="float64"),
    "tp2-shared-skewed": make_job("shared_expert", {"tp": 2}, skew=True),
    "tp2-shared-gate": make_job("shared_expert", {"tp": 2}, shared_expert_gate=True),  # Qwen2-MoE
    "tp2-switch": make_job("switch_loss", {"tp": 2}),
    "tp2-groups-bias": make_job("groups_top2_sum_bias", {"tp": 2}),
    # FSDP2 over dp alone (DataParallel: whole-batch aux losses), the switch loss' nonlinear statistics
    "dp2-fsdp-shared-switch": make_job("shared_expert", {"dp": 2}, load_balance_loss="switch",
                                       load_balance_coeff=0.01),
}
WORLD4 = {
    f"{name}-{case}": make_job(case, mesh, skew=skew)
    for name, mesh in (("ep4", {"ep": 4}), ("ep2xtp2", {"ep": 2, "tp": 2}), ("tp4", {"tp": 4}))
    for case, skew in (("shared_expert", True), ("sequence_loss_zloss", True), ("groups_top2_sum_bias", False))
}
# issue 21: dp next to ep / tp. "fsdp": fully_shard_moe (experts over dp, the rest over dp x ep, summed);
# "allreduce": parameters replicated over dp, all_reduce_dense_grads(moe, dp x ep group, dp group)
DP_JOBS = {
    "dp2xep2-fsdp-shared-switch-skewed": make_job("shared_expert", {"dp": 2, "ep": 2}, skew=True,
                                                  load_balance_loss="switch", load_balance_coeff=0.01),
    "dp2xep2-fsdp-groups-bias": make_job("groups_top2_sum_bias", {"dp": 2, "ep": 2}),
    "dp2xep2-allreduce-sequence-zloss-skewed": make_job("sequence_loss_zloss", {"dp": 2, "ep": 2}, skew=True),
    "dp2xtp2-fsdp-shared-bias": make_job("shared_expert", {"dp": 2, "tp": 2}, use_expert_bias=True),
}
DP_JOBS["dp2xep2-allreduce-sequence-zloss-skewed"].extra["fsdp"] = False
WORLD4.update(DP_JOBS)


def run_world(jobs: dict[str, MeshJob], world: int) -> tuple[dict, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="moe_test_parallel_") as tmp:
        for i, job in enumerate(jobs.values()):
            write_job(os.path.join(tmp, f"job{i}"), job)
        spawn("tests.torch.dist_workers:jobs_then_checks", world, tmp, len(jobs), timeout_s=STALL_TIMEOUT_S)
        results = {name: collect_job(os.path.join(tmp, f"job{i}"), world) for i, name in enumerate(jobs)}
        checks = []
        for r in range(world):
            with open(os.path.join(tmp, f"checks.rank{r}.json")) as f:
                checks.append(json.load(f))
    return results, checks


# each world starts once; a failure is reported once, by the first test (tests/setup_once.py)
WORLDS = {2: SetupOnce("the 2-process gloo world of tests/torch/test_parallel.py", lambda: run_world(WORLD2, 2)),
          4: SetupOnce("the 4-process gloo world of tests/torch/test_parallel.py", lambda: run_world(WORLD4, 4))}


@pytest.fixture
def world2(request):
    return WORLDS[2].get(request)


@pytest.fixture
def world4(request):
    return WORLDS[4].get(request)


# ------------------------------------------------------------------------------ single device
def single_device(job: MeshJob) -> dict:
    """The torch backend's forward / grad / bias_steps on one device, concatenated batch."""
    tdtype = getattr(torch, job.dtype)
    cfg = job.cfg.replace(expert_kernel="loop") if job.dtype == "float64" else job.cfg
    moe = build_moe(cfg, job.weights, tdtype).eval()
    x = torch.from_numpy(job.x).to(tdtype).requires_grad_(True)
    out, aux = moe(x, return_aux=True)
    acc = torch.float64 if job.dtype == "float64" else torch.float32
    loss = (out.to(acc) * torch.from_numpy(job.cotangent).to(acc)).sum()
    for key in LOSSES:
        if key in aux:
            loss = loss + aux[key].to(acc)
    loss.backward()
    grad = {name: p.grad for name, p in moe.named_parameters()}
    grad["x"] = x.grad
    forward = {"out": out, **aux}
    moe = build_moe(cfg, job.weights, tdtype).train()
    steps = []
    for xi in job.xs:
        with torch.no_grad():
            _, aux = moe(torch.from_numpy(xi).to(tdtype), return_aux=True)
            step = {"tokens_per_expert": moe.tokens_per_expert.clone(), "selected_experts": aux["selected_experts"]}
            update_expert_bias(moe, job.lr)
            step["expert_bias"] = moe.expert_bias.clone()
        steps.append(step)
    as_np = lambda d: {k: v.detach().double().numpy() for k, v in d.items()}  # noqa: E731
    return {"forward": as_np(forward), "grad": as_np(grad), "bias_steps": [as_np(s) for s in steps]}


MAX_ERR: dict[str, dict[str, float]] = {}


def check_job(name: str, job: MeshJob, got: dict) -> None:
    want = single_device(job)
    tol = TOLERANCES[job.dtype]
    errs = MAX_ERR.setdefault(name, {})
    for part in ("forward", "grad"):
        assert sorted(got[part]) == sorted(want[part]), (part, sorted(got[part]), sorted(want[part]))
        for key, expected in want[part].items():
            errs[f"{part}/{key}"] = float(np.max(np.abs(got[part][key] - expected), initial=0.0))
            np.testing.assert_allclose(got[part][key], expected, **tol, err_msg=f"{name}: {part}/{key}")
    for i, (g, w) in enumerate(zip(got["bias_steps"], want["bias_steps"], strict=True)):
        for key in ("tokens_per_expert", "selected_experts", "expert_bias"):
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"{name}: bias step {i} {key}")
    # every rank holds the same gathered result, bit for bit: router / dense grads agree on every rank
    assert max(got["rank_spread"].values()) == 0.0, {k: v for k, v in got["rank_spread"].items() if v}


@pytest.mark.parametrize("name", list(WORLD2))
def test_two_processes_match_single_device(world2, name):
    check_job(name, WORLD2[name], world2[0][name])


@pytest.mark.parametrize("name", list(WORLD4))
def test_four_processes_match_single_device(world4, name):
    check_job(name, WORLD4[name], world4[0][name])


def test_skewed_routing_leaves_experts_empty(world4):
    """The skewed cases really do starve experts: only the HOT experts receive tokens."""
    counts = world4[0]["ep4-shared_expert"]["forward"]["tokens_per_expert"]
    assert set(np.flatnonzero(counts)) == set(HOT)


def test_expert_gradient_not_scaled_by_ep(world2):
    """The EP expert gradient is the single-device one, not ep times it (nor 1/ep)."""
    job = WORLD2["ep2-shared-skewed"]
    want = single_device(job)["grad"]["experts.w1"]
    got = world2[0]["ep2-shared-skewed"]["grad"]["experts.w1"]
    hot = list(HOT)
    assert np.abs(want[hot]).max() > 1e-3
    np.testing.assert_allclose(got[hot], want[hot], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_errors_on_real_meshes(world2, world4, world):
    checks = (world2 if world == 2 else world4)[1]
    for c in checks:
        assert "no dimension named 'ep'" in c["missing_ep"] and "('tp',)" in c["missing_ep"], c["missing_ep"]
        assert "no dimension named 'tp'" in c["missing_tp"] and "('ep',)" in c["missing_tp"], c["missing_tp"]
        assert "unnamed" in c["unnamed"], c["unnamed"]
        assert c["not_divisible"].startswith("ValueError") and "num_experts=3" in c["not_divisible"]
        assert f"'ep' mesh size {world}" in c["not_divisible"], c["not_divisible"]
        assert "hidden_dim=5" in c["hidden_not_divisible"], c["hidden_not_divisible"]
        assert "shared_hidden_dim=5" in c["shared_not_divisible"], c["shared_not_divisible"]
        assert c["wrong_module"].startswith("TypeError") and "Linear" in c["wrong_module"]
        assert "already a DTensor" in c["twice"], c["twice"]


@pytest.mark.parametrize("world", [2, 4])
def test_tp_router_gradient_identical_and_experts_only_style(world2, world4, world):
    checks = (world2 if world == 2 else world4)[1]
    assert any(checks[0]["tp_router_grad"])
    assert all(c["experts_only_max_diff"] == 0.0 for c in checks)
    assert all(c["tp_router_grad"] == checks[0]["tp_router_grad"] for c in checks)


@pytest.mark.parametrize("world", [2, 4])
def test_update_expert_bias_all_reduces_counts(world2, world4, world):
    checks = (world2 if world == 2 else world4)[1]
    counts = np.array([[5.0, 0, 1, 2], [0, 0, 7, 1], [3, 3, 3, 3], [1, 9, 0, 0]])[:world].sum(0)
    bias = np.zeros(4, np.float32)
    for step, c in enumerate(checks[0]["bias_steps"]):
        bias = ref_update_expert_bias(bias, counts, 0.125)
        np.testing.assert_array_equal(np.float32(c), bias)
        assert all(other["bias_steps"][step] == c for other in checks), "expert_bias differs between ranks"


@pytest.mark.parametrize("name", ["dp2xep2-fsdp-groups-bias", "dp2xtp2-fsdp-shared-bias"])
def test_dp_bias_steps_same_on_every_rank(world4, name):
    """The aux-free bias under dp x ep / dp x tp: counts summed over all token-parallel ranks, so the
    bias moves (it is not zero after the steps) and every one of the 4 ranks holds the same bits."""
    got = world4[0][name]
    last = got["bias_steps"][-1]["expert_bias"]
    assert np.any(last != 0)
    for i in range(len(got["bias_steps"])):
        assert got["rank_spread"][f"bias/{i}/expert_bias"] == 0.0
        assert got["rank_spread"][f"bias/{i}/tokens_per_expert"] == 0.0
    # the counts are those of the whole batch (4 shards x 4 sequences / 4 x 4 tokens x top-k)
    cfg = WORLD4[name].cfg
    assert got["bias_steps"][0]["tokens_per_expert"].sum() == 4 * 4 * cfg.top_k


def test_fully_shard_moe_layout_and_reduction(world4):
    """fully_shard_moe on (dp=2, ep=2): experts split over ep then dp, the rest over all 4 ranks;
    reduce="mean" is exactly "sum" / (dp * ep); misuse is refused with a clear error."""
    for rank, c in enumerate(world4[1]):
        assert c["placements"]["experts.w1"] == ["_StridedShard(dim=0, sf=2)", "Shard(dim=0)"], c["placements"]
        assert c["placements"]["router.gate.weight"] == ["Shard(dim=0)"]
        assert c["local_rows"]["experts.w1"] == 1  # 4 experts / ep 2 / dp 2
        assert c["local_rows"]["router.gate.weight"] == 1  # 4 rows / 4 ranks
        assert c["token_mesh"] == [0, 1, 2, 3]
        assert c["expert_data_mesh"] == [rank % 2, rank % 2 + 2]  # the dp ranks holding the same experts
        assert c["grad_norm"] > 0 and c["mean_times_4_minus_sum"] < 1e-6 * (1 + c["grad_norm"])
        assert c["all_reduce_on_fsdp"].startswith("ValueError") and "count them twice" in c["all_reduce_on_fsdp"]
        assert "reduce='avg'" in c["fsdp_bad_reduce"], c["fsdp_bad_reduce"]
        assert "no dimension named 'data'" in c["fsdp_missing_dp"], c["fsdp_missing_dp"]
        assert "apply ExpertParallel" in c["fsdp_plain_experts"], c["fsdp_plain_experts"]
        assert "apply a style" in c["fsdp_no_style"], c["fsdp_no_style"]
        assert "already set up by DataParallel" in c["data_parallel_twice"], c["data_parallel_twice"]


# ----------------------------------------------------------------------------- failures end runs
def test_failing_rank_ends_run_with_its_error():
    job = make_job("shared_expert", {"ep": 2})
    job.extra["fail_rank"] = 1
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed.*injected failure on rank 1"):
        from parity.mesh_torch import run_mesh_jobs

        run_mesh_jobs([job], timeout_s=120)
    assert time.monotonic() - start < 120  # ended by the failure, not by a timeout


def test_wrong_ep_size_is_refused_before_any_process_starts():
    # the ranks' own check (moe_torch.parallel) is exercised on real meshes in test_errors_on_real_meshes
    job = make_job("shared_expert", {"ep": 2}, num_experts=3, top_k=1)
    with pytest.raises(ValueError, match=r"num_experts=3 is not divisible by ep=2"):
        run_torch_mesh(job.cfg, job.weights, job.x, job.cotangent, job.mesh, steps=1, timeout_s=120)


def test_stalled_rank_hits_collective_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 of 2 failed.*(?i:timed out|timeout)"):
        spawn("tests.torch.dist_workers:stall", 2, timeout_s=100, collective_timeout_s=3)
    assert time.monotonic() - start < 100


def test_overall_timeout_terminates_every_rank():
    with pytest.raises(TimeoutError, match="timeout_s=2"):
        spawn("tests.torch.dist_workers:stall", 2, timeout_s=2, collective_timeout_s=60)


# ------------------------------------------------------------------------------- in-process checks
@pytest.mark.parametrize("mesh, batch, match", [
    ({"etp": 2}, 4, "mesh axis 'etp' is not supported"),
    ({"ep": 0}, 4, "ep=0"),
    ({"ep": 4}, 2, "batch=2 is not divisible by ep=4"),
    ({"dp": 2, "ep": 2}, 2, r"batch=2 is not divisible by dp\*ep=4"),
    ({}, 4, "mesh is empty"),
])
def test_check_mesh_errors(mesh, batch, match):
    with pytest.raises(ValueError, match=match):
        check_mesh(mesh, batch)


@pytest.mark.parametrize("mesh, processes, framework, match", [
    ({"ep": 2}, 1, "torch", r"one gloo process per rank, so it needs processes = 2"),
    ({"ep": 4}, 3, "jax", "processes=3 does not divide the 4 devices"),
    ({"ep": 2}, 0, "jax", "processes=0 must be an integer >= 1"),
])
def test_check_processes_errors(mesh, processes, framework, match):
    with pytest.raises(ValueError, match=match):
        check_processes(mesh, processes, framework)


def test_check_processes_defaults():
    assert check_processes({"dp": 2, "ep": 2}, None, "torch") == 4
    assert check_processes({"ep": 2}, None, "jax") == 1
    assert check_processes({"ep": 2, "tp": 2}, 2, "jax") == 2


def test_expert_major_permutation():
    from moe_torch.parallel import _expert_major

    # 2 source ranks x 2 local experts: rows arrive [src0: e0 e0 e1][src1: e1 e1] (counts [[2,1],[0,2]])
    perm = _expert_major(torch.tensor([[2, 1], [0, 2]]))
    assert perm.tolist() == [0, 1, 2, 3, 4]
    perm = _expert_major(torch.tensor([[1, 2], [2, 0]]))  # [s0e0 | s0e1 s0e1 | s1e0 s1e0] -> e0: 0,3,4; e1: 1,2
    assert perm.tolist() == [0, 3, 4, 1, 2]
    assert _expert_major(torch.zeros(2, 2, dtype=torch.int64)).numel() == 0
