"""Smoke test of benchmarks/bench_moe.py at toy sizes: a broken API breaks CI, timings are not checked."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_moe", os.path.join(ROOT, "benchmarks", "bench_moe.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_moe_quick_toy_sizes(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    bench = _load_bench()
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--config", "small", "--sizes", "32,64,4,2,64", "--dtype", "float32",
                     "--no-peers", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    names = {(r["backend"], r["dtype"], r["name"]) for r in rows if r["skipped"] is None}
    for dtype in ("float32",):
        for backend, expected in (("torch", ["limit (dense SwiGLU)", "experts/loop", "experts/grouped_mm"]),
                                  ("jax", ["limit (dense SwiGLU)", "experts/blocked", "experts/ragged_dot"])):
            for name in expected:
                assert (backend, dtype, name) in names, (backend, dtype, name)
    for r in rows:
        if r["skipped"] is None:
            assert r["fwd_ratio"] > 0 and r["fwdbwd_ratio"] > 0 and r["mem_bytes"] is not None, r
    # the auto row of each backend is marked, and the limit's ratio is 1 by construction
    assert sum("auto" in r["note"] for r in rows if r["kind"] == "experts") == 2
    assert all(r["fwd_ratio"] == 1.0 for r in rows if r["kind"] == "limit" and r["skipped"] is None)
    assert "limit (dense SwiGLU)" in capsys.readouterr().out


def test_bench_moe_rejects_bad_arguments():
    bench = _load_bench()
    with pytest.raises(SystemExit, match="--sizes"):
        bench.main(["--sizes", "1,2,3", "--backend", "torch"])
    with pytest.raises(SystemExit, match="not one of"):
        bench.main(["--config", "huge"])


def test_check_targets_flags_an_auto_kernel_that_is_not_the_fastest():
    bench = _load_bench()
    base = dict(config="medium", dtype="bfloat16", backend="torch", device="cuda", flops_fwd=1.0)
    rows = [bench.Result(**base, name="experts/loop", kind="experts", fwd_ratio=1.0, fwdbwd_ratio=1.2, rounds=3),
            bench.Result(**base, name="experts/grouped_mm", kind="experts", fwd_ratio=2.0, fwdbwd_ratio=2.5,
                         note="= auto", rounds=3)]
    lines = [line for line in bench.check_targets(rows) if "auto = " in line]
    assert lines == ["torch medium bfloat16 on cuda: auto = experts/grouped_mm (2.50 fwd+bwd), fastest experts/loop "
                     "(1.20): auto is not the fastest here: update AUTO_TABLE"]
    rows[0].rounds = 1  # one round is not enough to call it
    assert any(line.endswith("in 1 round(s): confirm with --rounds 3") for line in bench.check_targets(rows))
    rows[1].fwdbwd_ratio = 1.25  # within 10% of the fastest: one round's noise
    assert any(line.endswith("fastest experts/loop (1.20): OK (within 10%)") for line in bench.check_targets(rows))
