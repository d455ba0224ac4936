"""Plots of a ``TrainReport`` (matplotlib ``Figure`` objects, no pyplot state; headless).

``plot_loss`` (every run's objective per step), ``plot_drift`` (max abs weight difference per step
on a log scale: torch vs JAX, each against its truth run, the truth runs against each other, and the
band's limit shaded), ``plot_routing_agreement`` (share of tokens whose expert set equals the truth
run's), ``plot_load`` (per-expert share of the tokens over steps, ``parity.plots.plot_load_over_steps``).
``save_plots(report, out_dir)`` writes loss.png, drift.png, routing.png, expert_load.png.
"""

from __future__ import annotations

import os

import numpy as np

from parity.plots import _figure, plot_load_over_steps

_STYLE = {"torch": ("tab:blue", "-"), "jax": ("tab:orange", "--")}


def _style(run: str):
    colour, line = _STYLE.get(run.split("@")[0], ("tab:grey", "-"))
    return colour, (":" if "@" in run else line), (1.2 if "@" in run else 1.8)


def plot_loss(report, title: str = "objective per step"):
    fig, (ax,) = _figure(1, 1, panel=(7.0, 3.4))
    for run, h in report.history.items():
        colour, line, width = _style(run)
        ax.plot(np.arange(len(h["loss"])), h["loss"], color=colour, linestyle=line, linewidth=width, label=run)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE + aux losses)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def plot_drift(report, title: str | None = None):
    """Max abs weight difference per step (log scale) with the band of the "params" metric."""
    fig, (ax,) = _figure(1, 1, panel=(7.0, 3.8))
    truth = report.truth
    styles = {"torch~jax": ("black", "-", 2.0), f"torch~torch@{truth}": ("tab:blue", "--", 1.4),
              f"jax~jax@{truth}": ("tab:orange", "--", 1.4), f"torch@{truth}~jax@{truth}": ("tab:green", ":", 1.4)}
    tiny = np.finfo(np.float64).tiny
    for key, values in report.drift.items():
        colour, line, width = styles.get(key, ("grey", "-", 1.0))
        v = np.asarray(values, np.float64)
        ax.plot(np.arange(len(v)), np.maximum(v, tiny), color=colour, linestyle=line, linewidth=width,
                label=key.replace("~", " vs "))
    row = next((r for r in report.verdict.rows if r.metric == "params"), None)
    if row is not None:
        steps = np.arange(len(row.limit))
        limit = np.maximum(np.asarray(row.limit, np.float64), tiny)
        ax.fill_between(steps, tiny, limit, color="tab:green", alpha=0.12,
                        label=f"band: {report.verdict.factor:g} x own drift + 1 ULP")
        if row.first_exit is not None:
            ax.axvline(row.first_exit, color="tab:red", linestyle=":", linewidth=1.2,
                       label=f"left the band at step {row.first_exit}")
    positive = [x for v in report.drift.values() for x in v if x > 0 and np.isfinite(x)]
    if positive:
        ax.set_ylim(min(positive) / 10, max(positive) * 10)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max |weight difference|")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or f"drift of the weights ({report.settings.get('dtype')}, truth {truth})", fontsize=10)
    return fig


def plot_routing_agreement(report, title: str | None = None):
    fig, (ax,) = _figure(1, 1, panel=(7.0, 3.2))
    for run in ("torch", "jax"):
        h = report.history.get(run)
        if h:
            colour, line, width = _style(run)
            ax.plot(np.arange(len(h["routing_agreement"])), h["routing_agreement"], color=colour,
                    linestyle=line, linewidth=width, label=f"{run} vs {run}@{report.truth}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens with the same experts")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "routing agreement with the truth run", fontsize=10)
    return fig


def plot_load(report, smooth: int = 1):
    loads = {run: np.asarray(h["tokens_per_expert"], np.float64) for run, h in report.history.items() if "@" not in run}
    return plot_load_over_steps(loads, smooth=smooth, title="share of tokens per expert while training")


def save_plots(report, out_dir) -> list[str]:
    """Write loss.png, drift.png, routing.png and expert_load.png into ``out_dir``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in (("loss.png", plot_loss(report)), ("drift.png", plot_drift(report)),
                      ("routing.png", plot_routing_agreement(report)), ("expert_load.png", plot_load(report))):
        path = os.path.join(os.fspath(out_dir), name)
        fig.savefig(path, dpi=90)
        paths.append(path)
    return paths
