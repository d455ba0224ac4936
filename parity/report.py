"""The parity report: rows of checks, routing findings, and their JSON / Markdown / terminal forms.

``report.json`` (``Report.to_json``; schema "moe-parity/report/1"; keys are stable):

- ``schema``: "moe-parity/report/1".
- ``summary``: ``status`` ("pass" | "fail"), ``exit_code`` (0 | 1 | 2: no backend ran), counts ``passed``, ``failed``,
  ``warned``, ``skipped``, ``backends_ran`` (list of names), ``worst`` (id of the worst check).
- ``settings``: ``preset``, ``config`` (every MoEConfig field), ``dtype``, ``batch``, ``seq_len``,
  ``seed``, ``steps``, ``bias_lr``, ``lock_routing``, ``tie_tol``, ``tolerances``
  (kind -> dtype -> {rtol, atol}, overrides applied), ``weights`` (file path or the init recipe), ``grads``,
  ``allow_nonfinite``.
- ``environment``: python, platform, numpy and (when imported) torch, jax, flax versions.
- ``backends``: list of ``{name, status: "ran" | "skipped", reason}``.
- ``checks``: list, worst first, of ``{id, kind, tensor, backend, against, dtype, status, numel,
  max_abs, max_rel, max_ulp, mean_ulp, ulp_at_scale, cosine, tol_ratio, worst_index, atol, rtol, masked_tokens,
  nonfinite, note, traceback}``. ``kind``: "forward" | "grad" | "bias" | "routing" | "backend" | "error";
  ``status``: "PASS" | "FAIL" | "WARN" | "SKIP"; ``against``: "reference" (float64 NumPy),
  "<backend>@float64" (that backend's own float64 run) or another backend; ``id`` is
  ``kind/tensor/backend~against`` and identifies a row across runs (``moe-parity compare``);
  ``max_rel`` = max ``|a - e| / max(|e|, atol)``; ``tol_ratio`` >= 1 means outside tolerance
  (see ``parity.metrics``); for "routing" rows ``max_abs`` is the number of diverged tokens.
  ``nonfinite``: elements whose NaN/Inf pattern fails the row (NaN/Inf where the expected answer is
  finite, a NaN/Inf of the expected answer not matched, or, without ``allow_nonfinite``, NaN/Inf in
  both); such a row is a FAIL whatever its error figures (which cover the elements finite in both;
  "nan" when there are none), ``tol_ratio`` is "inf" and the note starts with the reason.
- ``notes``: list of one-line facts about the inputs, e.g. weights converted from another float dtype.
- ``routing``: list of ``{backend, against, count, tokens, margins, backend_experts,
  against_experts, order_only, status, tie_tol, num_tokens}``.
- ``expert_load``: backend (and "reference") -> tokens per expert of the forward.
- ``bias_trajectory``: backend (and "reference") -> ``expert_bias`` after each update step.

WARN (a near-tie routing divergence and what follows from it) does not fail a run; FAIL does; a run
in which no backend ran fails too (nothing was checked).
"""

from __future__ import annotations

import json
import math
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA = "moe-parity/report/1"
PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
_STATUS_ORDER = {FAIL: 0, WARN: 1, PASS: 2, SKIP: 3}
_COLOURS = {PASS: "green", FAIL: "bold red", WARN: "yellow", SKIP: "dim"}


@dataclass
class Check:
    """One row of the report (see the module docstring for the fields)."""

    id: str
    kind: str
    tensor: str
    backend: str
    against: str
    dtype: str
    status: str
    numel: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    max_ulp: int | None = None
    mean_ulp: float | None = None
    ulp_at_scale: float | None = None
    cosine: float | None = None
    tol_ratio: float | None = None
    worst_index: int | None = None
    atol: float | None = None
    rtol: float | None = None
    masked_tokens: int = 0
    nonfinite: int = 0
    note: str = ""
    traceback: str = ""

    def sort_key(self):
        ratio = self.tol_ratio if self.tol_ratio is not None and math.isfinite(self.tol_ratio) else (
            math.inf if self.tol_ratio is not None else -1.0)
        return (_STATUS_ORDER.get(self.status, 9), -ratio, self.id)


@dataclass
class RoutingFinding:
    """Tokens whose selected-expert sets differ between ``backend`` and ``against``.

    ``margins``: the float64 reference's selection margin of each such token (see
    ``parity.backends.reference_backend.selection_margins``).
    """

    backend: str
    against: str
    count: int
    tokens: list[int]
    margins: list[float]
    backend_experts: list[list[int]]
    against_experts: list[list[int]]
    order_only: int
    status: str
    tie_tol: float
    num_tokens: int

    def summary(self) -> str:
        if not self.count:
            text = f"same experts on all {self.num_tokens} tokens"
        else:
            shown = ", ".join(f"{t} (margin {m:.2e})" for t, m in list(zip(self.tokens, self.margins, strict=True))[:5])
            more = f", +{self.count - 5} more" if self.count > 5 else ""
            kind = "near-tie" if self.status == WARN else f"margin above tie_tol={self.tie_tol:g}"
            text = f"{self.count}/{self.num_tokens} token(s) routed differently ({kind}): {shown}{more}"
        if self.order_only:
            text += f"; {self.order_only} token(s) differ only in slot order"
        return text


def environment() -> dict[str, str]:
    """Versions of what the run used (frameworks only when already imported, to stay cheap)."""
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__}
    for mod in ("torch", "jax", "flax", "transformers"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", "?")
    return env


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf floats as strings, NumPy scalars as Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class Report:
    settings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    backends: list[dict] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    routing: list[RoutingFinding] = field(default_factory=list)
    expert_load: dict[str, list[float]] = field(default_factory=dict)
    bias_trajectory: dict[str, list[list[float]]] = field(default_factory=dict)
    #: one-line facts about the inputs (e.g. "weights converted to the run's dtype float32 ...: experts.w1 from float64")
    notes: list[str] = field(default_factory=list)
    #: check id -> elementwise absolute errors (in memory only; for the histograms)
    errors: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, check: Check) -> None:
        self.checks.append(check)

    def finish(self) -> None:
        self.checks.sort(key=Check.sort_key)

    # ---- summary ---------------------------------------------------------------------------------
    @property
    def backends_ran(self) -> list[str]:
        return [b["name"] for b in self.backends if b["status"] == "ran"]

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.checks)

    @property
    def passed(self) -> bool:
        return self.count(FAIL) == 0 and bool(self.backends_ran)

    @property
    def exit_code(self) -> int:
        """0: every check passed; 1: a check failed; 2: none of the selected backends could run (usage)."""
        if not self.backends_ran:
            return 2
        return 0 if self.passed else 1

    def worst(self, dtype: str | None = None, kinds=("forward", "grad")) -> dict[str, Check]:
        """Per tensor kind, the row with the largest ``max_abs`` (optionally of one compared dtype)."""
        out = {}
        for c in self.checks:
            if c.kind in kinds and c.max_abs is not None and (dtype is None or c.dtype == dtype):
                if c.kind not in out or c.max_abs > out[c.kind].max_abs:
                    out[c.kind] = c
        return out

    def summary(self) -> dict:
        ordered = sorted(self.checks, key=Check.sort_key)
        return {"status": "pass" if self.passed else "fail", "exit_code": self.exit_code,
                "passed": self.count(PASS), "failed": self.count(FAIL), "warned": self.count(WARN),
                "skipped": self.count(SKIP), "backends_ran": self.backends_ran,
                "worst": ordered[0].id if ordered else None}

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _clean({
            "schema": SCHEMA, "summary": self.summary(), "settings": self.settings,
            "environment": self.environment, "backends": self.backends,
            "checks": [asdict(c) for c in sorted(self.checks, key=Check.sort_key)],
            "routing": [asdict(r) for r in self.routing], "expert_load": self.expert_load,
            "bias_trajectory": self.bias_trajectory, "notes": self.notes,
        })

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a moe-parity report (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        def num(v):
            return float(v) if isinstance(v, str) else v
        checks = []
        for c in data["checks"]:
            c = dict(c)
            for k in ("max_abs", "max_rel", "tol_ratio", "cosine", "mean_ulp", "ulp_at_scale"):
                c[k] = num(c.get(k))
            checks.append(Check(**c))
        return cls(settings=data.get("settings", {}), environment=data.get("environment", {}),
                   backends=data.get("backends", []), checks=checks,
                   routing=[RoutingFinding(**{**r, "margins": [num(m) for m in r["margins"]]})
                            for r in data.get("routing", [])],
                   expert_load=data.get("expert_load", {}), bias_trajectory=data.get("bias_trajectory", {}),
                   notes=data.get("notes", []))

    @classmethod
    def load(cls, path) -> Report:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ---- Markdown --------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        s, summ = self.settings, self.summary()
        lines = [f"# moe-parity report: {summ['status'].upper()}", ""]
        lines += [f"- preset: `{s.get('preset')}`, dtype `{s.get('dtype')}`, batch {s.get('batch')} x "
                  f"seq_len {s.get('seq_len')}, seed {s.get('seed')}, bias steps {s.get('steps')}, "
                  f"lock_routing {s.get('lock_routing')}",
                  f"- weights: {s.get('weights')}",
                  f"- checks: {summ['passed']} passed, {summ['failed']} failed, {summ['warned']} warned, "
                  f"{summ['skipped']} skipped",
                  "- environment: " + ", ".join(f"{k} {v}" for k, v in self.environment.items())]
        lines += [f"- note: {n}" for n in self.notes] + [""]
        lines += ["## Backends", "", "| backend | status | reason |", "|---|---|---|"]
        lines += [f"| {b['name']} | {b['status']} | {b['reason']} |" for b in self.backends]
        lines += ["", "## Routing", ""]
        if not self.routing:
            lines.append("No routing compared.")
        for r in self.routing:
            lines.append(f"- **{r.backend}** vs {r.against}: {r.status}: {r.summary()}")
        lines += ["", "## Checks (worst first)", "",
                  "| status | check | backend | against | dtype | max abs | max rel | max ULP | ULP at scale | cosine | tol ratio | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted(self.checks, key=Check.sort_key):
            lines.append(f"| {c.status} | {c.kind}/{c.tensor} | {c.backend} | {c.against} | {c.dtype} | "
                         f"{_fmt(c.max_abs)} | {_fmt(c.max_rel)} | {_fmt(c.max_ulp)} | {_fmt(c.ulp_at_scale, ulp=True)} | "
                         f"{_fmt(c.cosine, cos=True)} | "
                         f"{_fmt(c.tol_ratio)} | {c.note.replace('|', '/')} |")
        cfg = s.get("config", {})
        lines += ["", "## Config", "", "```json", json.dumps(cfg, indent=2), "```", ""]
        return "\n".join(lines)

    # ---- terminal --------------------------------------------------------------------------------
    def rich_table(self, max_rows: int | None = None, out_path: str | None = None, width: int | None = None,
                   compact: bool | None = None):
        """The terminal table: one row per check, worst first, laid out for a terminal ``width`` wide.

        Only the columns that decide a verdict are shown (max abs error, error in ULPs at the tensor's
        scale, cosine, tolerance ratio; max relative error and per-element ULPs are in report.json /
        report.md, at full precision). ``compact`` (default: ``width`` < ``WIDE_TABLE`` columns) puts
        backend and reference in one column and leaves out the cosine, so the table fits 80 columns;
        names wrap at spaces, never inside a backend or tensor name, and no cell is cut.
        ``out_path``: where the full report was written, named in the caption when rows are cut.
        """
        from rich import box
        from rich.markup import escape  # backend names such as "jax:cpu[ep=2]" are not markup
        from rich.table import Table

        if compact is None:
            compact = width is not None and width < WIDE_TABLE
        summ = self.summary()
        title = (f"moe-parity: {summ['status'].upper()}  ({summ['passed']} passed, {summ['failed']} failed, "
                 f"{summ['warned']} warned, {summ['skipped']} skipped)  preset={self.settings.get('preset')} "
                 f"dtype={self.settings.get('dtype')}")
        table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False,
                      collapse_padding=True, width=width)
        rows = sorted(self.checks, key=Check.sort_key)
        shown = rows if max_rows is None else rows[:max_rows]
        notes: dict[str, int] = {}  # note text -> footnote number, so long notes don't widen the table
        cells = []
        for c in shown:
            ref = f" [{notes.setdefault(c.note, len(notes) + 1)}]" if c.note else ""
            check = f"{c.kind}/{c.tensor}" + (f": {c.masked_tokens} token(s) differ" if c.kind == "routing" else "")
            against = _display_name(c.against)
            if c.dtype != self.settings.get("dtype") and "@" not in c.against and c.kind != "routing":
                against += f" in {c.dtype}"
            numbers = ["-", "-", "-", "-"] if c.kind == "routing" else [
                _fmt(c.max_abs), _fmt(c.ulp_at_scale, ulp=True), _fmt(c.cosine, cos=True), _fmt(c.tol_ratio)]
            if compact:
                numbers.pop(2)
                names = [f"{_display_name(c.backend)} vs {against}"]
            else:
                names = [_display_name(c.backend), against]
            cells.append([f"[{_COLOURS.get(c.status, '')}]{c.status}[/]", escape(check + ref),
                          *(escape(n) for n in names), *numbers])
        # a name column is at least as wide as its longest word, so rich wraps at spaces, never inside one
        longest = [max([len(w) for cell in cells for w in _plain(cell[i]).split()] + [1])
                   for i in range(1, 3 if compact else 4)]
        heads = ["status", "check", "backend vs reference"] if compact else ["status", "check", "backend", "against"]
        for i, head in enumerate(heads):
            table.add_column(head, justify="left", overflow="fold", no_wrap=i == 0,
                             min_width=longest[i - 1] if i else None)
        for head in (["max abs", "ULP", "tol"] if compact else ["max abs", "ULP", "cosine", "tol"]):
            table.add_column(head, justify="right", no_wrap=True, overflow="fold")
        for cell in cells:
            table.add_row(*cell)
        lines = ["ULP: error in units in the last place of the tensor's largest value; tol: error / tolerance "
                 "(< 1 passes)" + ("; cosine and max rel in --json / --out." if compact else ".")]
        lines += [escape(f"[{n}] {text}") for text, n in notes.items()]
        if len(shown) < len(rows):
            where = f"in {out_path}/report.json and report.md" if out_path else "with --out DIR (or --max-rows 0 for all)"
            hidden = rows[len(shown):]
            counts = ", ".join(f"{sum(c.status == st for c in hidden)} {st}" for st in (FAIL, WARN, PASS, SKIP)
                               if any(c.status == st for c in hidden))
            lines.append(f"{len(hidden)} more row(s) ({counts}): see them {where}")
        table.caption = "\n".join(lines)
        table.caption_justify = "left"
        return table


#: terminals narrower than this get the compact table (``Report.rich_table``)
WIDE_TABLE = 110


def _display_name(name: str) -> str:
    """A backend name as the table shows it: "jax:cpu@float64" -> "jax:cpu @float64" (wraps after the name)."""
    return name.replace("@", " @")


def _plain(markup: str) -> str:
    from rich.text import Text

    return Text.from_markup(markup).plain


def _fmt(v, cos: bool = False, ulp: bool = False) -> str:
    if v is None:
        return "-"
    if ulp:
        return f"{v:.1f}" if v < 1e4 else f"{v:.1e}"
    if isinstance(v, int):
        return str(v)
    if cos:
        return f"{v:.6f}"
    return f"{v:.2e}" if v != 0 else "0"


def compare_reports(a: Report, b: Report) -> tuple[list[dict], list[str]]:
    """Rows of the checks present in either report, and the ids that regressed (PASS/WARN -> FAIL).

    Each row: ``{id, status_a, status_b, max_abs_a, max_abs_b, max_ulp_a, max_ulp_b}``.
    """
    ca = {c.id: c for c in a.checks}
    cb = {c.id: c for c in b.checks}
    rows, regressed = [], []
    for cid in sorted(set(ca) | set(cb)):
        x, y = ca.get(cid), cb.get(cid)
        rows.append({"id": cid, "status_a": x.status if x else "-", "status_b": y.status if y else "-",
                     "max_abs_a": x.max_abs if x else None, "max_abs_b": y.max_abs if y else None,
                     "max_ulp_a": x.max_ulp if x else None, "max_ulp_b": y.max_ulp if y else None})
        if y is not None and y.status == FAIL and (x is None or x.status in (PASS, WARN)):
            regressed.append(cid)
    return rows, regressed
