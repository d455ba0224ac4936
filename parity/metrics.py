"""Comparison metrics, pure NumPy: absolute, relative, ULP and cosine errors, and per-dtype tolerances.

All functions take an ``actual`` and an ``expected`` array of the same shape (any float dtype; both
are compared in float64) and the name of the *compared dtype*, the dtype ``actual`` was computed in.
ULP distances count representable numbers of that dtype between the two values after rounding both
to it (round-to-nearest-even), so an error of 1 ULP in bfloat16 means "the neighbouring bfloat16".

Two ULP figures: ``max_ulp`` counts, per element, the representable values between actual and
expected (exact, but huge for elements near zero or of opposite signs); ``ulp_at_scale`` is
``max|a - e| / ulp(max|e|)``, the error in ULPs at the tensor's largest magnitude (1 ULP at scale
in bfloat16 = the rounding of the largest entry). ``max_rel`` = max ``|a - e| / max(|e|, atol)``.

Pass/fail follows ``numpy.allclose`` with a scale: an element passes when
``|a - e| <= atol * scale + rtol * |e|`` where ``scale = max(1, max|e|)`` (so a gradient whose entries
are of order 100 is not held to an absolute error meant for O(1) outputs). ``tol_ratio`` is the largest
``|a - e| / (atol * scale + rtol * |e|)``: below 1 passes, and it orders checks from worst to best.
Tolerances must be finite numbers >= 0 (``check_tolerance``): a negative one would pass everything.

Non-finite values (NaN, +Inf, -Inf) are never numbers to subtract: the errors above are measured on
the elements finite in both arrays, and the non-finite ones are counted apart (``Metrics.nonfinite``:
NaN/Inf in ``actual`` where ``expected`` is finite; ``Metrics.mask_mismatch``: ``expected`` NaN/Inf
where ``actual`` is not the same NaN/+Inf/-Inf). Either count fails a comparison. By default a NaN/Inf
in both at the same place fails too (``Metrics.nonfinite_matched``: NaN against NaN is no evidence of
agreement); with ``allow_nonfinite=True`` (for studying how NaN spreads) the NaN/Inf positions are
compared as masks and only a mismatch fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

DTYPES = ("float64", "float32", "bfloat16", "float16")

#: Default tolerances per compared dtype, for forward outputs and aux tensors ("forward") and for
#: gradients ("grad", which sum over tokens and pass through more rounding). Override per run.
DEFAULT_TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    "forward": {
        "float64": {"rtol": 1e-10, "atol": 1e-12},
        "float32": {"rtol": 1e-4, "atol": 1e-5},
        "bfloat16": {"rtol": 3e-2, "atol": 3e-2},
        "float16": {"rtol": 5e-3, "atol": 5e-3},
    },
    "grad": {
        "float64": {"rtol": 1e-9, "atol": 1e-11},
        "float32": {"rtol": 1e-4, "atol": 1e-5},
        "bfloat16": {"rtol": 5e-2, "atol": 5e-2},
        "float16": {"rtol": 1e-2, "atol": 1e-2},
    },
}

_BITS = {"float64": (np.uint64, 64), "float32": (np.uint32, 32), "float16": (np.uint16, 16),
         "bfloat16": (np.uint16, 16)}


def _check_dtype(dtype: str) -> None:
    if dtype not in _BITS:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")


def round_to(x, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (round-to-nearest-even) and returned as float64."""
    _check_dtype(dtype)
    x = np.asarray(x, dtype=np.float64)
    if dtype == "bfloat16":
        return _bf16_bits_to_f32(_f32_to_bf16_bits(x.astype(np.float32))).astype(np.float64)
    return x.astype(dtype).astype(np.float64)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of float32 values, round-to-nearest-even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isnan(x), 0x7FC0, rounded)
    return rounded.astype(np.uint16)


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def _bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """Raw bit patterns (unsigned) of ``x`` rounded to ``dtype``."""
    if dtype == "bfloat16":
        return _f32_to_bf16_bits(np.asarray(x, dtype=np.float64).astype(np.float32))
    return np.ascontiguousarray(np.asarray(x, dtype=np.float64).astype(dtype)).view(_BITS[dtype][0])


def _ordered(x: np.ndarray, dtype: str) -> np.ndarray:
    """Map floats to int64 so that consecutive representable values are consecutive integers.

    Sign-magnitude bits -> two's complement: +0 and -0 both map to 0.
    """
    utype, nbits = _BITS[dtype]
    bits = _bits(x, dtype)
    sign = (bits >> utype(nbits - 1)).astype(bool)
    mag = (bits & utype((1 << (nbits - 1)) - 1)).astype(np.int64)
    return np.where(sign, -mag, mag)


def ulp_distance(actual, expected, dtype: str) -> np.ndarray:
    """Elementwise number of ``dtype`` values between ``actual`` and ``expected`` (both rounded to it).

    Returns uint64 (float64 distances may exceed int64). NaN against anything is reported as the
    largest uint64; equal infinities are 0 apart.
    """
    _check_dtype(dtype)
    a = _ordered(actual, dtype)
    e = _ordered(expected, dtype)
    # int64 subtraction may wrap for float64; the true distance always fits in uint64.
    with np.errstate(over="ignore"):
        dist = np.where(a >= e, (a - e).view(np.uint64), (e - a).view(np.uint64))
    nan = np.isnan(np.asarray(actual, dtype=np.float64)) | np.isnan(np.asarray(expected, dtype=np.float64))
    return np.where(nan, np.iinfo(np.uint64).max, dist).astype(np.uint64)


_MANTISSA = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}
_MIN_EXP = {"float64": -1022, "float32": -126, "float16": -14, "bfloat16": -126}


def ulp_of(value: float, dtype: str) -> float:
    """The spacing of ``dtype`` numbers at ``|value|`` (the subnormal spacing below the normal range)."""
    _check_dtype(dtype)
    exp = max(math.frexp(abs(value))[1] - 1, _MIN_EXP[dtype]) if value else _MIN_EXP[dtype]
    return math.ldexp(1.0, exp - _MANTISSA[dtype])


def cosine_similarity(actual, expected) -> float:
    """Cosine of the angle between the two flattened arrays, in float64 (1.0 when both are zero)."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    na, ne = np.linalg.norm(a), np.linalg.norm(e)
    if na == 0 and ne == 0:
        return 1.0
    if na == 0 or ne == 0:
        return 0.0
    return float(np.dot(a, e) / (na * ne))


@dataclass
class Metrics:
    """Summary of one comparison. ``worst_index`` is the flat index of the largest ``tol_ratio``."""

    numel: int
    max_abs: float
    max_rel: float
    max_ulp: int
    mean_ulp: float
    ulp_at_scale: float
    cosine: float
    tol_ratio: float
    worst_index: int
    atol: float
    rtol: float
    passed: bool
    nonfinite: int = 0
    mask_mismatch: int = 0
    nonfinite_matched: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def nonfinite_reason(self, against: str = "the expected answer", allow_nonfinite: bool = False) -> str:
        """Why the non-finite counts fail this comparison, one clause each ("" when they do not)."""
        parts = []
        if self.nonfinite:
            parts.append(f"{self.nonfinite} NaN/Inf element(s) where {against} is finite")
        if self.mask_mismatch:
            parts.append(f"{self.mask_mismatch} element(s) where {against} is NaN/Inf and this is not the same")
        if self.nonfinite_matched and not allow_nonfinite:
            parts.append(f"{self.nonfinite_matched} NaN/Inf element(s) in both (non-finite values are "
                         f"compared only with allow_nonfinite / --allow-nonfinite)")
        return "; ".join(parts)


def check_tolerance(name: str, value) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite number >= 0.

    A negative or NaN tolerance would make every comparison pass (``err <= negative`` is never
    checked as intended; ``err / NaN`` compares false), so it is refused rather than clipped.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number >= 0") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return v


def check_overrides(overrides: dict | None) -> None:
    """``ValueError`` unless ``overrides`` maps "*" or a dtype of ``DTYPES`` to ``{"rtol"?, "atol"?}``
    holding finite numbers >= 0 (see ``tolerance``)."""
    if not overrides:
        return
    if not isinstance(overrides, dict):
        raise ValueError(f"tolerances={overrides!r} must be a dict {{'*' | dtype: {{'rtol': .., 'atol': ..}}}}")
    for key, tol in overrides.items():
        if key != "*" and key not in DTYPES:
            raise ValueError(f"tolerances key {key!r} is not '*' or one of {DTYPES}")
        if not isinstance(tol, dict) or not set(tol) <= {"rtol", "atol"}:
            raise ValueError(f"tolerances[{key!r}]={tol!r} must be a dict with keys 'rtol' and/or 'atol'")
        for name, value in tol.items():
            check_tolerance(f"tolerances[{key!r}][{name!r}]", value)


def tolerance(dtype: str, kind: str = "forward", overrides: dict | None = None) -> dict[str, float]:
    """``{"rtol", "atol"}`` for a compared dtype and kind ("forward" | "grad" | "exact").

    ``overrides`` maps a dtype (or "*" for every dtype) to ``{"rtol": ..., "atol": ...}`` (either key).
    Raises ``ValueError`` for an unknown dtype or kind, or an override that is not a finite number >= 0.
    """
    _check_dtype(dtype)
    check_overrides(overrides)
    if kind == "exact":
        return {"rtol": 0.0, "atol": 0.0}
    if kind not in DEFAULT_TOLERANCES:
        raise ValueError(f"kind={kind!r} is not one of {tuple(DEFAULT_TOLERANCES) + ('exact',)}")
    tol = dict(DEFAULT_TOLERANCES[kind][dtype])
    for key in ("*", dtype):
        if overrides and key in overrides:
            tol.update(overrides[key])
    return tol


def errors(actual, expected) -> np.ndarray:
    """Elementwise ``|actual - expected|`` in float64 (shape of the inputs)."""
    return np.abs(np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64))


def _nonfinite_class(x: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf (elementwise, int8)."""
    return np.select([np.isnan(x), np.isposinf(x), np.isneginf(x)], [1, 2, 3], 0).astype(np.int8)


def compare(actual, expected, dtype: str, *, rtol: float, atol: float, allow_nonfinite: bool = False) -> Metrics:
    """Compare two arrays of equal shape; see the module docstring for the pass rule.

    The error figures are measured on the elements finite in both; NaN/Inf elements are counted in
    ``nonfinite`` / ``mask_mismatch`` / ``nonfinite_matched`` (module docstring) and, when any fails
    the comparison, ``tol_ratio`` is inf and ``worst_index`` the first such element. Raises
    ``ValueError`` when the shapes differ or ``rtol`` / ``atol`` is not a finite number >= 0.
    Empty arrays pass with zero errors.
    """
    rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {e.shape}")
    if a.size == 0:
        return Metrics(0, 0.0, 0.0, 0, 0.0, 0.0, 1.0, 0.0, 0, atol, rtol, True)
    ca, ce = _nonfinite_class(a).ravel(), _nonfinite_class(e).ravel()
    bad_actual = (ca != 0) & (ce == 0)
    mismatch = (ce != 0) & (ca != ce)
    matched = (ce != 0) & (ca == ce)
    nonfinite_fail = bool(bad_actual.any() or mismatch.any() or (matched.any() and not allow_nonfinite))
    finite = (ca == 0) & (ce == 0)
    af, ef = a.ravel()[finite], e.ravel()[finite]
    if af.size:
        err = np.abs(af - ef)
        emax = float(np.abs(ef).max())
        scale = max(1.0, emax)
        allowed = atol * scale + rtol * np.abs(ef)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(err == 0, 0.0, err / allowed)
            rel = err / np.maximum(np.abs(ef), max(atol, np.finfo(np.float64).tiny))
        ulp = ulp_distance(af, ef, dtype)
        max_abs, max_rel, max_ulp, mean_ulp = float(err.max()), float(rel.max()), int(ulp.max()), float(
            ulp.astype(np.float64).mean())
        ulp_at_scale, cosine, tol_ratio = float(err.max() / ulp_of(emax, dtype)), cosine_similarity(af, ef), float(
            ratio.max())
        worst = int(np.flatnonzero(finite)[int(np.argmax(ratio))])
    else:  # nothing finite to measure: the figures are undefined, not zero
        max_abs = max_rel = ulp_at_scale = cosine = tol_ratio = math.nan
        max_ulp, mean_ulp, worst = 0, math.nan, 0
    if nonfinite_fail:
        tol_ratio = math.inf
        worst = int(np.flatnonzero(bad_actual | mismatch | matched)[0])
    return Metrics(
        numel=int(a.size),
        max_abs=max_abs,
        max_rel=max_rel,
        max_ulp=max_ulp,
        mean_ulp=mean_ulp,
        ulp_at_scale=ulp_at_scale,
        cosine=cosine,
        tol_ratio=tol_ratio,
        worst_index=worst,
        atol=float(atol),
        rtol=float(rtol),
        passed=not nonfinite_fail and not tol_ratio > 1.0,
        nonfinite=int(bad_actual.sum()),
        mask_mismatch=int(mismatch.sum()),
        nonfinite_matched=int(matched.sum()),
    )
