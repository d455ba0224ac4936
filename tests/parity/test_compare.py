"""``moe-parity compare`` (issue 14): setting warnings, ULP columns as in run, directories, --factor."""

import json

import pytest

from parity.backends.reference_backend import ReferenceRunner
from parity.cli import main
from parity.config import MoEConfig
from parity.harness import Settings, run_parity
from parity.report import Report, compare_reports
from parity.weights import init_weights

CFG = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2)


def write_report(folder, **settings) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    kw = {"batch": 1, "seq_len": 4, "steps": 1, "grads": False, **settings}
    report = run_parity(Settings(cfg=CFG, **kw), init_weights(CFG, kw.get("seed", 0)), [ReferenceRunner()])
    (folder / "report.json").write_text(report.to_json())
    return report.to_dict()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_accepts_directories_and_defines_regression(tmp_path, capsys):
    write_report(tmp_path / "a")
    code, out, err = run(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "a"))
    assert code == 0, err
    out = " ".join(out.split())
    assert "0 regression(s)" in out and "A regression is a check that passed" in out
    assert "warning" not in out
    assert "none changed status or max abs (--all lists them)" in out and "max abs A" not in out
    code, out, _ = run(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "a"), "--all")
    assert code == 0 and "max abs A" in " ".join(out.split()) and "none changed" not in out
    code, _, err = run(capsys, "compare", str(tmp_path), str(tmp_path / "a"))
    assert code == 2 and "without report.json" in err


def test_compare_warns_on_different_settings(tmp_path, capsys):
    write_report(tmp_path / "a")
    write_report(tmp_path / "b", seed=1, dtype="bfloat16", preset="other")
    code, out, _ = run(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json"))
    text = " ".join(out.split())
    for key in ("dtype differs: 'float32' -> 'bfloat16'", "seed differs: 0 -> 1", "preset differs"):
        assert key in text, key


def test_compare_warns_on_different_backends():
    a = Report(backends=[{"name": "torch:cpu", "status": "ran", "reason": ""}])
    b = Report(backends=[{"name": "jax:cpu", "status": "ran", "reason": ""}])
    from parity.report import compare_settings

    (line,) = compare_settings(a, b)
    assert "only in A torch:cpu" in line and "only in B jax:cpu" in line


def test_error_growth_beyond_the_factor_is_a_regression(tmp_path, capsys):
    data = write_report(tmp_path / "a")
    row = next(c for c in data["checks"] if isinstance(c["tol_ratio"], float) and 0 < c["tol_ratio"] < 0.01)
    grown = json.loads(json.dumps(data))
    next(c for c in grown["checks"] if c["id"] == row["id"])["tol_ratio"] = 0.5  # still a PASS, far worse
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "report.json").write_text(json.dumps(grown))
    rows, regressed = compare_reports(Report.from_dict(data), Report.from_dict(grown), factor=10)
    assert regressed == [row["id"]]
    assert next(r for r in rows if r["id"] == row["id"])["ulp_a"] == row["ulp_at_scale"]  # run's ULP column
    code, out, _ = run(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1 and "1 regression(s)" in out
    # a factor above the growth: no regression
    factor = 2 * 0.5 / row["tol_ratio"]
    code, out, _ = run(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--factor", str(factor))
    assert code == 0, out


@pytest.mark.parametrize("bad", ["1", "0.5", "nan", "inf", "-3", "x"])
def test_factor_is_validated(tmp_path, capsys, bad):
    write_report(tmp_path / "a")
    code, _, err = run(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "a"), "--factor", bad)
    assert code == 2 and "--factor" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="factor"):
        compare_reports(Report(), Report(), factor=float(bad) if bad != "x" else "x")
