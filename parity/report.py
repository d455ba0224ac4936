"""The parity report: rows of checks, routing findings, and their JSON / Markdown / terminal forms.

``report.json`` (``Report.to_json``; schema "moe-parity/report/1"; keys are stable):

- ``schema``: "moe-parity/report/1".
- ``summary``: ``status`` ("pass" | "fail"), ``exit_code`` (0 | 1 | 2: no backend ran), counts ``passed``, ``failed``,
  ``warned``, ``skipped``, ``backends_ran`` (list of names), ``worst`` (id of the worst check).
- ``settings``: ``preset``, ``config`` (every MoEConfig field), ``dtype``, ``batch``, ``seq_len``,
  ``seed``, ``steps``, ``bias_lr``, ``lock_routing``, ``tie_tol``, ``tolerances``
  (kind -> dtype -> {rtol, atol}, overrides applied), ``weights`` (file path or the init recipe), ``grads``,
  ``allow_nonfinite``.
- ``environment``: python, platform, numpy, torch, jax, jaxlib, flax, transformers versions ("not installed"
  when absent).
- ``backends``: list of ``{name, status: "ran" | "skipped", reason}``.
- ``checks``: list, worst first, of ``{id, kind, tensor, backend, against, dtype, status, numel,
  max_abs, max_rel, max_ulp, mean_ulp, ulp_at_scale, cosine, tol_ratio, worst_index, atol, rtol, masked_tokens,
  nonfinite, note, traceback}``. ``kind``: "forward" | "grad" | "bias" | "routing" | "backend" | "error" |
  "capability" (SKIP: a column that cannot give gradients, aux tensors or bias steps; docs/columns.md);
  ``status``: "PASS" | "FAIL" | "WARN" | "SKIP"; ``against``: "reference" (float64 NumPy),
  "<backend>@float64" (that backend's own float64 run) or another backend; ``id`` is
  ``kind/tensor/backend~against`` and identifies a row across runs (``moe-parity compare``);
  ``max_rel`` = max ``|a - e| / max(|e|, atol)``; ``tol_ratio`` >= 1 means outside tolerance
  (see ``parity.metrics``); for "routing" rows ``masked_tokens`` is the number of tokens routed
  differently and the error figures are null (nothing was measured in units of the tensor).
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

import importlib.metadata
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
    for mod in ("torch", "jax", "jaxlib", "flax", "transformers"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", "?")
        else:  # installed but not imported by this run: its distribution's version, read without importing
            try:
                env[mod] = importlib.metadata.version(mod)
            except importlib.metadata.PackageNotFoundError:
                env[mod] = "not installed"
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
    #: check id -> the error allowed at the tensor's largest |expected| (in memory only; the plots' mark)
    limits: dict[str, float] = field(default_factory=dict)

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
        lines += ["", "## Tolerances applied", "",
                  "A row passes when every element satisfies `|a - e| <= atol * max(1, max|e|) + rtol * |e|` "
                  "(`tol ratio` <= 1; parity.metrics.compare) and no NaN/Inf appears where the float64 answer "
                  "is finite; `tokens_per_expert`, `expert_bias` and the update rule must be exact.", "",
                  "| kind | dtype | rtol | atol |", "|---|---|---|---|"]
        for kind, by_dtype in (s.get("tolerances") or {}).items():
            for dt, tol in by_dtype.items():
                lines.append(f"| {kind} | {dt} | {tol.get('rtol'):g} | {tol.get('atol'):g} |")
        lines += ["", f"Routing: a token routed differently is a WARN when its float64 selection margin is at most "
                  f"tie_tol = {s.get('tie_tol')}, a FAIL otherwise."]
        lines += ["", "## Checks (worst first)", "", *MARKDOWN_LEGEND, "",
                  "| status | check | backend | against | dtype | max abs | max rel | max ULP | ULP at scale | cosine "
                  "| tol ratio | tokens | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted(self.checks, key=Check.sort_key):
            tokens = str(c.masked_tokens) if c.kind == "routing" or c.masked_tokens else ""
            lines.append(f"| {c.status} | {c.kind}/{c.tensor} | {c.backend} | {c.against} | {c.dtype} | "
                         f"{_fmt(c.max_abs)} | {_fmt(c.max_rel)} | {_fmt(c.max_ulp)} | {_fmt(c.ulp_at_scale, ulp=True)} | "
                         f"{_fmt(c.cosine, cos=True)} | "
                         f"{_fmt(c.tol_ratio)} | {tokens} | {c.note.replace('|', '/')} |")
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
        table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False,
                      padding=0)  # the box puts one space between columns
        rows = sorted(self.checks, key=Check.sort_key)
        shown = rows if max_rows is None else rows[:max_rows]
        notes: dict[str, int] = {}  # note text -> footnote number, so long notes don't widen the table
        cells = []
        for c in shown:
            ref = f" [{notes.setdefault(c.note, len(notes) + 1)}]" if c.note else ""
            check = f"{c.kind}/{c.tensor}" + (f": {c.masked_tokens} token(s) differ" if c.kind == "routing" else "")
            if c.kind == "backend":
                check = "backend skipped" if c.status == SKIP else "backend"
            against = _display_name(c.against)
            if c.dtype != self.settings.get("dtype") and "@" not in c.against and c.kind != "routing":
                against += f" in {c.dtype}"
            numbers = ["-", "-", "-", "-"] if c.kind == "routing" else [
                _fmt(c.max_abs), _fmt(c.ulp_at_scale, ulp=True), _fmt(c.cosine, cos=True), _fmt(c.tol_ratio)]
            if compact:
                numbers.pop(2)
                names = [_display_name(c.backend) + ("" if c.against == "-" else f" vs {against}")]
            else:
                names = [_display_name(c.backend), against]
            cells.append([f"[{_COLOURS.get(c.status, '')}]{c.status}[/]", escape(check + ref),
                          *(escape(n) for n in names), *numbers])
        # compact: the status column has no header (its cells say PASS / FAIL), which saves two columns
        heads = ["", "check", "backend vs reference"] if compact else ["status", "check", "backend", "against"]
        heads += ["max abs", "ULP", "tol"] if compact else ["max abs", "ULP", "cosine", "tol"]
        names = range(1, 3 if compact else 4)  # the columns of names, which wrap; the others never do
        natural = [max([len(_plain(cell[i])) for cell in cells] + [len(h)]) for i, h in enumerate(heads)]
        # a name column is at least as wide as its longest word, so it wraps at spaces, never inside a name
        longest = {i: max(len(w) for text in [heads[i]] + [_plain(cell[i]) for cell in cells] for w in text.split())
                   for i in names}
        widths = _fit_widths(natural, longest, width)
        for i, head in enumerate(heads):
            table.add_column(head, justify="left" if i <= max(names) else "right", width=widths[i],
                             no_wrap=i not in names, overflow="fold")
        for cell in cells:
            table.add_row(*cell)
        lines = ["ULP: error in units in the last place of the tensor's largest value; tol: error / tolerance "
                 "(<= 1 passes)" + ("; cosine and max rel in --json / --out." if compact else ".")]
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


def _fit_widths(natural: list[int], longest: dict[int, int], width: int | None) -> list[int]:
    """Column widths for a table at most ``width`` wide (one space between columns): the columns in
    ``longest`` (index -> longest word) give up space, widest first, down to their longest word (then,
    on a terminal narrower than that, down to 8 characters, folding names); the others never shrink."""
    widths = list(natural)
    if width is None:
        return widths
    excess = sum(widths) + len(widths) - 1 - width
    while excess > 0:
        shrinkable = [i for i in longest if widths[i] > longest[i]]
        if not shrinkable:  # narrower than any name: fold names (never a number) down to 8 characters
            shrinkable = [i for i in longest if widths[i] > 8]
        if not shrinkable:
            break  # a terminal this narrow wraps the lines itself
        i = max(shrinkable, key=lambda j: widths[j])
        widths[i] -= 1
        excess -= 1
    return widths


def _display_name(name: str) -> str:
    """A backend name as the table shows it: "jax:cpu@float64" -> "jax:cpu @float64" (wraps after the name)."""
    return name.replace("@", " @")


def _plain(markup: str) -> str:
    from rich.text import Text

    return Text.from_markup(markup).plain


#: the column legend of report.md's check table
MARKDOWN_LEGEND = [
    "Columns: **check** `kind/tensor` (forward output and aux, gradient w.r.t. the input `x` or a parameter, "
    "expert-bias step); **backend** the column checked, **against** what it is compared with (`reference`: "
    "the float64 NumPy reference; `NAME@float64`: that backend's own float64 run; another backend: pairwise); "
    "**dtype** the dtype the errors are counted in; **max abs** max `|a - e|`; **max rel** max "
    "`|a - e| / max(|e|, atol)`; **max ULP** the largest error of one element in units in the last place at "
    "that element (the count of representable values of **dtype** between actual and expected); **ULP at "
    "scale** max `|a - e|` in ULPs of the tensor's largest `|e|`; **cosine** cosine similarity of the "
    "flattened tensors; **tol ratio** the largest `|a - e| / (atol * max(1, max|e|) + rtol |e|)` (<= 1 passes); **tokens** tokens routed differently (routing rows) or "
    "masked out of the comparison because of that (forward rows).",
    "",
    "Why a PASS row can show millions of per-element ULPs: representable values crowd together near zero "
    "(the float32 ULP of 1e-30 is about 1e-37, and an actual and expected value of opposite signs have "
    "every tiny value between them), so an error that is negligible next to the tensor's scale can be "
    "millions of ULPs of one element close to zero. The verdict is set against the tensor's scale, which "
    "is what **ULP at scale** measures: read that column to judge the rounding, and max ULP only for "
    "tensors with no elements near zero.",
]


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


#: the default of ``moe-parity compare --factor``: error growth beyond it is a regression
GROWTH_FACTOR = 10.0


def compare_settings(a: Report, b: Report) -> list[str]:
    """One line per setting that makes two reports' rows measure different things: dtype, preset,
    seed, the backends that ran (and the batch, sequence length and config). Empty when comparable."""
    out = []
    for key in ("dtype", "preset", "seed", "batch", "seq_len"):
        va, vb = a.settings.get(key), b.settings.get(key)
        if va != vb:
            out.append(f"{key} differs: {va!r} -> {vb!r}")
    fa, fb = a.settings.get("config") or {}, b.settings.get("config") or {}
    fields = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    if fields:
        out.append(f"config differs in {', '.join(fields)}")
    ra, rb = a.backends_ran, b.backends_ran
    if set(ra) != set(rb):
        only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
        out.append("backends differ:" + (f" only in A {', '.join(only_a)}" if only_a else "")
                   + (";" if only_a and only_b else "") + (f" only in B {', '.join(only_b)}" if only_b else ""))
    return out


def compare_reports(a: Report, b: Report, factor: float = GROWTH_FACTOR) -> tuple[list[dict], list[str]]:
    """Rows of the checks present in either report, and the ids that regressed.

    A regression: a check that PASSed or WARNed in A FAILs in B (or is new in B and fails), or whose
    ``tol_ratio`` grew more than ``factor`` times from A to B while being above 1 / ``factor`` in B
    (errors far inside the tolerance may grow by any factor: 1e-9 -> 1e-7 is noise, not drift).
    ``factor``: a finite number > 1 (``ValueError`` otherwise).

    Each row: ``{id, status_a, status_b, max_abs_a, max_abs_b, ulp_a, ulp_b, growth, regressed}``;
    ``ulp_*`` is ``ulp_at_scale`` (the ULP column of ``moe-parity run``), ``growth`` the ratio of the
    ``tol_ratio`` of B to A's (None when either is missing or A's is 0).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 1:
        raise ValueError(f"factor={factor!r} must be a finite number > 1")
    ca = {c.id: c for c in a.checks}
    cb = {c.id: c for c in b.checks}
    rows, regressed = [], []
    for cid in sorted(set(ca) | set(cb)):
        x, y = ca.get(cid), cb.get(cid)
        growth = None
        if x is not None and y is not None and x.tol_ratio is not None and y.tol_ratio is not None \
                and x.tol_ratio > 0:
            growth = y.tol_ratio / x.tol_ratio
        failed = y is not None and y.status == FAIL and (x is None or x.status in (PASS, WARN))
        grew = growth is not None and growth > factor and y.tol_ratio > 1 / factor
        rows.append({"id": cid, "status_a": x.status if x else "-", "status_b": y.status if y else "-",
                     "max_abs_a": x.max_abs if x else None, "max_abs_b": y.max_abs if y else None,
                     "ulp_a": x.ulp_at_scale if x else None, "ulp_b": y.ulp_at_scale if y else None,
                     "growth": growth, "regressed": failed or grew})
        if failed or grew:
            regressed.append(cid)
    return rows, regressed
