"""The terminal table fits the terminal (issue 14): rendered to fixed-width rich consoles, no cell is cut.

A report with the longest names a run produces (mesh columns, their float64 runs, shared-expert
gradients, a near-tie WARN, a FAIL, skipped backends and long notes) is rendered at 80 and 120
columns; every line must fit, no "…" / "..." may appear, and every backend name, tensor name and
verdict must be there whole.
"""

import re

import pytest

from parity.report import FAIL, PASS, SKIP, WARN, Check, Report

rich = pytest.importorskip("rich")

MESH = ("torch:cpu[ep=2xtp=2]", "jax:cpu[ep=2xtp=2]")
SINGLE = ("torch:cpu", "jax:cpu")


def _row(kind, tensor, backend, against, status, **kw):
    return Check(id=f"{kind}/{tensor}/{backend}~{against}", kind=kind, tensor=tensor, backend=backend,
                 against=against, dtype=kw.pop("dtype", "bfloat16"), status=status, **kw)


def wide_report() -> Report:
    r = Report(settings={"preset": "deepseek-v3", "dtype": "bfloat16"})
    numbers = dict(max_abs=5.364418029785156e-07, max_rel=1.2e-3, max_ulp=12345678, ulp_at_scale=1234567.5,
                   cosine=0.9999998807907104, tol_ratio=0.019645)
    backends = SINGLE + MESH
    for b in backends:
        r.add(_row("forward", "load_balance_loss", b, "reference", PASS, dtype="float32", **numbers))
        r.add(_row("grad", "shared_expert.w1.weight", b, f"{b}@float64", PASS, **numbers))
        r.add(_row("grad", "router.gate.weight", f"{b}@float64", "jax:cpu[ep=2xtp=2]@float64", PASS,
                   note="float64 answers of the two backends", **numbers))
        r.add(_row("routing", "selected_experts", b, "reference", WARN, masked_tokens=3,
                   note="3/256 token(s) routed differently (near-tie): 17 (margin 1.19e-07), 40 (margin "
                        "2.38e-07), 201 (margin 0.00e+00)"))
    r.add(_row("forward", "out", MESH[0], "torch:cpu", FAIL, note="2 diverged token(s) masked", **{
        **numbers, "tol_ratio": 123.456}))
    r.add(_row("bias", "tokens_per_expert", MESH[1], "reference", PASS, max_abs=0.0, ulp_at_scale=0.0,
               tol_ratio=0.0, dtype="float32"))
    for b in ("torch:cuda", "torch:npu", "jax:gpu"):
        r.add(Check(id=f"backend/{b}", kind="backend", tensor="-", backend=b, against="-", dtype="bfloat16",
                    status=SKIP, note=f"no {b} device here (a reason long enough to need wrapping at 80 "
                                      f"columns, as JAX's own message is)"))
    r.finish()
    return r


def render(report: Report, width: int, **kwargs) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(report.rich_table(width=width, **kwargs))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 120])
def test_table_fits_and_cuts_no_cell(width):
    report = wide_report()
    text = render(report, width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text and "..." not in text
    for name in (*SINGLE, *MESH, "reference", "torch:cuda", "torch:npu", "jax:gpu", "shared_expert.w1.weight",
                 "forward/load_balance_loss", "routing/selected_experts", "1.2e+06"):
        assert name in text, name
    statuses = re.findall(r"^(PASS|FAIL|WARN|SKIP)\b", text, flags=re.M)
    assert len(statuses) == len(report.checks)
    assert sorted(statuses) == sorted(c.status for c in report.checks)
    # every row's numbers are whole: the tolerance ratio of the FAIL row and the max abs of every PASS
    assert "1.23e+02" in text
    assert text.count("5.36e-07") == sum(c.max_abs == numbers_max_abs() for c in report.checks)


def numbers_max_abs():
    return 5.364418029785156e-07


def header(text: str) -> str:
    return next(line for line in text.splitlines() if "max abs" in line)


def test_compact_mode_is_automatic_below_110_columns_and_can_be_forced():
    report = wide_report()
    assert "backend vs reference" in header(render(report, 80))
    assert "cosine" not in header(render(report, 80))
    wide = header(render(report, 160))
    assert "cosine" in wide and "against" in wide
    assert "cosine" not in header(render(report, 160, compact=True))


def test_routing_rows_carry_the_token_count_in_the_check_not_in_max_abs():
    report = wide_report()
    text = render(report, 120)
    routing = [line for line in text.splitlines() if line.startswith("WARN")]
    assert len(routing) == 4 and all("routing/selected_experts: 3" in line for line in routing)
    assert text.count("token(s) differ") == 4
    assert all(re.search(r"\s-\s+-\s+-\s*$", line) for line in routing), routing  # no figures in max abs/ULP/tol
