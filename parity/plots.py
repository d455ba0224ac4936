"""Plots of a parity report, as matplotlib ``Figure`` objects (no pyplot state; works headless).

Public functions take a ``parity.report.Report`` (or plain NumPy data) and return a ``Figure``; the
teaching notebooks call them too. ``save_plots(report, out_dir)`` writes the PNGs of ``moe-parity run``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np


def _figure(n_panels: int, ncols: int = 3, panel=(4.0, 3.0)):
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def error_series(report, kinds=("forward", "grad"), against: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """tensor label -> {"backend vs against": elementwise |error|} from a report's in-memory errors.

    ``against``: keep only rows against that ("reference", "float64" = any ``@float64`` run, or a
    backend name); default: the float64 answers (reference and ``@float64``), i.e. the drift of each side.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for c in report.checks:
        if c.kind not in kinds or c.id not in report.errors:
            continue
        if against is None:
            if not (c.against == "reference" or (c.against.endswith("@float64") and "@" not in c.backend)):
                continue
        elif against == "float64":
            if not c.against.endswith("@float64"):
                continue
        elif c.against != against:
            continue
        out.setdefault(f"{c.kind}: {c.tensor}", {})[f"{c.backend} vs {c.against}"] = report.errors[c.id]
    return out


def plot_error_histograms(report_or_series, kinds=("forward", "grad"), against: str | None = None,
                          bins: int = 40, ncols: int = 3):
    """One panel per tensor: histogram of log10 |error| per (backend, against) pair.

    ``report_or_series``: a ``Report`` from ``run_parity`` (its in-memory errors; a report read back
    from JSON has none) or a mapping tensor -> {label: errors}. Exact zeros are drawn at 1e-20.
    """
    series = report_or_series if isinstance(report_or_series, Mapping) else error_series(
        report_or_series, kinds, against)
    if not series:
        raise ValueError("no elementwise errors to plot (a report read from JSON keeps only summaries)")
    fig, axes = _figure(len(series), ncols)
    for ax, (tensor, by_label) in zip(axes, sorted(series.items()), strict=False):
        logs = {lab: np.log10(np.maximum(np.asarray(e, np.float64), 1e-20)) for lab, e in by_label.items()}
        lo = min(v.min() for v in logs.values() if v.size) if any(v.size for v in logs.values()) else -20
        hi = max(v.max() for v in logs.values() if v.size) if any(v.size for v in logs.values()) else 0
        edges = np.linspace(lo - 0.5, hi + 0.5, bins + 1)
        for lab, v in sorted(logs.items()):
            ax.hist(v, bins=edges, histtype="step", label=lab, linewidth=1.3)
        ax.set_title(tensor, fontsize=9)
        ax.set_xlabel("log10 |error|")
        ax.set_ylabel("elements")
        ax.legend(fontsize=6)
    fig.suptitle("elementwise errors (1e-20 = exact)")
    return fig


def plot_expert_load(load, title: str = "tokens per expert"):
    """Grouped bars: tokens routed to each expert, one bar per backend.

    ``load``: a ``Report`` (its ``expert_load``) or a mapping backend -> counts ``[E]``.
    """
    load = getattr(load, "expert_load", load)
    if not load:
        raise ValueError("no expert load to plot")
    names = list(load)
    counts = np.array([np.asarray(load[n], np.float64) for n in names])
    e = counts.shape[1]
    fig, (ax,) = _figure(1, 1, panel=(max(5.0, 0.25 * e * len(names) ** 0.5), 3.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(e) + (i - (len(names) - 1) / 2) * width, counts[i], width, label=name)
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def plot_bias_trajectory(trajectory, title: str = "expert_bias after each update"):
    """``expert_bias`` per step: one panel per backend, one line per expert.

    ``trajectory``: a ``Report`` (its ``bias_trajectory``) or a mapping backend -> ``[steps, E]``.
    """
    trajectory = getattr(trajectory, "bias_trajectory", trajectory)
    if not trajectory:
        raise ValueError("no bias trajectory to plot")
    fig, axes = _figure(len(trajectory), 3)
    for ax, (name, steps) in zip(axes, trajectory.items(), strict=False):
        arr = np.asarray(steps, np.float64)
        ax.plot(np.arange(1, arr.shape[0] + 1), arr, linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(title)
    return fig


def save_plots(report, out_dir: str | os.PathLike) -> list[str]:
    """Write ``errors_forward.png``, ``errors_grad.png``, ``expert_load.png`` (and
    ``expert_bias.png`` when there were update steps) into ``out_dir``; return the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    figures = []
    for kind in ("forward", "grad"):
        if error_series(report, (kind,)):
            figures.append((f"errors_{kind}.png", plot_error_histograms(report, (kind,))))
    if report.expert_load:
        figures.append(("expert_load.png", plot_expert_load(report)))
    if report.bias_trajectory:
        figures.append(("expert_bias.png", plot_bias_trajectory(report)))
    for name, fig in figures:
        path = os.path.join(os.fspath(out_dir), name)
        fig.savefig(path, dpi=90)
        paths.append(path)
    return paths
