"""``parity.testing.assert_moe_parity``, the pytest plugin and plugins by entry point (issue 16),
with the worked example of docs/columns.md: each planted bug of docs/examples/example_port.py caught."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from parity import cli
from parity.backends.plugins import list_backends, resolve_backend
from parity.testing import assert_moe_parity

pytest.importorskip("torch")

from docs.examples import example_port as port  # noqa: E402  (the repository root is on sys.path)

#: the rows that name each planted bug (docs/columns.md, "Worked example")
CAUGHT_BY = {
    "softmax_after_topk": ["forward/routing_weights/", "forward/out/"],
    "no_route_scale": ["forward/routing_weights/", "forward/out/"],
    "swap_w1_w3": ["forward/out/"],
    "bias_in_weights": ["forward/routing_weights/", "forward/out/"],
    "ties_high": ["routing/selected_experts/"],
}


def test_clean_port_passes_everything():
    weights, x = port.example_inputs()
    report = assert_moe_parity(port.make_column(), config=port.CONFIG, weights=weights, x=x, steps=1)
    mine = [c for c in report.checks if c.backend.startswith("tiny-port")]
    assert {c.kind for c in mine} == {"forward", "routing", "grad", "bias"}
    assert all(c.status == "PASS" for c in mine)
    assert report.backends_ran == ["tiny-port", "torch:cpu"]


@pytest.mark.parametrize("bug", port.BUGS)
def test_each_planted_bug_is_caught(bug):
    weights, x = port.example_inputs()
    with pytest.raises(AssertionError) as info:
        assert_moe_parity(port.make_column((bug,)), config=port.CONFIG, weights=weights, x=x, grads=False, steps=0)
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0].startswith(f"moe-parity: {len(lines) - 1} failing row(s) for column tiny-port[{bug}]")
    for prefix in CAUGHT_BY[bug]:
        assert any(line.startswith(f"FAIL {prefix}tiny-port[{bug}]~reference") for line in lines), message
    if bug == "ties_high":  # the only finding: two zero tokens, an exact tie broken to the higher index
        assert len(lines) == 2 and "exact tie (margin 0)" in lines[1] and "[0, 1]" in lines[1]


def test_missing_capability_asked_for_fails_with_a_hint():
    from parity.backends.torch_module import TorchModuleColumn

    col = TorchModuleColumn(lambda cfg: port.TinyMoE(cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k,
                                                     cfg.route_scale), port.MAPPING, grads=False, name="no-grads")
    with pytest.raises(AssertionError, match=r"cannot give gradients \(gradients turned off.*pass grads=False"):
        assert_moe_parity(col, config=port.CONFIG)


def test_unavailable_column_fails():
    with pytest.raises(AssertionError, match="cannot run here: no CUDA device|cannot run here"):
        from parity.backends.torch_module import TorchModuleColumn

        col = TorchModuleColumn(port.TinyMoE, port.MAPPING, device="cuda")
        if col.unavailable() is None:
            pytest.skip("a CUDA device is present")
        assert_moe_parity(col, config=port.CONFIG)


# ---- the pytest plugin -----------------------------------------------------------------------------
def test_plugin_fixtures_parametrise_and_check(moe_preset, moe_dtype, moe_parity, request):
    assert request.node.callspec.params == {"moe_preset": moe_preset, "moe_dtype": moe_dtype}
    assert moe_preset == "default" and moe_dtype in ("float32", "bfloat16")
    report = moe_parity("reference:cpu", grads=False, steps=1, against=())
    assert report.settings["preset"] == "default" and report.settings["dtype"] == moe_dtype


def test_plugin_is_registered_and_imports_nothing_heavy():
    code = ("import importlib.metadata as m, sys; import parity.pytest_plugin; "
            "print([e.value for e in m.entry_points(group='pytest11') if e.name == 'moe_parity']); "
            "print(sorted(k for k in ('torch', 'jax', 'numpy', 'parity.testing', 'parity.harness') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['parity.pytest_plugin']", "[]"]


# ---- plugins by entry point: a tiny package with a .dist-info on sys.path ------------------------
@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    (tmp_path / "tinyport_plugin.py").write_text(textwrap.dedent("""
        from docs.examples.example_port import make_column

        def broken():
            raise RuntimeError("never built")
    """))
    (tmp_path / "brokenplug.py").write_text("import no_such_dependency\n")
    info = tmp_path / "tinyport_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyport-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moe_parity.backends]\ntiny-port = tinyport_plugin:make_column\n"
                                           "broken-import = brokenplug:make\nbroken-factory = tinyport_plugin:broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # the built-in rows are tested elsewhere; probing JAX's gpu/tpu platforms costs seconds
    monkeypatch.setattr("parity.backends.KNOWN_BACKENDS", ("torch:cpu", "reference:cpu"))
    return tmp_path


def test_entry_point_plugin_resolves_and_is_listed(installed_plugins):
    assert resolve_backend("tiny-port").name == "tiny-port"
    rows = {r.name: r for r in list_backends()}
    assert rows["tiny-port"].kind == "plugin" and rows["tiny-port"].available
    assert rows["broken-import"].reason.startswith("plugin import error: ModuleNotFoundError")
    assert "RuntimeError: never built" in rows["broken-factory"].reason
    assert rows["torchtitan:cpu"].kind == "peer" and rows["torch:cpu"].available


def test_cli_backends_lists_plugins_and_runs_one(installed_plugins, capsys):
    assert cli.main(["backends", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["tiny-port"]["source"] == "tinyport_plugin:make_column"
    assert not listed["broken-import"]["available"]
    assert cli.main(["run", "--backends", "broken-import"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "plugin 'broken-import' (brokenplug:make): import failed: ModuleNotFoundError" in err
