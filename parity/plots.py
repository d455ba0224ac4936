"""Plots of a parity report, as matplotlib ``Figure`` objects (no pyplot state; works headless).

Public functions take a ``parity.report.Report`` (or plain NumPy data) and return a ``Figure``; the
teaching notebooks call them too. ``save_plots(report, out_dir)`` writes the PNGs of ``moe-parity run``.

Report plots: ``plot_error_histograms``, ``plot_expert_load``, ``plot_bias_trajectory``. Plain-data
plots for the notebooks: ``plot_routing`` (score and routing-weight heatmaps with the chosen experts),
``plot_load_over_steps`` / ``plot_load_imbalance`` (per-expert load while training) and
``plot_ulp_histograms`` (errors counted in units in the last place).
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


#: line styles and markers cycled over the curves of one panel, so that equal curves stay visible
_STYLES = [("-", "o", 2.6), ("--", "s", 1.9), (":", "^", 1.6), ("-.", "D", 1.3)]


def run_label(report) -> str:
    """"preset default, float32" from a report's settings ("" for plain data)."""
    settings = getattr(report, "settings", None) or {}
    parts = [f"preset {settings['preset']}" if settings.get("preset") else "", settings.get("dtype") or ""]
    return ", ".join(p for p in parts if p)


def error_tolerances(report, kinds=("forward", "grad"), against: str | None = None) -> dict[str, float]:
    """tensor label (as ``error_series``) -> the error its rows allow at the tensor's largest
    ``|expected|`` (``atol * max(1, max|e|) + rtol * max|e|``; the smallest over the plotted rows). An
    element of smaller magnitude is allowed less (``rtol * |e|``), so the mark is an upper bound."""
    series = error_series(report, kinds, against)
    out: dict[str, float] = {}
    limits = getattr(report, "limits", {})
    for c in getattr(report, "checks", []):
        key = f"{c.kind}: {c.tensor}"
        if key in series and f"{c.backend} vs {c.against}" in series[key] and c.id in limits and limits[c.id] > 0:
            out[key] = min(out.get(key, math.inf), limits[c.id])
    return out


def plot_error_histograms(report_or_series, kinds=("forward", "grad"), against: str | None = None,
                          bins: int = 40, ncols: int = 3, tolerances: Mapping[str, float] | None = None,
                          title: str | None = None):
    """One panel per tensor: histogram of log10 |error| per (backend, against) pair.

    ``report_or_series``: a ``Report`` from ``run_parity`` (its in-memory errors; a report read back
    from JSON has none) or a mapping tensor -> {label: errors}. Exact zeros are drawn at 1e-20;
    NaN/Inf errors are left out. Curves differ in line style and marker (equal curves stay visible);
    a panel whose series hold one element each (a loss) is a dot per pair instead of a histogram.
    ``tolerances``: tensor -> allowed error, a red dashed line (default: ``error_tolerances``).
    ``title``: default "elementwise errors" with the report's preset and dtype.
    """
    is_report = not isinstance(report_or_series, Mapping)
    series = error_series(report_or_series, kinds, against) if is_report else report_or_series
    if not series:
        raise ValueError("no elementwise errors to plot (a report read from JSON keeps only summaries)")
    if tolerances is None:
        tolerances = error_tolerances(report_or_series, kinds, against) if is_report else {}
    fig, axes = _figure(len(series), ncols)
    for ax, (tensor, by_label) in zip(axes, sorted(series.items()), strict=False):
        # NaN/Inf errors are no magnitude to bin (the report counts them in each row's ``nonfinite``)
        logs = {lab: np.log10(np.maximum(np.asarray(e, np.float64)[np.isfinite(e)], 1e-20))
                for lab, e in sorted(by_label.items())}
        tol = tolerances.get(tensor)
        if all(v.size <= 1 for v in logs.values()):  # scalars: one dot per pair, not 1-element histograms
            labels = list(logs)
            values = [v[0] if v.size else np.nan for v in logs.values()]
            for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
                style = _STYLES[i % len(_STYLES)]
                ax.plot([v], [i], marker=style[1], linestyle="none", markersize=7, label=lab)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
            ax.set_ylim(-0.7, len(labels) - 0.3)
            ax.set_ylabel("")
        else:
            finite = [v for v in logs.values() if v.size]
            lo = min(v.min() for v in finite) if finite else -20
            hi = max(v.max() for v in finite) if finite else 0
            if tol:
                lo, hi = min(lo, math.log10(tol)), max(hi, math.log10(tol))
            edges = np.linspace(lo - 0.5, hi + 0.5, bins + 1)
            centres = (edges[:-1] + edges[1:]) / 2
            for i, (lab, v) in enumerate(logs.items()):
                linestyle, marker, width = _STYLES[i % len(_STYLES)]
                counts, _ = np.histogram(v, bins=edges)
                ax.step(centres, counts, where="mid", linestyle=linestyle, linewidth=width, label=lab, alpha=0.85)
                nz = counts > 0
                ax.plot(centres[nz], counts[nz], linestyle="none", marker=marker, markersize=3.5,
                        color=ax.lines[-1].get_color(), alpha=0.85)
            ax.set_ylabel("elements")
            ax.legend(fontsize=6)
        if tol:
            ax.axvline(math.log10(tol), color="red", linestyle="--", linewidth=1.0)
            ax.text(math.log10(tol), 0.98, f" tolerance\n {tol:.1e}", color="red", fontsize=6, va="top",
                    transform=ax.get_xaxis_transform())
        ax.set_title(tensor, fontsize=9)
        ax.set_xlabel("log10 |error|  (-20 = exact)")
    label = run_label(report_or_series)
    fig.suptitle(title or ("elementwise errors" + (f" ({label})" if label else "")))
    return fig


def plot_expert_load(load, title: str | None = None):
    """Grouped bars: tokens routed to each expert, one bar per backend (distinct hatches).

    ``load``: a ``Report`` (its ``expert_load``; the title then names its preset and dtype) or a
    mapping backend -> counts ``[E]``.
    """
    label = run_label(load)
    title = title or ("tokens per expert" + (f" ({label})" if label else ""))
    load = getattr(load, "expert_load", load)
    if not load:
        raise ValueError("no expert load to plot")
    names = list(load)
    counts = np.array([np.asarray(load[n], np.float64) for n in names])
    e = counts.shape[1]
    fig, (ax,) = _figure(1, 1, panel=(max(5.0, 0.25 * e * len(names) ** 0.5), 3.2))
    width = 0.8 / len(names)
    hatches = ["", "//", "..", "xx", "\\\\", "++"]
    for i, name in enumerate(names):
        ax.bar(np.arange(e) + (i - (len(names) - 1) / 2) * width, counts[i], width, label=name,
               hatch=hatches[i % len(hatches)], edgecolor="black", linewidth=0.3)
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def plot_bias_trajectory(trajectory, title: str | None = None):
    """``expert_bias`` per step as a heatmap, experts x update steps, one panel per backend; the colour
    is each expert's change since its value after the first update (the lr-sized steps stay visible).

    ``trajectory``: a ``Report`` (its ``bias_trajectory``; the title then names preset and dtype) or a
    mapping backend -> ``[steps, E]``. Every panel shares one colour scale (the colour bar); a
    panel's title says whether it equals the "reference" trajectory bit for bit, or by how much it
    differs.
    """
    label = run_label(trajectory)
    title = title or ("expert_bias after each update" + (f" ({label})" if label else ""))
    trajectory = getattr(trajectory, "bias_trajectory", trajectory)
    if not trajectory:
        raise ValueError("no bias trajectory to plot")
    arrays = {name: np.asarray(steps, np.float64).reshape(len(steps), -1) for name, steps in trajectory.items()}
    reference = arrays.get("reference")
    # NOTE: the steps are lr-sized (1e-3) against a bias that may spread far wider, so the colour is each
    # expert's change since its value after the first update: the updates stay visible.
    moved = {name: a - a[:1] for name, a in arrays.items()}
    vmax = max(float(np.abs(a).max(initial=0.0)) for a in moved.values()) or 1.0
    fig, axes = _figure(len(arrays), 3, panel=(4.0, 3.2))
    image = None
    for ax, (name, arr) in zip(axes, arrays.items(), strict=False):
        steps, experts = arr.shape
        image = ax.imshow(moved[name].T, aspect="auto", origin="lower", cmap="coolwarm", vmin=-vmax, vmax=vmax,
                          extent=(0.5, steps + 0.5, -0.5, experts - 0.5), interpolation="nearest")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("update step")
        ax.set_ylabel("expert")
        same = ""
        if reference is not None and name != "reference" and reference.shape == arr.shape:
            diff = float(np.abs(arr - reference).max(initial=0.0))
            same = "\n= reference, bit for bit" if diff == 0 else f"\nmax |diff| vs reference {diff:.2e}"
        ax.set_title(name + same, fontsize=9)
    fig.colorbar(image, ax=[ax for ax in axes if ax.get_visible()], label="expert_bias - its value after step 1",
                 shrink=0.9)
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------------
# plain-data plots (the teaching notebooks)
def _dense_weights(selected: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """Routing weights ``[N, k]`` at ``selected [N, k]`` scattered into a dense ``[N, E]`` matrix."""
    dense = np.zeros((selected.shape[0], num_experts))
    np.put_along_axis(dense, selected, weights, axis=-1)
    return dense


def plot_routing(panels: Mapping[str, Mapping], num_expert_groups: int | None = None,
                 title: str = "router scores and chosen experts", annotate: bool = True):
    """Heatmaps of one router decision per panel (tokens down, experts across), panels side by side.

    ``panels``: title -> a mapping with ``scores`` ``[N, E]`` (the router's scores, e.g. ``aux`` of
    ``moe(x, return_aux=True)`` in either backend, or ``parity.reference.route``), ``selected_experts``
    ``[N, k]`` (int) and optionally ``routing_weights`` ``[N, k]`` and ``mask`` ``[N, E]`` (bool, True =
    the expert was eligible; the others, e.g. experts of groups dropped by group-limited routing, are
    greyed out). Any array type NumPy can read (torch tensors on CPU, JAX arrays) works.

    Top row: the scores on a common colour scale, each chosen expert boxed in red and numbered by its
    slot (1 = highest selection score). Bottom row (when any panel has ``routing_weights``): the
    weights that multiply the experts, zero where an expert was not chosen, with the range of the
    per-token sums in the title (1 with ``route_norm``, ``route_scale`` with it and a scale).
    ``num_expert_groups``: draw the group boundaries. Raises ``ValueError`` for no panels or shapes
    that do not match.
    """
    from matplotlib.patches import Rectangle

    if not panels:
        raise ValueError("no routing panels to plot")
    data = {}
    for name, p in panels.items():
        scores = np.asarray(p["scores"], np.float64)
        sel = np.asarray(p["selected_experts"], np.int64)
        if scores.ndim != 2 or sel.ndim != 2 or sel.shape[0] != scores.shape[0]:
            raise ValueError(f"panel {name!r}: scores {scores.shape} and selected_experts {sel.shape} must be "
                             f"[N, E] and [N, k]")
        w = p.get("routing_weights")
        mask = p.get("mask")
        data[name] = (scores, sel, None if w is None else np.asarray(w, np.float64),
                      None if mask is None else np.asarray(mask, bool))
    with_weights = any(d[2] is not None for d in data.values())
    n_cols, n_rows = len(data), 2 if with_weights else 1
    n_tok, n_exp = next(iter(data.values()))[0].shape
    panel = (max(3.0, 0.42 * n_exp + 1.2), max(2.6, 0.3 * n_tok + 1.0))
    fig, axes = _figure(n_cols * n_rows, n_cols, panel=panel)
    axes = axes.reshape(n_rows, n_cols)
    smax = max(1.0, max(float(d[0].max()) for d in data.values()))
    wmax = max((float(np.max(d[2])) for d in data.values() if d[2] is not None), default=1.0) or 1.0

    def _frame(ax, e):
        ax.set_xticks(range(e))
        ax.set_xlabel("expert")
        ax.set_ylabel("token")
        if num_expert_groups:
            for b in range(e // num_expert_groups, e, e // num_expert_groups):
                ax.axvline(b - 0.5, color="white", linewidth=2.0)

    for col, (name, (scores, sel, w, mask)) in enumerate(data.items()):
        n, e = scores.shape
        ax = axes[0, col]
        im = ax.imshow(scores, cmap="viridis", vmin=0.0, vmax=smax, aspect="auto", interpolation="nearest")
        if mask is not None:
            ax.imshow(np.where(mask, np.nan, 1.0), cmap="Greys", vmin=0, vmax=1.4, alpha=0.85, aspect="auto",
                      interpolation="nearest")
        for t in range(n):
            for slot, ex in enumerate(sel[t]):
                ax.add_patch(Rectangle((ex - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6))
                if annotate:
                    ax.text(ex, t, str(slot + 1), ha="center", va="center", fontsize=7, color="white",
                            fontweight="bold")
        ax.set_title(f"{name}\nscores (boxes: chosen, k={sel.shape[1]})", fontsize=9)
        _frame(ax, e)
        fig.colorbar(im, ax=ax, shrink=0.8)
        if with_weights:
            ax = axes[1, col]
            if w is None:
                ax.set_visible(False)
                continue
            dense = _dense_weights(sel, w, e)
            im = ax.imshow(dense, cmap="magma", vmin=0.0, vmax=wmax, aspect="auto", interpolation="nearest")
            if annotate:
                for t in range(n):
                    for slot, ex in enumerate(sel[t]):
                        ax.text(ex, t, f"{w[t, slot]:.2f}", ha="center", va="center", fontsize=6,
                                color="black" if w[t, slot] > 0.6 * wmax else "white")
            sums = w.sum(-1)
            ax.set_title(f"routing weights (sum per token {sums.min():.2f}..{sums.max():.2f})", fontsize=9)
            _frame(ax, e)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return fig


def _nested_loads(loads) -> dict[str, dict[str, np.ndarray]]:
    """run -> {series -> [steps, E] float64}; a flat mapping run -> array gets one unnamed series."""
    if not loads:
        raise ValueError("no loads to plot")
    out = {}
    for run, v in loads.items():
        series = v if isinstance(v, Mapping) else {"": v}
        out[run] = {}
        for name, arr in series.items():
            arr = np.asarray(arr, np.float64)
            if arr.ndim != 2:
                raise ValueError(f"load of {run!r} {name!r} has shape {arr.shape}; expected [steps, num_experts]")
            out[run][name] = arr
    return out


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (shorter at the start), same length as ``y``."""
    if window <= 1:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0, axis=0), axis=0)
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo).reshape((-1,) + (1,) * (y.ndim - 1))


def load_imbalance(load) -> np.ndarray:
    """``max_i load_i / mean_i load`` per step: 1 = perfectly balanced, E = every token on one expert.

    ``load``: ``[steps, E]`` tokens per expert -> ``[steps]`` float64 (the "max violation" + 1 of
    Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").
    """
    load = np.asarray(load, np.float64)
    return load.max(-1) / np.maximum(load.mean(-1), np.finfo(np.float64).tiny)


def plot_load_over_steps(loads, smooth: int = 10, title: str = "share of tokens per expert while training"):
    """Stacked share of the routed tokens per expert over training steps, one panel per run.

    ``loads``: run -> ``[steps, E]`` tokens per expert at each step (e.g. ``aux["tokens_per_expert"]``),
    or run -> {series (e.g. framework) -> ``[steps, E]``}: then one row of panels per series.
    A collapsed router shows as one colour filling its panel; a balanced one as even stripes.
    ``smooth``: trailing moving-average window in steps (1 = raw).
    """
    nested = _nested_loads(loads)
    series = list(dict.fromkeys(s for v in nested.values() for s in v))
    fig, axes = _figure(len(series) * len(nested), len(nested), panel=(3.4, 2.6))
    axes = axes.reshape(len(series), len(nested))
    for col, (run, by_series) in enumerate(nested.items()):
        for row, name in enumerate(series):
            ax = axes[row, col]
            if name not in by_series:
                ax.set_visible(False)
                continue
            arr = by_series[name]
            share = _moving_average(arr / np.maximum(arr.sum(-1, keepdims=True), 1e-300), smooth)
            steps = np.arange(1, arr.shape[0] + 1)
            ax.stackplot(steps, share.T, colors=[_expert_colour(i, arr.shape[1]) for i in range(arr.shape[1])],
                         linewidth=0)
            ax.set_ylim(0, 1)
            ax.set_xlim(1, arr.shape[0])
            ax.set_title(f"{run}" + (f" ({name})" if name else ""), fontsize=9)
            ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel("share of tokens")
    from matplotlib.patches import Patch

    num_experts = max(a.shape[1] for v in nested.values() for a in v.values())
    fig.legend(handles=[Patch(color=_expert_colour(i, num_experts)) for i in range(num_experts)],
               labels=[str(i) for i in range(num_experts)], title="expert", loc="outside right center",
               fontsize=7, title_fontsize=8)
    fig.suptitle(title)
    return fig


def _expert_colour(i: int, n: int):
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"](i % (10 if n <= 10 else 20))


def plot_load_imbalance(loads, smooth: int = 10, title: str = "load imbalance: max / mean tokens per expert"):
    """``load_imbalance`` over training steps, one colour per run, one line style per series.

    ``loads`` as in ``plot_load_over_steps``. Dotted lines mark 1 (balanced) and E (collapsed onto one
    expert). ``smooth``: trailing moving-average window in steps.
    """
    from matplotlib import colormaps

    nested = _nested_loads(loads)
    series = list(dict.fromkeys(s for v in nested.values() for s in v))
    styles = ["-", "--", ":", "-."]
    fig, (ax,) = _figure(1, 1, panel=(7.0, 3.6))
    num_experts = 1
    for i, (run, by_series) in enumerate(nested.items()):
        colour = colormaps["tab10"](i % 10)
        for j, name in enumerate(series):
            if name not in by_series:
                continue
            arr = by_series[name]
            num_experts = max(num_experts, arr.shape[1])
            ax.plot(np.arange(1, arr.shape[0] + 1), _moving_average(load_imbalance(arr), smooth),
                    color=colour, linestyle=styles[j % len(styles)], linewidth=1.5,
                    label=run + (f" ({name})" if name else ""))
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.axhline(num_experts, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0.8, num_experts + 0.4)
    ax.set_xlabel("step")
    ax.set_ylabel("max load / mean load")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title + (f" (moving average over {smooth} steps)" if smooth > 1 else ""), fontsize=10)
    return fig


def ulp_buckets(ulps) -> tuple[np.ndarray, list[str]]:
    """Edges ``[0, 1, 2, 4, 8, ...]`` covering ``max(ulps)`` and their labels ``0, 1, 2-3, 4-7, ...``."""
    top = int(np.max(np.asarray(ulps, np.float64))) if np.size(ulps) else 0
    edges = [0, 1]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return np.array(edges, np.float64), labels


def plot_ulp_histograms(series: Mapping[str, object], title: str = "error in ULPs of the compared dtype",
                        log: bool = True):
    """Share of elements per ULP-distance bucket (0, 1, 2-3, 4-7, ...), grouped bars per series.

    ``series``: label -> elementwise ULP distances (``parity.metrics.ulp_distance(actual, expected,
    dtype)``: how many numbers of ``dtype`` lie between a result and the float64 answer rounded to
    ``dtype``). 0 = correctly rounded. The legend gives each series' median and max. ``log``: a
    logarithmic share axis, so that the few elements of the tail stay visible.
    """
    if not series:
        raise ValueError("no ULP distances to plot")
    data = {k: np.asarray(v, np.float64).ravel() for k, v in series.items()}
    edges, labels = ulp_buckets(np.concatenate(list(data.values())))
    fig, (ax,) = _figure(1, 1, panel=(min(12.0, max(6.0, 0.3 * len(labels) * len(data) ** 0.5)), 3.6))
    width = 0.8 / len(data)
    for i, (name, u) in enumerate(data.items()):
        counts, _ = np.histogram(u, bins=edges)
        share = counts / max(u.size, 1)
        ax.bar(np.arange(len(labels)) + (i - (len(data) - 1) / 2) * width, share, width,
               label=f"{name}: median {np.median(u):g}, max {u.max():g} ULP")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45 if len(labels) > 10 else 0, fontsize=7)
    ax.set_xlabel("ULP distance to the float64 answer")
    ax.set_ylabel("share of elements")
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
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
