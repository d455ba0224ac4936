"""The harness catches planted bugs, reports near-tie routing divergence, and --lock-routing removes it.

Runs the real backends (torch:cpu, jax:cpu); each is skipped when its framework is not installed.
The harness logic alone is also checked against the float64 reference wrapped as a fake backend.
"""

import numpy as np
import pytest

from parity.backends import make_runner
from parity.backends.reference_backend import ReferenceRunner
from parity.config import MoEConfig
from parity.harness import Settings, make_input, run_parity
from parity.report import FAIL, PASS, WARN
from parity.weights import init_weights

CFG = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=2, score_func="softmax", route_norm=True,
                score_before_experts=False, num_shared_experts=1, load_balance_loss="switch")


def _frameworks():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytest.importorskip("moe_torch")
    pytest.importorskip("moe_jax")


def runners(torch_hooks=None, jax_hooks=None):
    _frameworks()
    return [make_runner("torch:cpu", **(torch_hooks or {})), make_runner("jax:cpu", **(jax_hooks or {}))]


def status(report, check_id):
    rows = [c for c in report.checks if c.id == check_id]
    assert rows, f"no row {check_id}; have {[c.id for c in report.checks]}"
    return rows[0].status


def failing_vs_reference(report, kind="forward"):
    return {c.backend for c in report.checks if c.kind == kind and c.against == "reference" and c.status == FAIL}


def fwd_settings(cfg=CFG, **kw):
    return Settings(cfg=cfg, batch=2, seq_len=8, steps=0, grads=False, **kw)


# ------------------------------------------------------------------------------------------------
def test_clean_run_passes_every_check():
    report = run_parity(Settings(cfg=CFG, batch=2, seq_len=8, steps=2), init_weights(CFG, 0), runners())
    failed = [(c.id, c.note) for c in report.checks if c.status == FAIL]
    assert not failed
    assert report.passed and report.exit_code == 0
    kinds = {c.kind for c in report.checks if c.status == PASS}
    assert {"forward", "grad", "bias", "routing"} <= kinds
    grads = {c.tensor for c in report.checks if c.kind == "grad"}
    assert {"x", "router.gate.weight", "experts.w1", "experts.w2", "experts.w3",
            "shared_expert.w1.weight"} <= grads
    assert {c.tensor for c in report.checks if c.kind == "forward"} >= {
        "out", "router_logits", "scores", "routing_weights", "tokens_per_expert", "load_balance_loss"}
    # the update rule is bit-exact
    for c in report.checks:
        if c.kind == "bias":
            assert c.max_abs == 0, c.id


def test_perturbed_expert_weight_in_torch_is_blamed_on_torch():
    def perturb(w):
        w["experts.w2"][3] *= 1.01
        return w

    report = run_parity(fwd_settings(), init_weights(CFG, 0), runners(torch_hooks={"weights_hook": perturb}))
    assert status(report, "forward/out/torch:cpu~reference") == FAIL
    assert status(report, "forward/out/jax:cpu~reference") == PASS
    assert status(report, "forward/out/torch:cpu~jax:cpu") == FAIL
    assert failing_vs_reference(report) == {"torch:cpu"}
    assert not report.passed and report.exit_code == 1


def test_swapped_w1_w3_in_jax_is_caught():
    def swap(w):
        w["experts.w1"], w["experts.w3"] = w["experts.w3"], w["experts.w1"]
        return w

    report = run_parity(fwd_settings(), init_weights(CFG, 0), runners(jax_hooks={"weights_hook": swap}))
    assert status(report, "forward/out/jax:cpu~reference") == FAIL
    assert failing_vs_reference(report) == {"jax:cpu"}


def test_softmax_sigmoid_mixup_is_caught_in_scores():
    report = run_parity(fwd_settings(), init_weights(CFG, 0),
                        runners(torch_hooks={"config_hook": lambda c: c.replace(score_func="sigmoid")}))
    assert status(report, "forward/scores/torch:cpu~reference") == FAIL
    assert "torch:cpu" in failing_vs_reference(report)
    assert "jax:cpu" not in failing_vs_reference(report)


# ------------------------------------------------------------------------------------------------
TIE_CFG = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=1)  # sigmoid top-1, the defaults
TIE_TOKEN = 5


def near_tie_case():
    """Experts 0 and 1 tie for token TIE_TOKEN in float32 but not in float64.

    Both gate rows point along the token (logit ~4, far above the others); they differ in one weight
    by one float32 ULP of 1e-6 (~1e-13), which float32 accumulation of a logit of ~4 cannot resolve:
    float32 sees a tie (-> lower index 0), the float64 reference sees expert 1 ahead by ~1e-13.
    """
    w = init_weights(TIE_CFG, 0)
    x = make_input(TIE_CFG, 2, 8, 0)
    tok = x.reshape(-1, TIE_CFG.dim)[TIE_TOKEN]
    j = int(np.argmax(tok))  # x_j > 0: bumping g1[j] up raises logit 1
    row = (4.0 * tok / (tok @ tok)).astype(np.float32)
    row[j] = np.float32(1e-6)
    w["router.gate.weight"][0] = row
    w["router.gate.weight"][1] = row
    w["router.gate.weight"][1, j] = np.nextafter(np.float32(1e-6), np.float32(1))
    return w, x


def test_near_tie_is_reported_as_routing_divergence_and_lock_routing_removes_it():
    w, x = near_tie_case()
    from parity.reference import moe_forward

    _, aux = moe_forward(w, x, TIE_CFG)
    assert aux["selected_experts"][TIE_TOKEN, 0] == 1  # float64 picks expert 1
    settings = Settings(cfg=TIE_CFG, batch=2, seq_len=8, steps=0, grads=True)
    report = run_parity(settings, w, runners(), x=x)
    findings = {(r.backend, r.against): r for r in report.routing}
    for backend in ("torch:cpu", "jax:cpu"):
        f = findings[(backend, "reference")]
        assert TIE_TOKEN in f.tokens and f.status == WARN
        assert max(f.margins) < 1e-10
        assert status(report, f"routing/selected_experts/{backend}~reference") == WARN
        out = next(c for c in report.checks if c.id == f"forward/out/{backend}~reference")
        assert out.status == PASS and out.masked_tokens == f.count  # diverged tokens masked, rest compared
    assert findings[("torch:cpu", "jax:cpu")].count == 0  # both float32 backends break the tie alike
    assert report.passed  # a near-tie is a finding (WARN), not a failure

    locked = run_parity(Settings(cfg=TIE_CFG, batch=2, seq_len=8, steps=0, grads=False, lock_routing=True),
                        w, runners(), x=x)
    assert all(r.count == 0 and r.status == PASS for r in locked.routing)
    out = next(c for c in locked.checks if c.id == "forward/out/jax:cpu~reference")
    assert out.status == PASS and out.masked_tokens == 0
    assert "locked to torch:cpu" in out.note and str(TIE_TOKEN) in out.note
    assert locked.passed


def test_clear_routing_difference_is_a_failure_not_a_tie():
    # a different gate in one backend moves tokens with large margins: FAIL, not WARN
    def other_gate(w):
        w["router.gate.weight"] = w["router.gate.weight"][::-1].copy()
        return w

    report = run_parity(fwd_settings(), init_weights(CFG, 0), [ReferenceRunner(), ReferenceRunner(
        "reference:fake", weights_hook=other_gate)])
    f = next(r for r in report.routing if r.backend == "reference:fake" and r.against == "reference")
    assert f.count > 0 and f.status == FAIL


def test_absent_backend_is_skipped_never_passed():
    report = run_parity(fwd_settings(), init_weights(CFG, 0), [ReferenceRunner(), make_runner("torch:cuda"),
                                                                 make_runner("jax:gpu"), make_runner("hf:cpu")])
    skipped = {b["name"]: b for b in report.backends if b["status"] == "skipped"}
    assert {"hf:cpu"} <= set(skipped)
    for name in skipped:
        assert status(report, f"backend/{name}") == "SKIP"
        assert not any(c.backend == name and c.status == PASS for c in report.checks)


def test_backend_exception_is_a_fail_row():
    class Broken(ReferenceRunner):
        def forward(self, *a, **k):
            raise RuntimeError("kaboom")

    report = run_parity(fwd_settings(), init_weights(CFG, 0), [Broken("broken:cpu")])
    row = next(c for c in report.checks if c.kind == "error")
    assert row.status == FAIL and "kaboom" in row.note
    assert not report.passed


# ---------------------------------------------------------------------- issue 12: no false PASS
@pytest.mark.parametrize("field, value", [
    ("tie_tol", -1.0), ("tie_tol", float("nan")), ("seed", -5), ("bias_lr", float("inf")),
    ("tolerances", {"*": {"rtol": -1.0}}), ("tolerances", {"float32": {"atol": float("inf")}}),
])
def test_settings_refuse_values_that_would_pass_everything(field, value):
    with pytest.raises(ValueError, match=field if field != "tolerances" else "tolerances"):
        Settings(cfg=CFG, **{field: value})


def _most_used_expert(w, cfg=CFG) -> int:
    """The expert most tokens of the default input choose (the reference's routing)."""
    from parity.backends.reference_backend import reference_forward

    _, aux = reference_forward(w, make_input(cfg, 2, 8, 0), cfg)
    return int(np.argmax(np.bincount(np.ravel(aux["selected_experts"]), minlength=cfg.num_experts)))


def test_nonfinite_weights_are_refused_naming_each_key_and_count():
    from parity.weights import WeightsError

    w = init_weights(CFG, 0)
    w["router.gate.weight"][:] = np.nan
    w["experts.w1"][0, 0, :3] = np.inf
    with pytest.raises(WeightsError, match=r"'router.gate.weight': 128 NaN; 'experts.w1': 3 \+Inf"):
        run_parity(fwd_settings(), w, [ReferenceRunner()])
    with pytest.raises(ValueError, match="x holds 1 NaN and 0 Inf"):
        x = make_input(CFG, 2, 8, 0)
        x[1, 2, 3] = np.nan
        run_parity(fwd_settings(), init_weights(CFG, 0), [ReferenceRunner()], x=x)


def test_integer_weights_are_refused_and_other_floats_converted_with_a_note():
    from parity.weights import WeightsError

    w = init_weights(CFG, 0)
    with pytest.raises(WeightsError, match="'experts.w2' is int32"):
        run_parity(fwd_settings(), {**w, "experts.w2": w["experts.w2"].astype(np.int32)}, [ReferenceRunner()])
    with pytest.raises(WeightsError, match="'expert_bias' is bool"):
        run_parity(fwd_settings(), {**w, "expert_bias": np.zeros(8, bool)}, [ReferenceRunner()])
    report = run_parity(fwd_settings(), {**w, "experts.w1": w["experts.w1"].astype(np.float64),
                                         "experts.w3": w["experts.w3"].astype(np.float16)}, [ReferenceRunner()])
    assert report.notes == ["weights converted to the run's dtype float32 (buffers to float32): "
                            "experts.w1 from float64; experts.w3 from float16"]
    assert report.to_dict()["notes"] == report.notes and "- note: weights converted" in report.to_markdown()
    assert run_parity(fwd_settings(), w, [ReferenceRunner()]).notes == []


def test_nan_in_one_backend_is_a_fail_of_its_own_never_a_warn():
    # one NaN in the backend's copy of a used expert: its tokens' outputs are NaN, the float64 answer is not
    w = init_weights(CFG, 0)
    used = _most_used_expert(w)

    def plant(ws):
        ws["experts.w1"][used, 0, 0] = np.nan
        return ws

    report = run_parity(fwd_settings(), w, [ReferenceRunner(weights_hook=plant)])
    row = next(c for c in report.checks if c.id == "forward/out/reference:cpu~reference")
    assert row.status == FAIL and row.nonfinite > 0
    assert row.note.startswith(f"{row.nonfinite} NaN/Inf element(s) where the float64 answer is finite")
    assert report.exit_code == 1
    assert report.to_dict()["checks"][0]["nonfinite"] > 0


def test_allow_nonfinite_compares_nan_masks():
    w = init_weights(CFG, 0)
    used = _most_used_expert(w)
    w["experts.w1"][used, 0, 0] = np.nan  # NaN in the reference too: the masks agree
    settings = fwd_settings(allow_nonfinite=True)
    report = run_parity(settings, w, [ReferenceRunner()])
    out = next(c for c in report.checks if c.id == "forward/out/reference:cpu~reference")
    assert out.status == PASS and out.nonfinite == 0, out
    assert "NaN/Inf element(s) at the same places in both (compared as masks" in out.note
    with pytest.raises(ValueError, match="non-finite"):
        run_parity(fwd_settings(), w, [ReferenceRunner()])

    def more_nan(ws):  # the backend spreads NaN to every expert: the masks differ
        ws["experts.w1"][:, 0, 0] = np.nan
        return ws

    report = run_parity(settings, w, [ReferenceRunner(weights_hook=more_nan)])
    out = next(c for c in report.checks if c.id == "forward/out/reference:cpu~reference")
    assert out.status == FAIL and out.nonfinite > 0
