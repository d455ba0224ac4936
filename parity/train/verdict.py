"""The drift band: torch and JAX may drift apart no faster than each drifts from its own truth run.

For each metric m of ``parity.train.metrics.METRICS`` and step t, with d(a, b) the distance of two
runs (``parity.train.metrics.distance``):

    pair(t) = d(torch, jax)                       (the two ports, in the compared dtype)
    own(t)  = max(d(torch, torch@truth), d(jax, jax@truth))
    in band:  pair(t) <= factor * own(t) + floor(t)

``truth`` is float64 (a bfloat16 run: float32). ``floor(t)`` is one unit in the last place of the
compared dtype at the truth run's magnitude (``parity.train.metrics.scale``; 0 for counts and
routing), so that two runs which both round exactly like their truth (own = 0) may still differ by
one rounding. A NaN or Inf anywhere is out of the band: the verdict never passes a non-finite value.

Why this is the right test: by the triangle inequality
``d(torch, jax) <= d(torch, torch@truth) + d(torch@truth, jax@truth) + d(jax@truth, jax)``, so two
correct ports (whose truth runs agree) stay within a factor 2 of their own drift however much the
rounding is amplified by the training (Adam's normalisation, a routing flip near a tie). A port whose
*maths* differs (a wrong epsilon, a flipped sign) moves its truth run too, and the pair leaves the
band at the first step where the difference exceeds the rounding. The default factor is 4
(``TrainSettings.factor``), 2 for the triangle and 2 for slack.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from parity.train.metrics import METRICS

EPS = {"float32": float(np.finfo(np.float32).eps), "bfloat16": 2.0 ** -7, "float64": float(np.finfo(np.float64).eps)}


@dataclass
class BandRow:
    """One metric's band over the steps: ``pair``, ``own``, ``limit`` (= factor * own + floor) per step;
    ``first_exit``: the first step (0-based) where pair > limit or a value is not finite, or None."""

    metric: str
    pair: list[float]
    own: list[float]
    limit: list[float]
    first_exit: int | None
    status: str
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verdict:
    """The band rows and which metric left the band first (ties: the order of ``METRICS``)."""

    factor: float
    rows: list[BandRow] = field(default_factory=list)

    @property
    def first(self) -> BandRow | None:
        out = [r for r in self.rows if r.first_exit is not None]
        return min(out, key=lambda r: (r.first_exit, METRICS.index(r.metric))) if out else None

    @property
    def passed(self) -> bool:
        return bool(self.rows) and self.first is None

    def summary(self) -> str:
        first = self.first
        if first is None:
            return f"every metric stayed in the band (factor {self.factor:g}) for all {len(self.rows[0].pair)} steps"
        return (f"{first.metric} left the band first, at step {first.first_exit} "
                f"(torch vs jax {first.pair[first.first_exit]:.3g} > limit {first.limit[first.first_exit]:.3g})")

    def to_dict(self) -> dict:
        first = self.first
        return {"factor": self.factor, "passed": self.passed, "summary": self.summary(),
                "first_metric": first.metric if first else None, "first_step": first.first_exit if first else None,
                "rows": [r.to_dict() for r in self.rows]}


def band_row(metric: str, pair, own_a, own_b, scale, factor: float, dtype: str) -> BandRow:
    """The band of one metric from its per-step series (lists or arrays of the same length)."""
    pair, own_a, own_b, scale = (np.asarray(v, np.float64) for v in (pair, own_a, own_b, scale))
    own = np.maximum(own_a, own_b)
    floor = EPS[dtype] * np.abs(scale)
    limit = factor * own + floor
    finite = np.isfinite(pair) & np.isfinite(own_a) & np.isfinite(own_b) & np.isfinite(limit)
    bad = np.nonzero(~finite | (pair > np.where(np.isfinite(limit), limit, -np.inf)))[0]
    first = int(bad[0]) if bad.size else None
    note = ""
    if first is not None and not finite[first]:
        note = f"non-finite value at step {first}"
    return BandRow(metric=metric, pair=pair.tolist(), own=own.tolist(), limit=limit.tolist(), first_exit=first,
                   status="FAIL" if first is not None else "PASS", note=note)


def verdict(series: dict[str, dict[str, list[float]]], factor: float, dtype: str) -> Verdict:
    """``series``: metric -> {"pair", "torch_own", "jax_own", "scale"} per-step lists -> ``Verdict``."""
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(f"factor={factor!r} must be a finite number >= 1")
    v = Verdict(factor=factor)
    for m in METRICS:
        if m in series:
            s = series[m]
            v.rows.append(band_row(m, s["pair"], s["torch_own"], s["jax_own"], s["scale"], factor, dtype))
    return v
