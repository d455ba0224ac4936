"""What each training step records, and the per-step comparisons between runs.

A ``StepRecord`` is one optimizer step of one run (one backend in one dtype). ``step_metrics`` turns
the records and parameters of the runs of one step into the figures the report plots and the
verdict reads: max abs parameter difference of every pair, routing agreement with the truth run
(share of tokens whose *set* of experts equals the truth's), and the distance of each scalar or
vector series (loss, gradient norm, ``tokens_per_expert``, ``expert_bias``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepRecord:
    """One optimizer step of one run.

    ``loss``: the objective (MSE + enabled aux losses) of the step's forward, before the update;
    ``mse``; ``aux``: the aux losses by name; ``grad_norm``: global gradient norm before clipping
    (master dtype); ``selected``: ``[N, k]`` int64 experts of the forward; ``tokens_per_expert``:
    ``[E]`` counts of the forward; ``expert_bias``: ``[E]`` float32 after ``update_expert_bias``.
    """

    loss: float
    mse: float
    aux: dict[str, float]
    grad_norm: float
    selected: np.ndarray
    tokens_per_expert: np.ndarray
    expert_bias: np.ndarray
    update_norms: dict[str, float] = field(default_factory=dict)


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Largest ``|a - b|`` over every parameter both hold (NaN when any difference is NaN)."""
    worst = 0.0
    for name in a:
        if name in b:
            d = np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64))
            if d.size:
                m = float(np.max(d))
                if not np.isfinite(m):
                    return float("nan")
                worst = max(worst, m)
    return worst


def update_norms(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per parameter, the L2 norm of ``after - before`` (float64)."""
    # NOTE: a plain reduction, not np.linalg.norm: BLAS threads on a busy machine cost 100x more here
    out = {}
    for k in after:
        d = np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64)
        out[k] = float(np.sqrt(np.sum(d * d)))
    return out


def expert_sets_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N]`` bool: token n picked the same *set* of experts in ``a`` and ``b`` (``[N, k]`` ints)."""
    return (np.sort(np.asarray(a), -1) == np.sort(np.asarray(b), -1)).all(-1)


def routing_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of tokens (0..1) whose expert set is the same in ``a`` and ``b``."""
    same = expert_sets_equal(a, b)
    return float(same.mean()) if same.size else 1.0


def distance(metric: str, a: StepRecord, b: StepRecord, pa: Mapping | None = None, pb: Mapping | None = None) -> float:
    """The distance between two runs at one step in one metric of ``METRICS`` (NaN propagates)."""
    if metric == "params":
        return max_abs_diff(pa, pb)
    if metric == "loss":
        return abs(a.loss - b.loss)
    if metric == "grad_norm":
        return abs(a.grad_norm - b.grad_norm)
    if metric == "routing":
        return 1.0 - routing_agreement(a.selected, b.selected)
    if metric == "tokens_per_expert":
        return float(np.abs(np.asarray(a.tokens_per_expert) - np.asarray(b.tokens_per_expert)).sum())
    if metric == "expert_bias":
        return float(np.max(np.abs(np.asarray(a.expert_bias, np.float64) - np.asarray(b.expert_bias, np.float64)),
                            initial=0.0))
    raise ValueError(f"metric={metric!r} is not one of {METRICS}")


def scale(metric: str, rec: StepRecord, params: Mapping | None = None) -> float:
    """The magnitude a metric's rounding is measured against (for the band's floor): the largest
    |parameter|, |loss|, the gradient norm, |bias|; 0 for counts and routing (exact quantities)."""
    if metric == "params":
        return max(float(np.max(np.abs(v), initial=0.0)) for v in params.values())
    if metric == "loss":
        return abs(rec.loss)
    if metric == "grad_norm":
        return abs(rec.grad_norm)
    if metric == "expert_bias":
        return float(np.max(np.abs(rec.expert_bias), initial=0.0))
    return 0.0


#: the metrics the drift band is applied to, in the order the report lists them
METRICS = ("params", "loss", "grad_norm", "routing", "tokens_per_expert", "expert_bias")
