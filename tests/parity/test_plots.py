"""parity.plots: public plot functions return matplotlib Figures from a report or plain data."""

import numpy as np
import pytest

from parity.backends.reference_backend import ReferenceRunner
from parity.config import MoEConfig
from parity.harness import Settings, run_parity
from parity.plots import plot_bias_trajectory, plot_error_histograms, plot_expert_load, save_plots
from parity.report import Report
from parity.weights import init_weights


def test_plots_from_report_and_plain_data(tmp_path):
    from matplotlib.figure import Figure

    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=2)
    report = run_parity(Settings(cfg=cfg, steps=2), init_weights(cfg, 0), [ReferenceRunner()])
    assert isinstance(plot_error_histograms(report), Figure)
    assert isinstance(plot_expert_load(report), Figure)
    assert isinstance(plot_expert_load({"a": np.arange(4), "b": np.ones(4)}), Figure)
    assert isinstance(plot_bias_trajectory(report), Figure)
    assert isinstance(plot_error_histograms({"out": {"x vs y": np.array([0.0, 1e-7, 1e-6])}}), Figure)
    paths = save_plots(report, tmp_path)
    assert {p.rsplit("/", 1)[-1] for p in paths} >= {"errors_forward.png", "expert_load.png", "expert_bias.png"}
    # a report read back from JSON keeps summaries only: histograms need the in-memory errors
    back = Report.from_dict(report.to_dict())
    assert [c.id for c in back.checks] == [c.id for c in report.checks]
    with pytest.raises(ValueError, match="no elementwise errors"):
        plot_error_histograms(back)


# ------------------------------------------------------------------------------------------------
# plain-data plots used by the teaching notebooks
def test_plot_routing_marks_the_chosen_experts():
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from parity.plots import plot_routing

    rng = np.random.default_rng(0)
    scores = rng.random((5, 8))
    sel = np.argsort(-scores, axis=-1)[:, :2]
    w = np.take_along_axis(scores, sel, -1)
    fig = plot_routing({"a": {"scores": scores, "selected_experts": sel, "routing_weights": w},
                        "b": {"scores": scores, "selected_experts": sel, "mask": scores > 0.2}},
                       num_expert_groups=4)
    assert isinstance(fig, Figure)
    score_axes = [ax for ax in fig.axes if ax.get_title().endswith("k=2)")]
    assert len(score_axes) == 2
    assert sum(isinstance(p, Rectangle) for p in score_axes[0].patches) == sel.size  # one box per choice
    weight_axes = [ax for ax in fig.axes if ax.get_title().startswith("routing weights") and ax.get_visible()]
    assert len(weight_axes) == 1  # panel "b" has no weights
    s = w.sum(-1)
    assert f"{s.min():.2f}..{s.max():.2f}" in weight_axes[0].get_title()
    # scores only: one row
    assert isinstance(plot_routing({"c": {"scores": scores, "selected_experts": sel}}), Figure)
    with pytest.raises(ValueError, match="no routing panels"):
        plot_routing({})
    with pytest.raises(ValueError, match="must be"):
        plot_routing({"bad": {"scores": scores, "selected_experts": sel[:3]}})


def test_load_imbalance_and_load_plots():
    from matplotlib.figure import Figure

    from parity.plots import load_imbalance, plot_load_imbalance, plot_load_over_steps

    collapsed = np.zeros((6, 4))
    collapsed[:, 2] = 10.0
    balanced = np.full((6, 4), 5.0)
    assert np.allclose(load_imbalance(collapsed), 4.0)  # every token on one of 4 experts
    assert np.allclose(load_imbalance(balanced), 1.0)
    nested = {"none": {"torch": collapsed, "jax": collapsed}, "bias": {"torch": balanced}}
    fig = plot_load_over_steps(nested, smooth=3)
    assert isinstance(fig, Figure)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert {ax.get_title() for ax in visible} == {"none (torch)", "none (jax)", "bias (torch)"}
    assert isinstance(plot_load_over_steps({"flat": balanced}, smooth=1), Figure)
    fig = plot_load_imbalance(nested, smooth=1)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"none (torch)", "none (jax)", "bias (torch)"}
    assert np.allclose(lines["none (jax)"].get_ydata(), 4.0)
    assert lines["none (torch)"].get_linestyle() != lines["none (jax)"].get_linestyle()
    with pytest.raises(ValueError, match=r"\[steps, num_experts\]"):
        plot_load_imbalance({"bad": np.ones(5)})
    with pytest.raises(ValueError, match="no loads"):
        plot_load_over_steps({})


def test_ulp_histograms_and_buckets():
    from matplotlib.figure import Figure

    from parity.metrics import ulp_distance
    from parity.plots import plot_ulp_histograms, ulp_buckets

    edges, labels = ulp_buckets([0, 1, 5])
    assert edges.tolist() == [0, 1, 2, 4, 8] and labels == ["0", "1", "2-3", "4-7"]
    assert ulp_buckets([0])[1] == ["0"]
    expected = np.linspace(1.0, 2.0, 50)
    u32 = ulp_distance(expected + 3 * np.spacing(np.float32(2.0)), expected, "float32")
    fig = plot_ulp_histograms({"float32": u32, "exact": np.zeros(50)})
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert len(ax.patches) == 2 * len(ulp_buckets(u32)[1])
    with pytest.raises(ValueError, match="no ULP"):
        plot_ulp_histograms({})


def test_error_histogram_leaves_out_nonfinite_errors():
    # an Inf or NaN error (a row that failed on non-finite values) used to break the bin edges
    fig = plot_error_histograms({"forward: out": {"a vs b": np.array([1e-7, np.inf, np.nan, 0.0]),
                                                  "c vs d": np.array([np.nan])}})
    assert fig.axes[0].get_title() == "forward: out"


# ------------------------------------------------------------------------------------------------
# issue 14: plots that read at a glance
def _small_report():
    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=2, load_balance_loss="switch")
    settings = Settings(cfg=cfg, steps=3, preset="my-preset", dtype="float32")
    return run_parity(settings, init_weights(cfg, 0), [ReferenceRunner("reference:cpu")])


def test_titles_name_preset_and_dtype():
    report = _small_report()
    for fig in (plot_error_histograms(report), plot_expert_load(report), plot_bias_trajectory(report)):
        assert "preset my-preset, float32" in fig.get_suptitle() + "".join(ax.get_title() for ax in fig.axes)


def test_error_histograms_mark_the_tolerance_and_keep_equal_curves_apart():
    report = _small_report()
    fig = plot_error_histograms(report, ("forward",))
    out = next(ax for ax in fig.axes if ax.get_title() == "forward: out")
    marks = [ln for ln in out.lines if ln.get_color() == "red" and ln.get_linestyle() == "--"]
    assert len(marks) == 1
    row = next(c for c in report.checks if c.id == "forward/out/reference:cpu~reference")
    assert marks[0].get_xdata()[0] == pytest.approx(np.log10(report.limits[row.id]))
    styles = {ln.get_linestyle() for ln in out.lines if ln.get_color() != "red" and ln.get_linestyle() != "None"}
    assert len(styles) == len([t for t in out.get_legend().get_texts()])  # one line style per curve


def test_scalar_errors_are_dots_not_one_element_histograms():
    fig = plot_error_histograms({"forward: load_balance_loss": {"a vs reference": np.array([1e-9]),
                                                               "b vs reference": np.array([2e-9])}})
    (ax,) = [ax for ax in fig.axes if ax.get_visible()]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a vs reference", "b vs reference"]
    assert all(ln.get_linestyle() == "None" for ln in ax.lines)  # markers only, no steps


def test_bias_trajectory_is_a_heatmap_with_a_colour_bar_and_labelled_axes():
    traj = {"reference": [[0.0, 1e-3, -1e-3], [1e-3, 2e-3, -2e-3]], "jax:cpu": [[0.0, 1e-3, -1e-3], [1e-3, 2e-3, 0.0]]}
    fig = plot_bias_trajectory(traj)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    assert all(ax.get_xlabel() == "update step" and ax.get_ylabel() == "expert" for ax in panels)
    assert panels[0].images[0].get_array().shape == (3, 2)  # experts x steps
    colourbars = [ax for ax in fig.axes if not ax.images and ax.get_visible() and "expert_bias" in ax.get_ylabel()]
    assert colourbars
    assert "2.00e-03" in panels[1].get_title()  # jax differs from the reference by 2e-3 at expert 2
