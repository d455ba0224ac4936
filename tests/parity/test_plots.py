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
