"""report.md explains itself (issue 14): column legend, tolerances applied, versions, the ULP note."""

from parity.backends.reference_backend import ReferenceRunner
from parity.config import MoEConfig
from parity.harness import Settings, run_parity
from parity.report import Report
from parity.weights import init_weights

CFG = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, score_func="softmax")


def small_report() -> Report:
    settings = Settings(cfg=CFG, batch=1, seq_len=4, steps=1, grads=False,
                        tolerances={"float32": {"rtol": 2e-5, "atol": 3e-6}})
    return run_parity(settings, init_weights(CFG, 0), [ReferenceRunner("reference:cpu")])


def test_markdown_has_legend_tolerances_versions_and_ulp_note():
    report = small_report()
    md = report.to_markdown()
    assert "Columns: **check**" in md and "**ULP at scale**" in md and "**tol ratio**" in md
    assert "## Tolerances applied" in md
    assert "| forward | float32 | 2e-05 | 3e-06 |" in md  # the override, as applied
    assert "| grad | bfloat16 |" in md
    assert f"tie_tol = {report.settings['tie_tol']}" in md
    for package in ("torch", "jax", "flax", "transformers"):
        assert f"{package} " in md.split("- environment: ")[1].splitlines()[0], package
        assert package in report.environment
    assert "millions of ULPs" in md


def test_markdown_routing_rows_put_the_token_count_in_its_own_column():
    report = small_report()
    md = report.to_markdown()
    header = next(line for line in md.splitlines() if line.startswith("| status |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    routing = next(line for line in md.splitlines() if line.startswith("| PASS | routing/"))
    cells = [c.strip() for c in routing.strip("|").split("|")]
    assert cells[cols.index("tokens")] == "0"
    assert cells[cols.index("max abs")] == "-"
    assert all(c.max_abs is None for c in report.checks if c.kind == "routing")
