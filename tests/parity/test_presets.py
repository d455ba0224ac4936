"""Presets: the routing hyperparameters of the published configs, and each runs in the reference."""

import numpy as np
import pytest

from parity.config import MoEConfig, layer_config
from parity.presets import PRESETS, get_preset
from parity.reference import moe_forward
from parity.weights import init_weights


def test_default_is_the_original_module():
    """The "default" preset is what the original constructor builds (``parity.config.layer_config``)."""
    cfg = get_preset("default").config
    assert cfg == MoEConfig(use_expert_bias=True, route_order="scale_first")
    assert cfg == layer_config(dim=64, hidden_dim=128, num_experts=8)


def test_published_routing():
    m = get_preset("mixtral-8x7b").config
    assert (m.score_func, m.num_experts, m.top_k, m.route_norm) == ("softmax", 8, 2, True)
    d = get_preset("deepseek-v3").config
    assert (d.score_func, d.top_k, d.num_expert_groups, d.num_limited_groups, d.group_score) == \
        ("sigmoid", 8, 8, 4, "top2_sum")
    assert d.use_expert_bias and d.route_norm and d.route_scale == 2.5 and d.num_shared_experts == 1
    v2 = get_preset("deepseek-v2-lite").config
    assert (v2.score_func, v2.group_score, v2.top_k, v2.route_scale, v2.num_shared_experts) == \
        ("softmax", "max", 6, 1.0, 2)
    q = get_preset("qwen3-moe").config
    assert (q.score_func, q.num_experts, q.top_k, q.route_norm) == ("softmax", 128, 8, True)
    o = get_preset("olmoe").config
    assert (o.score_func, o.num_experts, o.top_k, o.route_norm) == ("softmax", 64, 8, False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_documented_and_runs(name):
    p = PRESETS[name]
    assert p.source and p.scaling
    if name not in ("default", "llama4-scout"):
        assert p.config.score_before_experts is False  # real models weight the expert outputs
    if name == "llama4-scout":  # Llama 4 multiplies the expert input by its score
        assert p.config.score_before_experts is True
    w = init_weights(p.config, 0)
    x = np.random.default_rng(0).standard_normal((1, 4, p.config.dim))
    out, aux = moe_forward(w, x, p.config)
    assert out.shape == x.shape and np.isfinite(out).all()


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="known presets: default"):
        get_preset("gpt-5")
