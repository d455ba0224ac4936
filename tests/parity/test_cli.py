"""The ``moe-parity`` command: end-to-end run, files written, exit codes 0 / 1 / 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from parity.cli import main
from parity.presets import get_preset
from parity.weights import init_weights, save_weights


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_end_to_end_writes_reports(tmp_path, capsys):
    pytest.importorskip("moe_torch")
    pytest.importorskip("moe_jax")
    code, out, err = run(capsys, "run", "--out", str(tmp_path), "--steps", "2", "--quiet")
    assert code == 0, out
    for name in ("report.json", "report.md", "errors_forward.png", "errors_grad.png", "expert_load.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == "moe-parity/report/1"
    assert report["summary"]["status"] == "pass"
    ran = set(report["summary"]["backends_ran"])
    assert {"torch:cpu", "jax:cpu"} <= ran
    skipped = {b["name"] for b in report["backends"] if b["status"] == "skipped"}
    assert {"torch:cuda", "torch:npu", "jax:gpu"} <= skipped | ran
    assert "PASS" in out

    # compare: identical reports -> 0; a report with a new failure -> 1
    code, out, _ = run(capsys, "compare", str(tmp_path / "report.json"), str(tmp_path / "report.json"))
    assert code == 0
    report["checks"][0]["status"] = "FAIL"
    (tmp_path / "b.json").write_text(json.dumps(report))
    code, out, _ = run(capsys, "compare", str(tmp_path / "report.json"), str(tmp_path / "b.json"))
    assert code == 1 and "1 regression" in out


def test_failure_exit_code_is_1(tmp_path, capsys):
    # weights that make the fake backend disagree are not a usage error: the run fails (exit 1)
    w = init_weights(get_preset("default").config, 0)
    w["experts.w1"] = np.full_like(w["experts.w1"], np.nan)
    path = tmp_path / "nan.safetensors"
    save_weights(path, w)
    code, out, _ = run(capsys, "run", "--weights", str(path), "--backends", "reference", "--quiet",
                       "--no-grads", "--steps", "0")
    assert code == 0  # NaN in both the reference and the fake backend agree (NaN == NaN)
    # zero tolerance: float32 rounding alone fails the torch-vs-reference checks
    code, out, _ = run(capsys, "run", "--backends", "torch:cpu", "--quiet", "--no-grads", "--steps", "0",
                       "--rtol", "0", "--atol", "0")
    assert code == 1 and "FAIL" in out


def test_no_backend_could_run_is_exit_2_never_a_pass(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, out, err = run(capsys, "run", "--backends", "torch:cuda", "--quiet")
    assert code == 2
    assert "none of the selected backends could run here" in err and "torch:cuda" in err


@pytest.mark.parametrize("argv, message", [
    (["run", "--preset", "gpt-5"], "unknown preset 'gpt-5'; known presets: default"),
    (["run", "--backends", "torch:tpu"], "unknown backend 'torch:tpu'; known backends:"),
    (["run", "--weights", "/nonexistent/w.safetensors"], "does not exist"),
    (["run", "--dtype", "int8"], "invalid choice"),
    (["run", "--mesh", "dp=2"], "mesh axis 'dp' is not supported"),
    (["run", "--mesh", "ep2"], "--mesh 'ep2'"),
    (["run", "--tol", "float32=abc"], "--tol"),
    (["run", "--preset", "default", "--config", "x.toml"], "at most one of"),
    (["init-weights", "--preset", "nope", "--out", "x.safetensors"], "unknown preset"),
    (["compare", "/nonexistent/a.json", "/nonexistent/b.json"], "cannot read report"),
])
def test_bad_usage_exits_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.startswith("moe-parity: error: ") and len(err.strip().splitlines()) == 1


def test_corrupt_weights_file_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00\x01 not a safetensors file")
    code, _, err = run(capsys, "run", "--weights", str(path), "--preset", "default")
    assert code == 2 and "cannot read weights file" in err


def test_weights_not_matching_config_lists_keys(tmp_path, capsys):
    path = tmp_path / "mixtral.safetensors"
    assert main(["init-weights", "--preset", "mixtral-8x7b", "--out", str(path)]) == 0
    code, _, err = run(capsys, "run", "--preset", "deepseek-v3", "--weights", str(path))
    assert code == 2
    assert "weights do not match the config" in err.splitlines()[0]
    assert "'experts.w1' has shape [8, 224, 64], expected [32, 16, 64]" in err
    assert "missing 'shared_expert.w1.weight'" in err


def test_init_weights_then_run_uses_stored_config(tmp_path, capsys):
    path = tmp_path / "olmoe.safetensors"
    assert main(["init-weights", "--preset", "olmoe", "--seed", "3", "--out", str(path)]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "run", "--weights", str(path), "--backends", "reference", "--json",
                       "--no-grads", "--steps", "1")
    assert code == 0
    report = json.loads(out)
    assert report["settings"]["config"]["num_experts"] == 64
    assert report["settings"]["preset"] == "weights:olmoe.safetensors"


def test_config_file_toml_and_json(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('dim = 16\nhidden_dim = 24\nnum_experts = 4\ntop_k = 2\nscore_func = "softmax"\n')
    code, out, _ = run(capsys, "run", "--config", str(toml), "--backends", "reference", "--json", "--steps", "0")
    assert code == 0 and json.loads(out)["settings"]["config"]["num_experts"] == 4
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"dim": 16, "top_k": 99}))
    code, _, err = run(capsys, "run", "--config", str(bad))
    assert code == 2 and "top_k=99 exceeds num_experts=8" in err


def test_presets_command(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    for name in ("default", "mixtral-8x7b", "deepseek-v3", "deepseek-v2-lite", "qwen3-moe", "olmoe"):
        assert name in out


def test_hf_backend_without_checkpoint_is_skipped(capsys):
    code, out, _ = run(capsys, "run", "--backends", "reference,hf:cpu", "--json", "--no-grads", "--steps", "0")
    report = json.loads(out)
    hf = next(b for b in report["backends"] if b["name"] == "hf:cpu")
    assert hf["status"] == "skipped" and code == 0


def test_console_script_and_cheap_import():
    res = subprocess.run([sys.executable, "-c", "import sys, parity, parity.cli, parity.harness, parity.report; "
                          "print(sorted(m for m in ('torch', 'jax', 'flax') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "parity.cli", "run", "--preset", "nope"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown preset" in res.stderr
