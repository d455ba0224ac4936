"""The parity harness: one config, one set of canonical weights, one input, every backend.

``run_parity(settings, weights, runners)`` returns a ``parity.report.Report``. What it checks
(issue 4; DESIGN.md "Parity harness"):

1. **Forward**: ``out`` and every aux tensor/loss of each backend against the float64 NumPy reference
   (fed the *same* dtype-rounded weights and input, so only the maths differs), and pairwise.
2. **Routing** (its own finding): tokens whose selected-expert *sets* differ, with the reference's
   selection margin for each (gap between the k-th and (k+1)-th selection score, or between the last
   kept and first dropped group). All margins <= ``tie_tol``: a near-tie, status WARN; a larger margin:
   FAIL (the backend picked an expert the maths does not support). Diverged tokens are masked out of
   the token-indexed comparisons (``out``, ``routing_weights``); the routing-dependent reductions
   (``tokens_per_expert``, ``load_balance_loss``) are compared with the reference recomputed on the
   backend's own choice. ``lock_routing`` instead feeds every backend and the reference the first
   backend's ``selected_experts``, so the expert maths is compared alone.
3. **Gradients** of ``sum(out * cotangent) + enabled aux losses`` w.r.t. ``x`` and every parameter:
   each backend against its own float64 run (same inputs; torch: ``.double()`` + loop kernel; JAX:
   scoped x64), the float64 runs pairwise, and the runs in the compared dtype pairwise. When a
   backend's routing diverged from the reference, its gradient runs use the reference's
   ``selected_experts`` (a gradient sums over tokens, so it cannot be masked), which the note says.
4. **Bias**: ``steps`` training-mode forwards, each followed by ``update_expert_bias``:
   ``tokens_per_expert`` per step against the reference's counts, ``expert_bias`` against the
   reference trajectory (``parity.reference.update_expert_bias`` on the reference's counts;
   bit-identical expected while the counts agree), the update rule alone (the backend's new bias
   against the reference rule applied to the backend's own counts and previous bias; always exact),
   and the trajectories pairwise.

A backend that is absent is SKIPPED with its reason; an exception inside a backend is a FAIL row
(kind "error") and the run goes on.

Inputs are checked before anything runs: weights of an integer or bool dtype, or holding NaN/Inf, and
an input ``x`` holding NaN/Inf are errors (``WeightsError`` / ``ValueError`` naming each tensor and
count) unless ``Settings.allow_nonfinite``; weights of another float dtype than the run's (buffers:
float32) are rounded to it, which ``Report.notes`` says in one line. Every row fails on a NaN/Inf
that its expected answer does not hold (``parity.metrics.compare``), whatever its tolerance.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from parity import drops
from parity import reference as ref
from parity.backends.base import GRAD_INPUT, Runner, Tensors, objective_cotangent
from parity.backends.reference_backend import reference_forward, selection_margins
from parity.config import MoEConfig
from parity.metrics import DTYPES, check_overrides, check_tolerance, compare, round_to, tolerance
from parity.report import FAIL, PASS, SKIP, WARN, Check, Report, RoutingFinding, environment
from parity.weights import check_finite, check_float_dtypes, check_weights, dtype_name

BUFFERS = ("expert_bias", "tokens_per_expert")
FORWARD_KEYS = ("out", "router_logits", "scores", "selected_experts", "routing_weights",
                "tokens_per_expert", "load_balance_loss", "router_z_loss")
REFERENCE = "reference"


@dataclass
class Settings:
    """Everything a run depends on besides the weights and the runners.

    ``tolerances``: overrides, ``{"*" | dtype: {"rtol": .., "atol": ..}}`` (see
    ``parity.metrics.tolerance``; finite numbers >= 0). ``tie_tol``: largest reference selection
    margin a routing divergence may have and still count as a near-tie (WARN rather than FAIL; a
    finite number >= 0). ``allow_nonfinite``: accept weights / input holding NaN/Inf and compare
    NaN/Inf positions as masks (a mismatch fails); off, they are refused. Raises ``ValueError``
    naming the field for any invalid value.
    """

    cfg: MoEConfig
    dtype: str = "float32"
    batch: int = 2
    seq_len: int = 8
    seed: int = 0
    steps: int = 3
    bias_lr: float = 1e-3
    lock_routing: bool = False
    tolerances: dict = field(default_factory=dict)
    tie_tol: float = 1e-4
    preset: str | None = None
    weights_source: str = "parity.weights.init_weights(seed=0)"
    grads: bool = True
    allow_nonfinite: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        for name in ("batch", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        check_tolerance("tie_tol", self.tie_tol)
        if isinstance(self.bias_lr, bool) or not isinstance(self.bias_lr, (int, float, np.integer, np.floating)) \
                or not np.isfinite(self.bias_lr):
            raise ValueError(f"bias_lr={self.bias_lr!r} must be a finite number")
        check_overrides(self.tolerances)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "config": self.cfg.to_dict(), "dtype": self.dtype,
                "batch": self.batch, "seq_len": self.seq_len, "seed": self.seed, "steps": self.steps,
                "bias_lr": self.bias_lr, "lock_routing": self.lock_routing, "tie_tol": self.tie_tol,
                "tolerances": {kind: {dt: tolerance(dt, kind, self.tolerances) for dt in DTYPES}
                               for kind in ("forward", "grad")},
                "weights": self.weights_source, "grads": self.grads, "allow_nonfinite": self.allow_nonfinite}


class NullProgress:
    """What ``run_parity`` reports progress to: ``start(total)`` once, then ``advance(text)`` per unit."""

    def start(self, total: int) -> None:
        pass

    def advance(self, description: str) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# inputs
def make_input(cfg: MoEConfig, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """The run's input ``x [batch, seq_len, dim]`` float32 (same recipe as ``tests.cases.make_case``)."""
    return np.random.default_rng(seed + 1000).standard_normal((batch, seq_len, cfg.dim)).astype(np.float32)


def step_inputs(cfg: MoEConfig, batch: int, seq_len: int, seed: int, steps: int) -> list[np.ndarray]:
    """One input per bias-update step, float32."""
    rng = np.random.default_rng(seed + 2000)
    return [rng.standard_normal((batch, seq_len, cfg.dim)).astype(np.float32) for _ in range(steps)]


def cast_weights(weights: Mapping[str, np.ndarray], cfg: MoEConfig, dtype: str) -> dict[str, np.ndarray]:
    """Canonical weights rounded to ``dtype`` (buffers to float32), as float64; missing buffers = 0."""
    out = {}
    for name, value in weights.items():
        out[name] = round_to(np.asarray(value, np.float64), "float32" if name in BUFFERS else dtype)
    for name in BUFFERS:
        out.setdefault(name, np.zeros(cfg.num_experts))
    return out


def conversion_note(weights: Mapping[str, np.ndarray], dtype: str) -> str:
    """One line naming the weights stored in another float dtype than the run's ``dtype`` (buffers:
    float32), which ``cast_weights`` rounds; "" when every tensor already is in its dtype."""
    by_source: dict[str, list[str]] = {}
    for name, value in weights.items():
        got = dtype_name(value)
        if got != ("float32" if name in BUFFERS else dtype):
            by_source.setdefault(got, []).append(name)
    if not by_source:
        return ""
    parts = "; ".join(f"{', '.join(names)} from {src}" for src, names in by_source.items())
    return f"weights converted to the run's dtype {dtype} (buffers to float32): {parts}"


def check_input(x, cfg: MoEConfig, allow_nonfinite: bool = False) -> None:
    """``ValueError`` for an ``x`` that is not a float ``[batch, seq_len, dim]`` array or (unless
    ``allow_nonfinite``) holds NaN/Inf (the count named)."""
    if np.ndim(x) != 3 or np.shape(x)[-1] != cfg.dim:
        raise ValueError(f"x has shape {np.shape(x)}; expected [batch, seq_len, dim={cfg.dim}]")
    if dtype_name(x) not in ("float64", "float32", "bfloat16", "float16"):
        raise ValueError(f"x has dtype {dtype_name(x)}; expected a floating-point array")
    if not allow_nonfinite:
        a = np.asarray(x).astype(np.float64)
        n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if n_nan or n_inf:
            raise ValueError(f"x holds {n_nan} NaN and {n_inf} Inf value(s) of {a.size}; pass "
                             f"allow_nonfinite=True to compare NaN/Inf positions as masks")


# --------------------------------------------------------------------------------------------------
def expected_dtype(key: str, run_dtype: str) -> str:
    """The dtype a tensor is compared in: ``out`` and gradients in the run's dtype; the router and its
    aux outputs in float32 (float64 in a float64 run); ``tokens_per_expert`` in float32 (contract)."""
    if key == "tokens_per_expert":
        return "float32"
    if key in ("router_logits", "scores", "routing_weights", "load_balance_loss", "router_z_loss"):
        return "float64" if run_dtype == "float64" else "float32"
    return run_dtype


def _sorted_rows(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of each row's k slots by expert index, and the sorted indices."""
    order = np.argsort(idx, axis=-1, kind="stable")
    return order, np.take_along_axis(idx, order, axis=-1)


def divergence(idx_a: np.ndarray, idx_b: np.ndarray) -> tuple[np.ndarray, int]:
    """Tokens whose selected-expert sets differ, and how many tokens differ only in slot order."""
    sa, sb = _sorted_rows(idx_a)[1], _sorted_rows(idx_b)[1]
    diverged = np.nonzero((sa != sb).any(-1))[0]
    order_only = int(((idx_a != idx_b).any(-1) & (sa == sb).all(-1)).sum())
    return diverged, order_only


class _Run:
    """The state of one harness run (kept in one object so that the stages read top to bottom)."""

    def __init__(self, settings: Settings, weights, runners: Sequence[Runner], x, progress):
        self.s = settings
        self.cfg = settings.cfg
        check_float_dtypes(weights)
        check_weights(weights, self.cfg, optional=BUFFERS)
        if not settings.allow_nonfinite:
            check_finite(weights)
        note = conversion_note(weights, settings.dtype)
        self.w = cast_weights(weights, self.cfg, settings.dtype)
        x = make_input(self.cfg, settings.batch, settings.seq_len, settings.seed) if x is None else x
        check_input(x, self.cfg, settings.allow_nonfinite)
        self.x = round_to(x, settings.dtype)
        self.progress = progress or NullProgress()
        self.report = Report(settings=settings.to_dict(), environment=environment(), notes=[note] if note else [])
        self.active: list[Runner] = []
        for r in runners:
            reason = r.unavailable() or (r.unsupported(self.cfg) if callable(getattr(r, "unsupported", None))
                                         else None)
            self.report.backends.append({"name": r.name, "status": "skipped" if reason else "ran",
                                         "reason": reason or ""})
            if reason:
                self.report.add(Check(id=f"backend/{r.name}", kind="backend", tensor="-", backend=r.name,
                                      against="-", dtype=settings.dtype, status=SKIP, note=reason))
            else:
                self.active.append(r)
                self._skip_capabilities(r)

    # ---- helpers ---------------------------------------------------------------------------------
    def _skip_capabilities(self, r: Runner) -> None:
        """A SKIP row for each capability the run asks for that ``r`` lacks and gives a reason for
        (``Runner.skip_reasons``; docs/columns.md): a missing check shows, it never passes."""
        asked = {"aux": True, "grad": self.s.grads, "bias": self.s.steps > 0, "lock": self.s.lock_routing}
        for cap, reason in getattr(r, "skip_reasons", {}).items():
            if asked.get(cap) and cap not in r.capabilities:
                self.report.add(Check(id=f"capability/{cap}/{r.name}", kind="capability", tensor=cap,
                                      backend=r.name, against="-", dtype=self.s.dtype, status=SKIP, note=reason))

    def _units(self) -> int:
        n = 1 + len(self.active) * (2 if self.s.lock_routing else 1)
        for r in self.active:
            if self.s.grads and "grad" in r.capabilities:
                n += 1 if self.s.dtype == "float64" else 2
            if self.s.steps and "bias" in r.capabilities:
                n += 1
        return n

    def _call(self, runner: Runner, stage: str, fn, *args, **kwargs):
        """Run one backend call; an exception becomes a FAIL row and ``None``."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            tb = traceback.format_exc(limit=-3)
            self.report.add(Check(id=f"error/{stage}/{runner.name}", kind="error", tensor=stage,
                                  backend=runner.name, against="-", dtype=self.s.dtype, status=FAIL,
                                  note=f"{type(exc).__name__}: {exc}".splitlines()[0], traceback=tb))
            return None
        finally:
            self.progress.advance(f"{runner.name}: {stage}")

    def _check(self, kind, tensor, backend, against, actual, expected, dtype, tol_kind,
               note="", masked=0, soften=False):
        """Compare and record one row. ``soften``: a failure is expected (routing diverged) -> WARN."""
        tol = tolerance(dtype, tol_kind, self.s.tolerances) if dtype in DTYPES else tolerance("float64", "exact")
        metric_dtype = dtype if dtype in DTYPES else "float64"
        a = np.asarray(actual, np.float64)
        e = np.asarray(expected, np.float64)
        cid = f"{kind}/{tensor}/{backend}~{against}"
        if a.shape != e.shape:
            self.report.add(Check(id=cid, kind=kind, tensor=tensor, backend=backend, against=against,
                                  dtype=dtype, status=FAIL,
                                  note=f"shape {list(a.shape)} != expected {list(e.shape)}"))
            return None
        allow = self.s.allow_nonfinite
        m = compare(a, e, metric_dtype, rtol=tol["rtol"], atol=tol["atol"], allow_nonfinite=allow)
        reason = m.nonfinite_reason("the float64 answer" if against == REFERENCE or "@float64" in against
                                    else against, allow)
        masks = (f"{m.nonfinite_matched} NaN/Inf element(s) at the same places in both (compared as masks, "
                 f"allow_nonfinite)") if allow and m.nonfinite_matched else ""
        # a NaN/Inf the expected answer does not hold is a FAIL of its own, never softened to WARN
        status = PASS if m.passed else (FAIL if reason else WARN if soften else FAIL)
        fields = {k: v for k, v in m.to_dict().items()
                  if k not in ("passed", "nonfinite", "mask_mismatch", "nonfinite_matched")}
        bad = m.nonfinite + m.mask_mismatch + (0 if allow else m.nonfinite_matched)
        check = Check(id=cid, kind=kind, tensor=tensor, backend=backend, against=against, dtype=dtype,
                      status=status, note="; ".join(filter(None, [reason, masks, note])), masked_tokens=masked,
                      nonfinite=bad, **fields)
        self.report.add(check)
        finite = np.isfinite(a) & np.isfinite(e)  # the histograms show the measured errors only
        self.report.errors[cid] = np.abs(a[finite] - e[finite]).ravel()
        emax = float(np.abs(e[finite]).max(initial=0.0))
        self.report.limits[cid] = tol["atol"] * max(1.0, emax) + tol["rtol"] * emax  # see parity.metrics.compare
        return check

    # ---- stages ----------------------------------------------------------------------------------
    def run(self) -> Report:
        self.progress.start(self._units())
        cfg = self.cfg
        self.ref_out, self.ref_aux = reference_forward(self.w, self.x, cfg)
        self.progress.advance("float64 reference")
        self.margins = selection_margins(cfg, self.ref_aux["scores"], self.w["expert_bias"])
        self.drop_margins = drops.reference_edge_margins(cfg, self.w, self.x)  # (6a) None: dropless
        s = self.s
        self.cot = round_to(objective_cotangent(self.x.shape, s.seed), s.dtype)
        self.xs = [round_to(x, s.dtype) for x in step_inputs(cfg, s.batch, s.seq_len, s.seed, s.steps)]
        if s.grads and not s.lock_routing:  # locked runs use a choice only known after the forwards
            for r in self.active:
                try:  # a failure shows again, as a FAIL row, in the call that needs the result
                    r.plan(cfg, self.w, self.x, s.dtype, self.cot, np.asarray(self.ref_aux["selected_experts"]),
                           self.xs if "bias" in r.capabilities else [], s.bias_lr)
                except Exception:
                    pass
        self.forward_stage()
        if self.s.grads:
            self.grad_stage()
        if self.s.steps:
            self.bias_stage()
        self.report.expert_load["reference"] = self.ref_aux["tokens_per_expert"].tolist()
        for name, t in self.fwd.items():
            if "tokens_per_expert" in t:
                self.report.expert_load[name] = np.asarray(t["tokens_per_expert"]).tolist()
            elif "selected_experts" in t:
                self.report.expert_load[name] = np.bincount(
                    t["selected_experts"].ravel(), minlength=cfg.num_experts).astype(float).tolist()
        self.report.finish()
        return self.report

    def forward_stage(self) -> None:
        cfg, dtype = self.cfg, self.s.dtype
        self.fwd: dict[str, Tensors] = {}
        for r in self.active:
            if "forward" in r.capabilities:
                t = self._call(r, "forward", r.forward, cfg, self.w, self.x, dtype)
                if t is not None:
                    self.fwd[r.name] = t
        self.lock_idx = None
        self.lock_kept: dict = {}
        self.lock_note = ""
        if self.s.lock_routing:
            first = next((r for r in self.active if r.name in self.fwd and "lock" in r.capabilities), None)
            if first is not None:
                self.lock_idx = np.asarray(self.fwd[first.name]["selected_experts"], np.int64)
                free, _ = divergence(self.lock_idx, self.ref_aux["selected_experts"])
                self.lock_note = (f"routing locked to {first.name}'s selection (free routing differed from "
                                  f"the reference on {len(free)} token(s){': ' + str(free.tolist()) if len(free) else ''})")
                # (6a) with a capacity the drop decision is locked too (``kept_slots``)
                self.lock_kept = drops.locked_kept(self.fwd[first.name])
                if self.lock_kept:
                    self.lock_note += "; its drop decision (kept_slots) locked too"
                self.ref_out, self.ref_aux = reference_forward(self.w, self.x, cfg, self.lock_idx,
                                                               **self.lock_kept)
                for r in self.active:
                    if r.name in self.fwd and "lock" in r.capabilities:
                        t = self._call(r, "forward (locked)", r.forward, cfg, self.w, self.x, dtype,
                                       selected_experts=self.lock_idx,
                                       **drops.lock_kwargs(r.forward, self.lock_kept))
                        if t is None:
                            del self.fwd[r.name]
                        else:
                            self.fwd[r.name] = t
        expected = Tensors({"out": self.ref_out, **{k: np.asarray(v) for k, v in self.ref_aux.items()}})
        self.diverged_from_ref: dict[str, np.ndarray] = {}
        for name, t in self.fwd.items():
            runner = next(r for r in self.active if r.name == name)
            self.diverged_from_ref[name] = self.compare_forward(name, REFERENCE, t, expected, runner, True)
        for a, b in itertools.combinations(self.fwd, 2):
            self.compare_forward(a, b, self.fwd[a], self.fwd[b], None, False)

    def compare_forward(self, name, against, actual: Tensors, expected: Mapping, runner, vs_reference):
        cfg, s = self.cfg, self.s
        n_tok = self.x.shape[0] * self.x.shape[1]
        diverged = np.zeros(0, np.int64)
        note = self.lock_note
        if "selected_experts" in actual and "selected_experts" in expected:
            ia = np.asarray(actual["selected_experts"], np.int64)
            ie = np.asarray(expected["selected_experts"], np.int64)
            if ia.shape != ie.shape:
                self._check("routing", "selected_experts", name, against, ia, ie, "int64", "exact")
                return np.arange(n_tok)
            diverged, order_only = divergence(ia, ie)
            margins = self.margins[diverged]
            near_tie = bool((margins <= s.tie_tol).all())
            status = PASS if len(diverged) == 0 else (WARN if near_tie else FAIL)
            finding = RoutingFinding(backend=name, against=against, count=int(len(diverged)),
                                     tokens=diverged.tolist(), margins=margins.tolist(),
                                     backend_experts=ia[diverged].tolist(),
                                     against_experts=ie[diverged].tolist(), order_only=order_only,
                                     status=status, tie_tol=s.tie_tol, num_tokens=n_tok)
            self.report.routing.append(finding)
            self.report.add(Check(
                id=f"routing/selected_experts/{name}~{against}", kind="routing", tensor="selected_experts",
                backend=name, against=against, dtype="int64", status=status, numel=int(ia.size),
                masked_tokens=int(len(diverged)), note="; ".join(filter(None, [finding.summary(), note]))))
        if "kept_slots" in actual and "kept_slots" in expected and "selected_experts" in actual:
            # (6a) dropped tokens: a finding of their own, masked below like diverged routing
            own = np.asarray(actual["selected_experts"], np.int64)
            recomputed = (reference_forward(self.w, self.x, cfg, own, **self.lock_kept)[1]["kept_slots"]
                          if vs_reference else None)
            dropped, check = drops.compare_kept(cfg, name, against, actual, expected, self.drop_margins,
                                                s.tie_tol, recomputed, diverged)
            self.report.add(check)
            diverged = np.union1d(diverged, dropped).astype(np.int64)
        keep = np.setdiff1d(np.arange(n_tok), diverged)
        for key in FORWARD_KEYS:
            if key == "selected_experts" or key not in expected:
                continue
            if key not in actual:
                if runner is None or "aux" in runner.capabilities or key == "out":
                    self.report.add(Check(id=f"forward/{key}/{name}~{against}", kind="forward", tensor=key,
                                          backend=name, against=against, dtype=s.dtype, status=FAIL,
                                          note=f"{key!r} missing from {name}'s output"))
                continue
            a, e = np.asarray(actual[key], np.float64), np.asarray(expected[key], np.float64)
            dtype = expected_dtype(key, s.dtype)
            got = actual.dtypes.get(key, dtype)
            row_note, soften, masked = note, False, 0
            if got != dtype and not (key == "out" or got.startswith("int")):
                row_note = "; ".join(filter(None, [f"computed in {got}, contract says {dtype}", note]))
            if key in ("out", "routing_weights") and a.size and e.size:
                a, e = a.reshape(n_tok, -1), e.reshape(n_tok, -1)
                if key == "routing_weights" and a.shape == e.shape:
                    a = np.take_along_axis(a, _sorted_rows(actual["selected_experts"])[0], -1)
                    e = np.take_along_axis(e, _sorted_rows(expected["selected_experts"])[0], -1)
                if len(diverged) and a.shape[0] == e.shape[0]:
                    a, e, masked = a[keep], e[keep], len(diverged)
                    row_note = "; ".join(filter(None, [f"{masked} diverged token(s) masked", note]))
            elif key in ("tokens_per_expert", "load_balance_loss") and len(diverged):
                if vs_reference:
                    idx = np.asarray(actual["selected_experts"], np.int64)
                    own_kept = drops.counted_slots(cfg, actual)  # (6a) None: every selected slot counts
                    if key == "tokens_per_expert":
                        e = np.bincount(idx[own_kept] if own_kept is not None else idx.ravel(),
                                        minlength=cfg.num_experts).astype(np.float64)
                    else:
                        e = np.float64(ref.load_balance_loss(expected["scores"], idx, cfg.num_experts,
                                                             cfg.load_balance_coeff, cfg.load_balance_loss,
                                                             batch=self.x.shape[0], kept=own_kept))
                    row_note = "; ".join(filter(None, [f"expected recomputed with {name}'s routing", note]))
                else:
                    soften = True
                    row_note = "; ".join(filter(None, ["depends on routing, which diverged", note]))
            self._check("forward", key, name, against, a, e, dtype,
                        "exact" if key == "tokens_per_expert" else "forward",
                        note=row_note, masked=masked, soften=soften)
        return diverged

    def grad_stage(self) -> None:
        cfg, dtype = self.cfg, self.s.dtype
        cot = self.cot
        idx64 = self.lock_idx if self.lock_idx is not None else np.asarray(self.ref_aux["selected_experts"])
        kept64 = self.lock_kept if self.lock_idx is not None else drops.locked_kept(self.ref_aux)  # (6a)
        grads, grads64 = {}, {}
        for r in self.active:
            if "grad" not in r.capabilities:
                continue
            div = self.diverged_from_ref.get(r.name, np.zeros(0))
            can_lock = "lock" in r.capabilities
            locked = can_lock and (self.lock_idx is not None or len(div) > 0)
            note = ""
            if not can_lock:
                note = "routing not locked (the column cannot take selected_experts)" if len(div) else ""
            elif self.lock_idx is not None:
                note = "routing locked (--lock-routing)"
            elif len(div):
                note = f"routing locked to the reference's choice ({len(div)} token(s) diverged in the forward)"
            g = self._call(r, f"grad {dtype}", r.grad, cfg, self.w, self.x, dtype, cot,
                           selected_experts=idx64 if locked else None,
                           **drops.lock_kwargs(r.grad, kept64 if locked else {}))
            g64 = g if dtype == "float64" else self._call(r, "grad float64", r.grad, cfg, self.w, self.x,
                                                           "float64", cot,
                                                           selected_experts=idx64 if can_lock else None,
                                                           **drops.lock_kwargs(r.grad, kept64 if can_lock else {}))
            if g is not None:
                grads[r.name] = (g, note)
            if g64 is not None:
                grads64[r.name] = (g64, note)
            if g is not None and g64 is not None and dtype != "float64":
                self._compare_grads(r.name, f"{r.name}@float64", g, g64, note)
        for a, b in itertools.combinations(grads, 2):
            notes = dict.fromkeys(filter(None, [grads[a][1], grads[b][1]]))  # once each, in order
            self._compare_grads(a, b, grads[a][0], grads[b][0], "; ".join(notes))
        if dtype != "float64":
            for a, b in itertools.combinations(grads64, 2):
                self._compare_grads(f"{a}@float64", f"{b}@float64", grads64[a][0], grads64[b][0],
                                    "float64 answers of the two backends")

    def _compare_grads(self, name, against, g: Tensors, e: Tensors, note: str) -> None:
        for key in sorted(set(g) | set(e), key=lambda k: (k != GRAD_INPUT, k)):
            if key not in g or key not in e:
                self.report.add(Check(id=f"grad/{key}/{name}~{against}", kind="grad", tensor=key, backend=name,
                                      against=against, dtype=self.s.dtype, status=FAIL,
                                      note=f"gradient {key!r} missing from {name if key not in g else against}"))
                continue
            self._check("grad", key, name, against, g[key], e[key], g.dtypes.get(key, self.s.dtype), "grad",
                        note=note)

    def bias_stage(self) -> None:
        cfg, s = self.cfg, self.s
        xs = self.xs
        # the reference trajectory
        bias = np.asarray(self.w["expert_bias"], np.float32)
        ref_counts, ref_bias, ref_idx, ref_margins = [], [], [], []
        for x in xs:
            _, aux = reference_forward({**self.w, "expert_bias": bias.astype(np.float64)}, x, cfg)
            counts = aux["tokens_per_expert"].astype(np.float32)
            ref_idx.append(aux["selected_experts"])
            ref_margins.append(selection_margins(cfg, aux["scores"], bias))
            bias = ref.update_expert_bias(bias, counts, s.bias_lr)
            ref_counts.append(counts)
            ref_bias.append(bias.copy())
        self.report.bias_trajectory["reference"] = [b.tolist() for b in ref_bias]
        runs = {}
        for r in self.active:
            if "bias" not in r.capabilities:
                continue
            steps = self._call(r, f"{s.steps} bias steps", r.bias_steps, cfg, self.w, xs, s.dtype, s.bias_lr)
            if steps is None:
                continue
            runs[r.name] = steps
            self.report.bias_trajectory[r.name] = [np.asarray(t["expert_bias"]).tolist() for t in steps]
            counts = np.stack([np.asarray(t["tokens_per_expert"], np.float64) for t in steps])
            biases = np.stack([np.asarray(t["expert_bias"], np.float64) for t in steps])
            # routing per step against the reference trajectory
            first_diff, near = None, True
            for k, t in enumerate(steps):
                div, _ = divergence(np.asarray(t["selected_experts"]), ref_idx[k])
                if len(div) and first_diff is None:
                    first_diff, near = k, bool((ref_margins[k][div] <= s.tie_tol).all())
            same_counts = bool((counts == np.stack(ref_counts)).all())
            note = "" if first_diff is None else (
                f"routing diverged from the reference at step {first_diff}"
                f" ({'near-tie' if near else 'not a near-tie'}); later steps follow different biases")
            self._check("bias", "tokens_per_expert", r.name, REFERENCE, counts, np.stack(ref_counts), "float32",
                        "exact", note=note, soften=first_diff is not None and near)
            self._check("bias", "expert_bias", r.name, REFERENCE, biases, np.stack(ref_bias), "float32", "exact",
                        note=note or "bit-identical expected (identical counts)",
                        soften=not same_counts and near)
            prev = np.asarray(self.w["expert_bias"], np.float32)
            rule = []
            for k in range(len(steps)):
                rule.append(ref.update_expert_bias(prev, counts[k].astype(np.float32), s.bias_lr))
                prev = biases[k].astype(np.float32)
            self._check("bias", "update_rule", r.name, REFERENCE, biases, np.stack(rule), "float32", "exact",
                        note="new bias vs parity.reference.update_expert_bias on the backend's own counts")
        for a, b in itertools.combinations(runs, 2):
            ca = np.stack([np.asarray(t["tokens_per_expert"]) for t in runs[a]])
            cb = np.stack([np.asarray(t["tokens_per_expert"]) for t in runs[b]])
            same = bool((ca == cb).all())
            self._check("bias", "expert_bias", a, b, np.stack([t["expert_bias"] for t in runs[a]]),
                        np.stack([t["expert_bias"] for t in runs[b]]), "float32", "exact",
                        note="" if same else "counts differ between the backends (routing diverged)",
                        soften=not same)


def run_parity(settings: Settings, weights: Mapping[str, np.ndarray], runners: Sequence[Runner], *,
               x: np.ndarray | None = None, progress=None) -> Report:
    """Run every check on every available runner; see the module docstring.

    weights: canonical mapping for ``settings.cfg`` (any float dtype; rounded to ``settings.dtype``;
    buffers optional). x: ``[B, S, D]`` or ``None`` (``make_input`` from the seed).
    Raises ``parity.weights.WeightsError`` for weights that do not match the config and
    ``ValueError`` for a bad ``x``; backend failures become FAIL rows instead.
    """
    return _Run(settings, weights, runners, x, progress).run()
