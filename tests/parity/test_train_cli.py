"""``moe-parity train`` on the command line: bad input exits 2 with one line, a tiny run writes its report."""

import json

import pytest

from parity.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--steps", "0"], "argument --steps: '0' must be an integer >= 1"),
    (["--lr", "-1e-3"], "argument --lr: '-1e-3' must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: 'nan' must be a finite number > 0"),
    (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
    (["--momentum", "1"], "argument --momentum: '1' must be a number in [0, 1)"),
    (["--momentum", "0.9"], "--momentum 0.9 is an SGD option"),
    (["--factor", "0.5"], "argument --factor: '0.5' must be a finite number >= 1"),
    (["--batch", "4", "--micro-batches", "3"], "--micro-batches 3 does not divide --batch 4"),
    (["--preset", "nope"], "nope"),
    (["--preset", "default", "--config", "x.toml"], "give at most one of --preset, --config, --hf"),
    (["--layer", "2"], "--layer 2 needs --hf PATH"),
    (["--weights", "/nonexistent/w.safetensors"], "does not exist"),
    (["--bias-lr", "inf"], "argument --bias-lr: 'inf' must be a finite number >= 0"),
])
def test_bad_input_exits_2_with_one_line(argv, expected, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-parity: error: "), err
    assert expected in err


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", "--out", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_weights_that_do_not_fit_exit_2(tmp_path, capsys):
    from parity.config import MoEConfig
    from parity.weights import init_weights, save_weights

    path = tmp_path / "w.safetensors"
    save_weights(path, init_weights(MoEConfig(dim=8, hidden_dim=16, num_experts=4)))
    assert main(["train", "--preset", "default", "--weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert "weights do not match the config" in err


@pytest.mark.slow
def test_bench_train_prints_steps_per_second(tmp_path, capsys):
    """benchmarks/bench_train.py at toy sizes: a broken API breaks CI; timings are not checked."""
    import importlib.util
    import os

    pytest.importorskip("torch")
    pytest.importorskip("jax")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_train.py")
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--steps", "2", "--batch", "2", "--seq-len", "4", "--no-end-to-end", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == ["torch float32", "torch float64", "jax float32", "jax float64"]
    assert all(r["steps_per_s"] > 0 for r in rows)
    assert "steps/s" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_run_writes_report_and_plots(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("dim = 8\nhidden_dim = 16\nnum_experts = 4\ntop_k = 2\nuse_expert_bias = true\n"
                   "route_order = 'scale_first'\n")
    out = tmp_path / "out"
    rc = main(["train", "--config", str(cfg), "--steps", "4", "--batch", "2", "--seq-len", "4", "--lr", "1e-2",
               "--weight-decay", "0.01", "--bias-lr", "1e-2", "--out", str(out), "--quiet", "--no-compile-cache"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "PASS" in text and "band/params" in text
    data = json.loads((out / "report.json").read_text())
    assert data["summary"]["status"] == "pass" and data["settings"]["steps"] == 4
    assert data["settings"]["optimizer"]["weight_decay"] == 0.01
    for name in ("report.md", "loss.png", "drift.png", "routing.png", "expert_load.png"):
        assert (out / name).is_file(), name
