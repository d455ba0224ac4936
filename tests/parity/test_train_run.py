"""``parity.train``: the four runs, the drift band, a planted drift, the invariance rows, compile counts.

One tiny layer (dim 8, 4 experts, top-2, the expert bias on) for a few steps, so that every test
shares the same compiled programs.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("moe_jax")

from parity.config import MoEConfig  # noqa: E402
from parity.train import OptimizerSpec, TrainSettings, invariance  # noqa: E402
from parity.train.run import invariance_rows, run_training  # noqa: E402
from parity.train.task import Task  # noqa: E402

CFG = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, use_expert_bias=True, route_order="scale_first")
SETTINGS = TrainSettings(cfg=CFG, optimizer=OptimizerSpec(name="adamw", lr=1e-2, weight_decay=0.01, clip_norm=1.0),
                         steps=4, batch=2, seq_len=4, bias_lr=1e-2)


slow = pytest.mark.slow  # each compiles the JAX programs of a new configuration (seconds on a quiet 2-core machine)


@pytest.fixture(scope="module")
def report():
    return run_training(SETTINGS)


@slow
def test_clean_port_stays_in_the_band(report, tmp_path):
    assert report.passed, report.verdict.summary()
    assert report.exit_code == 0
    assert [r.metric for r in report.verdict.rows] == ["params", "loss", "grad_norm", "routing",
                                                       "tokens_per_expert", "expert_bias"]
    drift = report.final_drift()
    assert 0 < drift["torch~jax"] < 1e-4  # float32 rounding, not zero
    assert drift["torch@float64~jax@float64"] < 1e-12  # the two truths agree
    assert set(report.history) == {"torch", "jax", "torch@float64", "jax@float64"}
    h = report.history["torch"]
    assert len(h["loss"]) == 4 and len(h["tokens_per_expert"][0]) == 4
    assert set(h["update_norm"]) == {"router.gate.weight", "experts.w1", "experts.w2", "experts.w3"}
    assert all(v > 0 for v in h["update_norm"]["experts.w1"])
    # the bias moved by bias_lr per step (update_expert_bias after every step)
    b0, b1 = np.asarray(h["expert_bias"][0]), np.asarray(h["expert_bias"][1])
    assert np.allclose(np.abs(b1 - b0)[np.abs(b1 - b0) > 0], 1e-2)
    # outputs
    data = json.loads(report.to_json())
    assert data["schema"] == "moe-parity/train/1" and data["summary"]["status"] == "pass"
    assert data["summary"]["first_metric"] is None
    md = report.to_markdown()
    assert "# moe-parity train: PASS" in md and "band/params" in md
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(report.rich_table(width=80))
    assert max(len(line) for line in console.export_text().splitlines()) <= 80
    from parity.train.plots import save_plots

    names = sorted(p.rsplit("/", 1)[-1] for p in save_plots(report, tmp_path))
    assert names == ["drift.png", "expert_load.png", "loss.png", "routing.png"]


@slow
def test_every_invariance_row_passes(report):
    rows = {(r.check, r.backend): r for r in report.invariance}
    assert set(rows) == {(c, b) for c in ("grad_accumulation", "checkpointing", "determinism")
                         for b in ("torch", "jax")}
    assert all(r.status == "PASS" for r in rows.values()), [r.to_dict() for r in rows.values()]
    assert "2x" in rows["checkpointing", "torch"].note  # torch recomputes the forward's side effects
    assert "not doubled" in rows["checkpointing", "jax"].note


@slow
def test_planted_epsilon_bug_leaves_the_band_and_is_named():
    """The JAX side with AdamW's epsilon inside the square root: the loss curves look alike, but the
    weights drift apart far faster than either drifts from its own float64 run."""
    spec = SETTINGS.optimizer
    buggy = optax.chain(optax.clip_by_global_norm(spec.clip_norm),
                        optax.adamw(spec.lr, eps=0.0, eps_root=spec.eps, weight_decay=spec.weight_decay))
    settings = TrainSettings(**{**SETTINGS.__dict__, "invariance": False})
    from parity.train.jax_loop import TRACES

    before = dict(TRACES)
    rep = run_training(settings, jax_tx=buggy)
    # a new optimizer object: its step traced once per dtype for all 4 steps (a program of its own)
    for label in ("step[float32/float32, custom tx]", "step[float64/float64, custom tx]"):
        assert TRACES[label] - before.get(label, 0) == 1, label
    assert not rep.passed and rep.exit_code == 1
    first = rep.verdict.first
    assert first.metric == "params" and first.first_exit == 0, rep.verdict.summary()
    assert rep.summary()["first_metric"] == "params"
    # the float64 runs disagree too: the maths differs, not the rounding
    assert rep.final_drift()["torch@float64~jax@float64"] > 1e-6


@slow
def test_bfloat16_mode_trains_float32_masters_against_the_float32_runs():
    settings = TrainSettings(**{**SETTINGS.__dict__, "dtype": "bfloat16", "invariance": False, "steps": 3})
    rep = run_training(settings)
    assert set(rep.history) == {"torch", "jax", "torch@float32", "jax@float32"}
    assert rep.settings["master_dtype"] == "float32" and rep.settings["truth_dtype"] == "float32"
    assert rep.passed, rep.verdict.summary()
    drift = rep.final_drift()
    # bf16 compute drifts far more than float32 rounding, but the float32 truths agree closely
    assert drift["torch~torch@float32"] > 1e-5 and drift["torch@float32~jax@float32"] < 1e-5
    # the masters are float32: the weights moved by less than one bf16 ULP of 1 in some entries
    from parity.train.jax_loop import JaxTrainer

    task = Task(settings)
    trainer = JaxTrainer(settings, task.initial, "bfloat16", "float32")
    trainer.step(*task.batch(0))
    w = trainer.params()["experts.w1"]
    assert not np.array_equal(w, np.asarray(w, np.float32).astype(jax.numpy.bfloat16).astype(np.float64))


def test_band_never_passes_nan():
    from parity.train.verdict import band_row

    row = band_row("loss", [0.0, float("nan")], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], 4.0, "float32")
    assert row.status == "FAIL" and row.first_exit == 1 and "non-finite" in row.note
    ok = band_row("loss", [0.0, 3.9], [0.0, 1.0], [0.0, 0.5], [1.0, 1.0], 4.0, "float32")
    assert ok.status == "PASS"
    out = band_row("loss", [0.0, 4.1], [0.0, 1.0], [0.0, 0.5], [0.0, 0.0], 4.0, "float32")
    assert out.first_exit == 1


@slow
def test_switch_loss_is_not_invariant_to_micro_batches_and_says_so():
    cfg = CFG.replace(use_expert_bias=False, load_balance_loss="switch", load_balance_coeff=0.5)
    settings = TrainSettings(**{**SETTINGS.__dict__, "cfg": cfg})
    task = Task(settings)
    rows = {(r.check, r.backend): r for r in invariance_rows(settings, task)}
    for b in ("torch", "jax"):
        assert rows["grad_accumulation", b].status == "WARN", rows["grad_accumulation", b].note
        assert "switch loss" in rows["grad_accumulation", b].note
        assert rows["checkpointing", b].status == "PASS"


def test_determinism_row_catches_a_difference():
    from parity.train.metrics import StepRecord

    def rec(loss):
        return StepRecord(loss=loss, mse=loss, aux={}, grad_norm=1.0, selected=np.zeros((2, 1), np.int64),
                          tokens_per_expert=np.ones(2), expert_bias=np.zeros(2))

    a = {"records": [rec(1.0)], "params": {"w": np.ones(3)}}
    b = {"records": [rec(np.nextafter(1.0, 2.0))], "params": {"w": np.ones(3)}}
    assert invariance.determinism(a, a, "torch").status == "PASS"
    row = invariance.determinism(a, b, "torch")
    assert row.status == "FAIL" and "loss at step 0" in row.note


@slow
def test_jax_step_compiles_once(report):
    """After the fixture's runs, more steps of a fresh trainer compile nothing and trace nothing."""
    from jax import monitoring

    from parity.train.jax_loop import TRACES, JaxTrainer

    seen = []
    active = [True]
    monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: seen.append(event) if active[0] and event ==
        "/jax/core/compile/backend_compile_duration" else None)
    traces = dict(TRACES)
    task = Task(SETTINGS)
    trainer = JaxTrainer(SETTINGS, task.initial, "float32")
    for t in range(3):
        trainer.step(*task.batch(t))
    active[0] = False
    assert seen == [], f"{len(seen)} compilation(s) in steps that should reuse the programs"
    assert dict(TRACES) == traces
    assert traces["step[float32/float32]"] >= 1 and traces["step[float64/float64]"] >= 1
