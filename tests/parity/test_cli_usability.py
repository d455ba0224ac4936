"""The CLI as people meet it (issue 14): 80 columns, presets on one line each, install hints, the cache."""

import os
import subprocess
import sys

import pytest

from parity.cli import EXIT_CODES, build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_table_fits_80_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "run", "--backends", "reference", "--quiet", "--steps", "1")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out and "..." not in out
    assert "backend vs reference" in out  # the compact layout


def test_presets_one_line_each_at_120_columns(monkeypatch, capsys):
    from parity.presets import PRESETS

    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run(capsys, "presets")
    assert code == 0
    for name in PRESETS:
        (line,) = [ln for ln in out.splitlines() if ln.split() and ln.split()[0] == name]
        assert len(line) <= 120
    rows = [ln for ln in out.splitlines() if ln.split() and ln.split()[0] in PRESETS]
    assert len(rows) == len(PRESETS)
    assert len(out.splitlines()) <= len(PRESETS) + 5  # title, header, caption: not 70 lines


def test_help_states_the_exit_codes_the_cli_returns():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    assert " ".join(EXIT_CODES.split()) in help_text
    assert "none of the selected backends could run" in EXIT_CODES and "2 bad usage" in EXIT_CODES


def test_no_backend_message_gives_the_install_command(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, err = run(capsys, "run", "--backends", "torch:cuda", "--quiet")
    assert code == 2
    assert 'pip install "moe-parity[torch]"' in err and "download.pytorch.org/whl/cpu" in err


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
try:
    import {package}
except ImportError as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize("package, blocked, extra", [
    ("moe_torch", ("torch",), "moe-parity[torch]"),
    ("moe_jax", ("jax", "flax"), "moe-parity[jax]"),
    ("moe_jax", ("flax",), "moe-parity[jax]"),
])
def test_import_without_the_extra_names_it(package, blocked, extra):
    code = BLOCK.format(blocked=set(blocked), package=package)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("ImportError ") and f'pip install "{extra}"' in res.stdout, res.stdout + res.stderr


def _cli_run(env_extra, *flags):
    pytest.importorskip("moe_jax")
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "parity.cli", "run", "--backends", "jax:cpu", "--quiet",
                           "--no-grads", "--steps", "0", "--batch", "1", "--seq-len", "2", *flags],
                          capture_output=True, text=True, env=env)


def test_compile_cache_is_written_and_can_be_turned_off(tmp_path):
    on = tmp_path / "cache"
    res = _cli_run({"MOE_PARITY_JAX_CACHE": str(on)})
    assert res.returncode == 0, res.stderr
    assert on.is_dir() and any(on.iterdir())
    off = tmp_path / "off"
    res = _cli_run({"MOE_PARITY_JAX_CACHE": str(off)}, "--no-compile-cache")
    assert res.returncode == 0, res.stderr
    assert not off.exists()


def test_readme_summary_names_every_flag_and_backend_of_run():
    from pathlib import Path

    from parity.backends import KNOWN_BACKENDS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    summary = readme.split("## The main job: `moe-parity run`")[1].split("For one config")[0]
    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = [opt for action in run_parser._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"]
    missing = [f for f in flags if f not in summary]
    assert not missing, missing
    assert not [b for b in KNOWN_BACKENDS if f"`{b}`" not in summary]


def test_version_prints_the_installed_version_and_exits_0(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"moe-parity {version('moe-parity')}"
