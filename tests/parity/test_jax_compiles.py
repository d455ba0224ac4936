"""The JAX column compiles each step once (issue 14): counted with jax.monitoring, never timed.

Op-by-op dispatch compiled every operation apart (261 XLA compilations for one default run); the
runner now jits the forward, the gradient and the bias step, so a run compiles a handful of programs
and a second run of the same config compiles none. Also: the persistent-cache directory rule.
"""

import numpy as np
import pytest

from parity.harness import Settings, run_parity
from parity.presets import get_preset
from parity.weights import init_weights

jax = pytest.importorskip("jax")
pytest.importorskip("moe_jax")

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles():
    """A list that gets one entry per XLA backend compilation while the test runs."""
    from jax import monitoring

    seen: list[float] = []
    active = [True]

    def listener(event, duration, **kwargs):
        if active[0] and event == COMPILE_EVENT:
            seen.append(duration)

    monitoring.register_event_duration_secs_listener(listener)
    yield seen
    active[0] = False  # jax has no public unregister; the listener goes quiet instead


def test_default_run_compiles_each_step_once(compiles):
    from parity.backends import make_runner

    cfg = get_preset("default").config
    # shapes of its own ([3, 5, dim]), so that no program compiled by another test is reused
    settings = Settings(cfg=cfg, batch=3, seq_len=5, steps=3, seed=7)
    weights = init_weights(cfg, 7)
    first = run_parity(settings, weights, [make_runner("jax:cpu")])
    assert first.passed
    n_first = len(compiles)
    # forward, gradient (float32 and float64), bias step and update: 5 programs, plus one tiny transfer
    # program per weight shape and dtype (moe_jax.load_state_dict); op by op this was 261
    assert 1 <= n_first <= 16, n_first
    second = run_parity(settings, init_weights(cfg, 8), [make_runner("jax:cpu")])
    assert second.passed
    assert len(compiles) == n_first, f"the second run compiled {len(compiles) - n_first} more program(s)"


def test_locked_routing_compiles_one_more_forward(compiles):
    from parity.backends import make_runner

    cfg = get_preset("default").config
    settings = Settings(cfg=cfg, batch=1, seq_len=7, steps=0, grads=False, seed=3)
    run_parity(settings, init_weights(cfg, 3), [make_runner("jax:cpu")])
    n_free = len(compiles)
    locked = Settings(cfg=cfg, batch=1, seq_len=7, steps=0, grads=False, seed=3, lock_routing=True)
    report = run_parity(locked, init_weights(cfg, 3), [make_runner("jax:cpu")])
    assert report.passed
    assert len(compiles) - n_free <= 1  # the locked forward is one program, the free one is reused


def test_jitted_runner_rejects_out_of_range_locked_experts():
    from parity.backends import make_runner

    cfg = get_preset("default").config
    runner = make_runner("jax:cpu")
    weights = {k: np.asarray(v, np.float64) for k, v in init_weights(cfg, 0).items()}
    weights.setdefault("expert_bias", np.zeros(cfg.num_experts))
    weights.setdefault("tokens_per_expert", np.zeros(cfg.num_experts))
    x = np.zeros((1, 2, cfg.dim))
    bad = np.full((2, cfg.top_k), cfg.num_experts)
    with pytest.raises(ValueError, match=r"selected_experts holds values in \[8, 8\]"):
        runner.forward(cfg, weights, x, "float32", selected_experts=bad)


def test_compile_cache_directory_rule(monkeypatch, tmp_path):
    from parity.backends.jax_backend import CACHE_ENV, default_cache_dir

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "moe-parity" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "moe-parity" / "jax")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")
    for off in ("0", "off", "OFF", "false", ""):
        monkeypatch.setenv(CACHE_ENV, off)
        assert default_cache_dir() is None
