"""Smoke test of benchmarks/bench_capacity.py at toy sizes: every row runs and is written; timings are
not checked."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("bench_capacity",
                                                  os.path.join(ROOT, "benchmarks", "bench_capacity.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_capacity_toy_sizes(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    out = tmp_path / "cap.json"
    assert _load().main(["--sizes", "16,32,4,2,2,8", "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["torch"]) == {"dropless", "capacity", "capacity padded"}
    assert set(data["jax"]) == {"dropless", "capacity", "capacity static"}
    assert data["capacity"] == 5  # ceil(8 * 2 / 4 * 1.25)
    assert all(v > 0 for side in ("torch", "jax") for v in data[side].values())
    assert "capacity static" in capsys.readouterr().out


def test_bench_capacity_rejects_bad_sizes():
    with pytest.raises(SystemExit, match="--sizes"):
        _load().main(["--sizes", "1,2,3"])
