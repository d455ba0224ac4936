"""``run_training``: the four runs in lock step, the band, the invariance rows -> ``TrainReport``.

Runs: "torch" and "jax" in the compared dtype, "torch@float64" and "jax@float64" (their truth; for a
bfloat16 run "torch@float32" / "jax@float32"), all from the same initial canonical weights on the
same data stream (``parity.train.task``). After every step the parameters of the four are compared
(``parity.train.metrics``); nothing but the current weights is kept, so memory does not grow with
the number of steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from parity.report import environment
from parity.train import invariance
from parity.train.metrics import METRICS, distance, routing_agreement, scale, update_norms
from parity.train.report import TrainReport
from parity.train.task import Task, TrainSettings
from parity.train.verdict import verdict

PAIRS = (("torch", "jax"), ("torch", "torch@T"), ("jax", "jax@T"), ("torch@T", "jax@T"))


def _trainers(settings: TrainSettings, initial, *, torch_optimizer=None, jax_tx=None) -> dict:
    from parity.train.jax_loop import JaxTrainer
    from parity.train.torch_loop import TorchTrainer

    truth = settings.truth_dtype
    return {
        "torch": TorchTrainer(settings, initial, settings.dtype, settings.master_dtype, optimizer_hook=torch_optimizer),
        "jax": JaxTrainer(settings, initial, settings.dtype, settings.master_dtype, tx=jax_tx),
        f"torch@{truth}": TorchTrainer(settings, initial, truth, optimizer_hook=torch_optimizer),
        f"jax@{truth}": JaxTrainer(settings, initial, truth, tx=jax_tx),
    }


def _history() -> dict:
    return {"loss": [], "mse": [], "aux": {}, "grad_norm": [], "update_norm": {}, "tokens_per_expert": [],
            "expert_bias": [], "routing_agreement": [], "first_routing_divergence": None}


def train_runs(settings: TrainSettings, task: Task, *, torch_optimizer: Callable | None = None, jax_tx=None,
               progress: Callable[[int], None] | None = None) -> tuple[dict, dict, dict, dict]:
    """Train the four runs for ``settings.steps`` steps.

    Returns ``(history, drift, band_series, final)``: run -> per-step series (``TrainReport.history``);
    "a~b" -> per-step max abs parameter difference; metric -> {"pair", "torch_own", "jax_own",
    "scale"} (``parity.train.verdict.verdict``); run -> {"records", "params"} of the compared-dtype
    runs (for the determinism row).
    """
    truth = settings.truth_dtype
    runs = _trainers(settings, task.initial, torch_optimizer=torch_optimizer, jax_tx=jax_tx)
    names = list(runs)
    pairs = [(a.replace("T", truth), b.replace("T", truth)) for a, b in PAIRS]
    history = {n: _history() for n in names}
    drift = {f"{a}~{b}": [] for a, b in pairs}
    series = {m: {"pair": [], "torch_own": [], "jax_own": [], "scale": []} for m in METRICS}
    params = {n: r.params() for n, r in runs.items()}
    final = {"torch": {"records": []}, "jax": {"records": []}}
    for t in range(settings.steps):
        x, y = task.batch(t)
        recs, new = {}, {}
        for n, r in runs.items():
            recs[n] = r.step(x, y)
            new[n] = r.params()
            recs[n].update_norms = update_norms(params[n], new[n])
        params = new
        for n in names:
            h, rec = history[n], recs[n]
            h["loss"].append(rec.loss)
            h["mse"].append(rec.mse)
            for k, v in rec.aux.items():
                h["aux"].setdefault(k, []).append(v)
            h["grad_norm"].append(rec.grad_norm)
            for k, v in rec.update_norms.items():
                h["update_norm"].setdefault(k, []).append(v)
            h["tokens_per_expert"].append(rec.tokens_per_expert.tolist())
            h["expert_bias"].append(rec.expert_bias.tolist())
            own = recs[f"{n.split('@')[0]}@{truth}"]
            agree = routing_agreement(rec.selected, own.selected)
            h["routing_agreement"].append(agree)
            if agree < 1 and h["first_routing_divergence"] is None:
                h["first_routing_divergence"] = t
        for a, b in pairs:
            drift[f"{a}~{b}"].append(distance("params", recs[a], recs[b], params[a], params[b]))
        for m in METRICS:
            s = series[m]
            s["pair"].append(distance(m, recs["torch"], recs["jax"], params["torch"], params["jax"]))
            for side in ("torch", "jax"):
                s[f"{side}_own"].append(distance(m, recs[side], recs[f"{side}@{truth}"], params[side],
                                                 params[f"{side}@{truth}"]))
            s["scale"].append(scale(m, recs[f"torch@{truth}"], params[f"torch@{truth}"]))
        for side in ("torch", "jax"):
            final[side]["records"].append(recs[side])
        if progress is not None:
            progress(t)
    for side in ("torch", "jax"):
        final[side]["params"] = params[side]
    return history, drift, series, final


def _rerun(settings: TrainSettings, task: Task, backend: str, *, torch_optimizer=None, jax_tx=None) -> dict:
    from parity.train.jax_loop import JaxTrainer
    from parity.train.torch_loop import TorchTrainer

    if backend == "torch":
        r = TorchTrainer(settings, task.initial, settings.dtype, settings.master_dtype, optimizer_hook=torch_optimizer)
    else:
        r = JaxTrainer(settings, task.initial, settings.dtype, settings.master_dtype, tx=jax_tx)
    records = [r.step(*task.batch(t)) for t in range(settings.steps)]
    return {"records": records, "params": r.params()}


def invariance_rows(settings: TrainSettings, task: Task, final: Mapping | None = None, *,
                    torch_optimizer=None, jax_tx=None) -> list[invariance.InvarianceRow]:
    """The invariance rows (``parity.train.invariance``) of both backends, on the first batch from the
    initial weights; ``final``: the compared-dtype runs of ``train_runs`` (rerun for determinism)."""
    from parity.train.jax_loop import JaxTrainer
    from parity.train.torch_loop import TorchTrainer

    s, (x, y) = settings, task.batch(0)
    dt, mdt = s.dtype, s.master_dtype

    def torch_(ckpt=False):
        return lambda: TorchTrainer(s, task.initial, dt, mdt, checkpoint=ckpt)

    def jax_(remat=False):
        return lambda: JaxTrainer(s, task.initial, dt, mdt, remat=remat)

    rows = [invariance.grad_accumulation("torch", torch_(), x, y, s.micro_batches, dt, s.cfg),
            invariance.grad_accumulation("jax", jax_(), x, y, s.micro_batches, dt, s.cfg),
            invariance.checkpointing("torch", torch_(), torch_(True), x, y, dt, recomputed_counts=2),
            invariance.checkpointing("jax", jax_(), jax_(True), x, y, dt, recomputed_counts=1)]
    if final is not None:
        for side in ("torch", "jax"):
            again = _rerun(s, task, side, torch_optimizer=torch_optimizer, jax_tx=jax_tx)
            rows.append(invariance.determinism(final[side], again, side))
    return rows


def run_training(settings: TrainSettings, weights: Mapping[str, np.ndarray] | None = None, *,
                 torch_optimizer: Callable | None = None, jax_tx=None,
                 progress: Callable[[str], None] | None = None) -> TrainReport:
    """Train, compare, judge. ``weights``: canonical weights for ``settings.cfg`` (default
    ``init_weights(cfg, seed)``); ``torch_optimizer(spec, params)`` / ``jax_tx`` replace one side's
    optimizer (to plant a bug); ``progress(text)`` is told what runs.

    Raises ``parity.weights.WeightsError`` for weights that do not fit the config.
    """
    from parity.weights import check_finite, check_float_dtypes, check_weights

    if weights is not None:
        check_float_dtypes(weights)
        check_weights(weights, settings.cfg, optional=("expert_bias", "tokens_per_expert"))
        check_finite(weights)
    t0 = time.perf_counter()
    task = Task(settings, weights)
    say = progress or (lambda text: None)
    say(f"training {settings.steps} steps")
    history, drift, series, final = train_runs(
        settings, task, torch_optimizer=torch_optimizer, jax_tx=jax_tx,
        progress=lambda t: say(f"step {t + 1}/{settings.steps}"))
    train_s = time.perf_counter() - t0
    rows = []
    if settings.invariance:
        say("invariance checks")
        rows = invariance_rows(settings, task, final, torch_optimizer=torch_optimizer, jax_tx=jax_tx)
    v = verdict(series, settings.factor, settings.dtype)
    report = TrainReport(settings=settings.to_dict(), environment=environment(), history=history, drift=drift,
                         verdict=v, invariance=rows)
    report.timing = {"train_s": round(train_s, 3), "total_s": round(time.perf_counter() - t0, 3)}
    return report
