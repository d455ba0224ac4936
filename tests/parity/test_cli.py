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
    # NaN weights are refused (exit 2, each key and count named); NaN against NaN used to PASS (exit 0)
    w = init_weights(get_preset("default").config, 0)
    w["experts.w1"] = np.full_like(w["experts.w1"], np.nan)
    path = tmp_path / "nan.safetensors"
    save_weights(path, w)
    argv = ("run", "--weights", str(path), "--backends", "reference", "--quiet", "--no-grads", "--steps", "0")
    code, out, err = run(capsys, *argv)
    assert code == 2 and "'experts.w1': 65536 NaN" in err and len(err.strip().splitlines()) == 1
    # opted in: NaN positions are compared as masks, and the fake backend's agree with the reference's
    code, out, err = run(capsys, *argv, "--allow-nonfinite", "--json")
    assert code == 0 and json.loads(out)["settings"]["allow_nonfinite"] is True
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
    (["run", "--mesh", "etp=2"], "mesh axis 'etp' is not supported"),
    (["run", "--mesh", "ep=2", "--processes", "3"], "processes=3"),
    (["run", "--processes", "2"], "--processes 2 needs --mesh"),
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


# ------------------------------------------------------------------ issue 12: the CLI fails early
RUN = ["run", "--backends", "reference", "--quiet", "--no-grads", "--steps", "0"]


def _malformed() -> list[tuple[list[str], str]]:
    """(argv, text the one error line must hold): every bad value of every checked flag.

    ``{tmp}`` is replaced by a temporary folder holding ``file.txt``, ``nan.safetensors`` (one NaN),
    ``int.safetensors`` (int32 tensors).
    """
    cases = []
    for flag in ("--rtol", "--atol", "--tie-tol"):
        for value in ("-1", "-1e-9", "nan", "inf", "-inf", "1e400", "abc"):
            cases.append(([*RUN, flag, value], f"argument {flag}: {value!r}"))
    for flag, values in (("--seed", ("-5", "1.5", "x")), ("--max-rows", ("-3", "two")), ("--batch", ("0", "-2")),
                         ("--seq-len", ("0",)), ("--steps", ("-1",)), ("--layer", ("-1",)),
                         ("--bias-lr", ("nan", "inf"))):
        for value in values:
            cases.append(([*RUN, flag, value], f"argument {flag}: {value!r}"))
    for spec in ("float32=-1,-1", "float32=1,-1", "float32=nan,0", "float32=0,inf", "int8=1,1", "float32=1"):
        cases.append(([*RUN, "--tol", spec], f"--tol {spec!r}"))
    cases += [
        ([*RUN, "--mesh", "ep=3", "--batch", "6"], "--mesh ep=3: num_experts=8 is not divisible by ep=3"),
        ([*RUN, "--mesh", "tp=3"], "--mesh tp=3: hidden_dim=128 is not divisible by tp=3"),
        ([*RUN, "--mesh", "ep=2xtp=3"], "hidden_dim=128 is not divisible by tp=3"),
        ([*RUN, "--mesh", "ep=0"], "ep=0"),
        ([*RUN, "--mesh", "ep=4"], "batch=2 is not divisible by ep=4"),
        ([*RUN, "--out", "/proc"], "--out '/proc': cannot write there"),
        ([*RUN, "--layer", "2"], "--layer 2 needs --hf"),
        ([*RUN, "--out", "{tmp}/file.txt"], "file.txt' exists and is not a directory"),
        ([*RUN, "--out", "{tmp}/file.txt/sub"], "file.txt' is not a directory"),
        ([*RUN, "--out", "/proc/moe-parity-no/such"], "/proc/moe-parity-no/such"),
        ([*RUN, "--weights", "{tmp}"], "is a directory; expected a .safetensors file"),
        ([*RUN, "--weights", "{tmp}/nan.safetensors"], "'experts.w2': 1 NaN"),
        ([*RUN, "--weights", "{tmp}/int.safetensors"], "'experts.w1' is int32"),
        (["init-weights", "--out", "{tmp}"], "is a directory; expected a file name"),
        (["init-weights", "--seed", "-5", "--out", "{tmp}/w.safetensors"], "argument --seed: '-5'"),
        (["init-weights", "--out", "{tmp}/file.txt/w.safetensors"], "does not exist"),
    ]
    return cases


MALFORMED = _malformed()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("malformed")
    (tmp / "file.txt").write_text("not a directory")
    w = init_weights(get_preset("default").config, 0)
    save_weights(tmp / "nan.safetensors", {**w, "experts.w2": np.where(np.arange(w["experts.w2"].size).reshape(
        w["experts.w2"].shape) == 7, np.nan, w["experts.w2"]).astype(np.float32)})
    save_weights(tmp / "int.safetensors", {k: v.astype(np.int32) for k, v in w.items()})
    return tmp


@pytest.mark.parametrize("argv, expected", MALFORMED, ids=[" ".join(a[len(RUN):] if a[0] == "run" else a)
                                                            for a, _ in MALFORMED])
def test_malformed_arguments_exit_2_with_one_line(bad_files, capsys, argv, expected):
    argv = [a.replace("{tmp}", str(bad_files)) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-parity: error: "), err
    assert expected.replace("{tmp}", str(bad_files)) in lines[0], lines[0]


def test_out_is_checked_before_the_run_and_created_at_the_end(tmp_path, capsys):
    out = tmp_path / "new" / "dir"
    code, _, err = run(capsys, *RUN, "--out", str(out))
    assert code == 0 and (out / "report.json").is_file(), err
    # the probe leaves nothing behind when the run stops at a usage error
    code, _, _ = run(capsys, *RUN, "--out", str(tmp_path / "other"), "--rtol", "-1")
    assert code == 2 and not (tmp_path / "other").exists()
    code, _, _ = run(capsys, *RUN, "--out", str(tmp_path / "other"), "--preset", "nope")
    assert code == 2 and not (tmp_path / "other").exists()


def test_float64_weights_file_is_converted_with_a_note(tmp_path, capsys):
    w = init_weights(get_preset("default").config, 0)
    save_weights(tmp_path / "w64.safetensors", {k: v.astype(np.float64) for k, v in w.items()})
    code, out, _ = run(capsys, *RUN, "--weights", str(tmp_path / "w64.safetensors"), "--out", str(tmp_path / "r"))
    assert code == 0
    assert "weights converted to the run's dtype float32" in out
    line = ("weights converted to the run's dtype float32 (buffers to float32): expert_bias, experts.w1, "
            "experts.w2, experts.w3, router.gate.weight, tokens_per_expert from float64")
    assert f"- note: {line}\n" in (tmp_path / "r" / "report.md").read_text()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["notes"] == [line]


def test_saved_weights_get_the_umask_mode_not_0600(tmp_path):
    import os
    import stat

    from parity.config import MoEConfig

    old = os.umask(0o022)
    try:
        save_weights(tmp_path / "w.safetensors", init_weights(MoEConfig(dim=4, hidden_dim=8, num_experts=2, top_k=1)))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
