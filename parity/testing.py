"""Parity checks for a team's own pytest suite (docs/columns.md, "pytest").

``assert_moe_parity(column, preset="default", dtype="float32", grads=True, steps=3)`` runs the
harness (``parity.harness.run_parity``) on one column, and by default also on this project's own
torch layer ("torch:cpu", ``against``) so that gradients are compared with a second implementation
and not only with the column's own float64 run. It raises ``AssertionError`` whose message is the
report's failing rows, and returns the ``parity.report.Report`` when nothing failed.

What fails: every FAIL row; a column that cannot run here (its ``unavailable()`` reason); a
capability the call asks for and the column lacks (``grads=True`` without gradients, ``steps > 0``
without bias steps: pass ``grads=False`` / ``steps=0`` to leave them out); with ``exact_ties`` (the
default) a routing divergence on tokens whose float64 selection margin is exactly 0, i.e. a true tie
that DESIGN.md step 4 breaks to the lower expert index (the harness shows these as near-tie WARN
rows, as a float rounding may produce them; an exact tie cannot come from rounding).

Imports nothing heavy at import time (the pytest plugin imports this module lazily).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from parity.report import FAIL, Report

__all__ = ["assert_moe_parity", "failing_rows", "resolve_column"]


def resolve_column(column):
    """A ``Runner`` from a runner, a backend spec string ("torch:cpu", "pkg.mod:make_column", an
    installed plugin's name) or a factory taking no argument. ``TypeError`` / ``ValueError`` else."""
    from parity.backends.base import Runner
    from parity.backends.plugins import is_runner, resolve_backend

    if isinstance(column, str):
        return resolve_backend(column)
    if isinstance(column, Runner) or is_runner(column):
        return column
    if callable(column):
        made = column()
        if is_runner(made):
            return made
        raise TypeError(f"{getattr(column, '__name__', column)!r} returned {type(made).__name__}; expected a "
                        f"parity.backends.Runner (docs/columns.md)")
    raise TypeError(f"column={column!r}: expected a parity.backends.Runner, a backend spec string or a factory")


def failing_rows(report: Report, column: str | None = None, exact_ties: bool = True) -> list[str]:
    """One line per failing row of ``report`` (see the module docstring), worst first."""
    lines = []
    for c in sorted(report.checks, key=lambda c: c.sort_key()):
        if c.status == FAIL:
            figures = ", ".join(f"{k} {v:.3g}" for k, v in (("max_abs", c.max_abs), ("ulp_at_scale", c.ulp_at_scale),
                                                           ("tol_ratio", c.tol_ratio))
                                if isinstance(v, (int, float)) and v is not None)
            lines.append(f"FAIL {c.id} [{c.dtype}]" + (f" {figures}" if figures else "") +
                         (f": {c.note}" if c.note else ""))
    if exact_ties:
        for r in report.routing:
            if r.count and r.against == "reference" and all(m == 0.0 for m in r.margins):
                experts = "; ".join(f"token {t}: {b} where DESIGN step 4 gives {a}" for t, b, a in
                                    list(zip(r.tokens, r.backend_experts, r.against_experts, strict=True))[:3])
                lines.append(f"FAIL routing/selected_experts/{r.backend}~{r.against}: {r.count} token(s) with an "
                             f"exact tie (margin 0) routed differently; ties go to the lower expert index "
                             f"({experts})")
    if column is not None and column not in report.backends_ran:
        reason = next((b["reason"] for b in report.backends if b["name"] == column), "did not run")
        lines.insert(0, f"FAIL backend/{column}: skipped: {reason}")
    return lines


def assert_moe_parity(column, preset: str = "default", dtype: str = "float32", *, grads: bool = True,
                      steps: int = 3, config=None, weights: Mapping[str, np.ndarray] | None = None,
                      x: np.ndarray | None = None, batch: int = 2, seq_len: int = 8, seed: int = 0,
                      lock_routing: bool = False, tolerances: Mapping | None = None, tie_tol: float = 1e-4,
                      exact_ties: bool = True, against: Sequence[str] = ("torch:cpu",)) -> Report:
    """Run the parity checks on ``column`` and raise ``AssertionError`` (the failing rows) on a failure.

    column: a ``parity.backends.Runner``, a backend spec string or a factory (``resolve_column``).
    preset: a ``parity.presets`` name, or ``config``: a ``MoEConfig`` (wins over ``preset``).
    dtype: one of ``parity.metrics.DTYPES``. grads: check gradients (the column must give them).
    steps: expert-bias update steps (0: none; > 0: the column must give bias steps). weights:
    canonical weights (default ``parity.weights.init_weights(cfg, seed)``); x: ``[B, S, D]`` input
    (default from the seed; ``batch`` x ``seq_len``). tolerances / tie_tol / lock_routing: as
    ``parity.harness.Settings``. exact_ties: a routing difference on an exact tie fails.
    against: other backends run alongside (absent ones are left out; their own failures count too).
    Returns the report. Raises ``ValueError`` for bad settings (from ``Settings``) and
    ``parity.weights.WeightsError`` for weights that do not fit the config.
    """
    from parity.backends import make_runner
    from parity.harness import Settings, run_parity
    from parity.weights import init_weights

    runner = resolve_column(column)
    if config is None:
        from parity.presets import get_preset

        config = get_preset(preset).config
        label = preset
    else:
        label = "config"
    reason = runner.unavailable()
    if reason:
        raise AssertionError(f"column {runner.name} cannot run here: {reason}")
    missing = [(cap, why) for cap, why in (("grad", "grads=False"), ("bias", "steps=0"))
               if (grads if cap == "grad" else steps > 0) and cap not in runner.capabilities]
    if missing:
        raise AssertionError("; ".join(
            f"column {runner.name} cannot give {'gradients' if cap == 'grad' else 'bias steps'} "
            f"({runner.skip_reasons.get(cap, 'not in its capabilities')}); pass {why} to leave them out"
            for cap, why in missing))
    others = []
    for name in against:
        other = make_runner(name)
        if other.name != runner.name and other.unavailable() is None:
            others.append(other)
    settings = Settings(cfg=config, dtype=dtype, batch=batch if x is None else int(np.shape(x)[0]),
                        seq_len=seq_len if x is None else int(np.shape(x)[1]), seed=seed, steps=steps,
                        lock_routing=lock_routing, tolerances=dict(tolerances or {}), tie_tol=tie_tol,
                        preset=label, grads=grads)
    if weights is None:
        weights = init_weights(config, seed)
    report = run_parity(settings, weights, [runner, *others], x=x)
    lines = failing_rows(report, runner.name, exact_ties)
    if lines:
        head = (f"moe-parity: {len(lines)} failing row(s) for column {runner.name} (preset {label}, dtype {dtype}, "
                f"against the float64 reference{''.join(', ' + o.name for o in others)}):")
        raise AssertionError("\n".join([head, *lines]))
    return report
