"""``moe-parity run --mesh``: sharded columns next to the single-device ones, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity.cli import main
from parity.harness import Settings, run_parity
from parity.mesh import MeshRunner, make_runners
from parity.presets import get_preset
from parity.weights import init_weights

pytestmark = pytest.mark.distributed


def test_cli_mesh_ep2_end_to_end(tmp_path, capsys):
    pytest.importorskip("moe_jax")
    code = main(["run", "--mesh", "ep=2", "--backends", "jax", "--seq-len", "4", "--steps", "2", "--quiet",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["summary"]["backends_ran"]) == {"jax:cpu", "jax:cpu[ep=2]"}
    checks = report["checks"]
    # the sharded column was compared with the single-device one: forward, gradients, bias trajectory
    for kind, tensor in (("forward", "out"), ("grad", "x"), ("grad", "experts.w1"), ("bias", "expert_bias")):
        rows = [c for c in checks if c["kind"] == kind and c["tensor"] == tensor
                and {c["backend"], c["against"]} == {"jax:cpu", "jax:cpu[ep=2]"}]
        assert rows and all(c["status"] == "PASS" for c in rows), (kind, tensor, rows)
    assert "jax:cpu[ep=2]" in out  # not swallowed as rich markup


def test_planted_mismatch_in_sharded_runner_is_caught():
    pytest.importorskip("moe_jax")
    cfg = get_preset("default").config.replace(dim=16, hidden_dim=24)
    weights = init_weights(cfg, 0)

    def perturb(w):  # one expert wrong on the sharded side only
        w["experts.w2"][1] *= 1.01
        return w

    good, bad = make_runners({"ep": 2}, ["jax:cpu"]) + [MeshRunner("jax", {"ep": 2}, weights_hook=perturb)]
    bad.name = "jax:cpu[ep=2,planted]"
    settings = Settings(cfg=cfg, batch=2, seq_len=8, steps=0, grads=False)
    report = run_parity(settings, weights, [good, bad])
    failed = {(c.tensor, c.backend, c.against) for c in report.checks if c.status == "FAIL"}
    assert ("out", "jax:cpu[ep=2,planted]", "reference") in failed
    assert not any(b == "jax:cpu[ep=2]" and a == "reference" for _, b, a in failed), failed
    assert not report.passed


@pytest.mark.parametrize("mesh, match", [({"etp": 2}, "mesh axis 'etp'"), ({}, "mesh is empty")])
def test_make_runners_rejects_unknown_axes(mesh, match):
    with pytest.raises(ValueError, match=match):
        make_runners(mesh, ["jax:cpu"])


def test_make_runners_names_columns():
    names = [r.name for r in make_runners({"ep": 2, "tp": 2}, ["torch:cpu", "torch:cuda", "jax:cpu", "hf:cpu"])]
    assert names == ["torch:cpu[ep=2xtp=2]", "jax:cpu[ep=2xtp=2]"]
    assert np.all([r.capabilities >= {"forward", "grad", "bias"} for r in make_runners({"ep": 2}, ["torch"])])
    names = [r.name for r in make_runners({"dp": 2, "ep": 2}, ["torch:cpu", "jax:cpu"], processes=4)]
    assert names == ["torch:cpu[dp=2xep=2]", "jax:cpu[dp=2xep=2,procs=4]"]
    assert [r.processes for r in make_runners({"ep": 2}, ["torch", "jax"])] == [2, 1]


@pytest.mark.parametrize("backends, processes, match", [
    (["torch:cpu"], 1, "one gloo process per rank"), (["jax:cpu"], 3, "does not divide the 4 devices")])
def test_make_runners_checks_processes(backends, processes, match):
    with pytest.raises(ValueError, match=match):
        make_runners({"ep": 2, "tp": 2}, backends, processes=processes)
