"""The report of ``moe-parity train``: JSON, Markdown and the terminal table.

``report.json`` (schema "moe-parity/train/1"):

- ``summary``: ``status`` ("pass" | "fail"), ``exit_code`` (0 | 1), ``band`` (the verdict's one line),
  ``first_metric`` / ``first_step`` (the metric that left the band first and the 0-based step; null
  when none did), ``invariance_failed`` (names of the failed rows).
- ``settings``: preset, config, optimizer (every field), dtype, master_dtype, truth_dtype, steps, batch,
  seq_len, seed, bias_lr, factor, micro_batches, invariance, weights.
- ``environment``: versions (as ``moe-parity run``); ``timing``: ``train_s``, ``total_s`` (and
  ``wall_time_s`` from the command).
- ``history``: run ("torch", "jax", "torch@float64", "jax@float64"; bfloat16 runs: "@float32") ->
  per-step ``loss``, ``mse``, ``aux`` (name -> list), ``grad_norm`` (before clipping),
  ``update_norm`` (parameter -> list of ``||p_{t+1} - p_t||``), ``tokens_per_expert`` and
  ``expert_bias`` (lists of E), ``routing_agreement`` (share of tokens whose expert set equals the
  run's own truth run; 1.0 for the truth runs), ``first_routing_divergence`` (step or null).
- ``drift``: "a~b" -> per-step max abs difference of the weights of runs a and b.
- ``band``: ``factor``, ``passed``, ``summary``, ``first_metric``, ``first_step``, ``rows``: per metric
  ``{metric, pair, own, limit, first_exit, status, note}`` (``parity.train.verdict``).
- ``invariance``: rows ``{check, backend, status, max_abs, tol_ratio, note}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from parity.train.invariance import InvarianceRow
from parity.train.verdict import Verdict

SCHEMA = "moe-parity/train/1"
_COLOURS = {"PASS": "green", "FAIL": "bold red", "WARN": "yellow"}


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return "0" if v == 0 else f"{v:.2e}"


@dataclass
class TrainReport:
    settings: dict
    environment: dict
    history: dict
    drift: dict
    verdict: Verdict
    invariance: list[InvarianceRow] = field(default_factory=list)
    timing: dict = field(default_factory=dict)

    # ---- summary ---------------------------------------------------------------------------------
    @property
    def truth(self) -> str:
        return self.settings.get("truth_dtype", "float64")

    @property
    def passed(self) -> bool:
        return self.verdict.passed and not any(r.status == "FAIL" for r in self.invariance)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def summary(self) -> dict:
        first = self.verdict.first
        return {"status": "pass" if self.passed else "fail", "exit_code": self.exit_code,
                "band": self.verdict.summary(), "first_metric": first.metric if first else None,
                "first_step": first.first_exit if first else None,
                "invariance_failed": [f"{r.check}/{r.backend}" for r in self.invariance if r.status == "FAIL"]}

    def final_drift(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self.drift.items() if v}

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _clean({"schema": SCHEMA, "summary": self.summary(), "settings": self.settings,
                       "environment": self.environment, "timing": self.timing, "history": self.history,
                       "drift": self.drift, "band": self.verdict.to_dict(),
                       "invariance": [r.to_dict() for r in self.invariance]})

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    # ---- rows shared by the table and the Markdown ------------------------------------------------
    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        """(status, check, pair/where, worst pair value, its limit, note) per band metric and invariance row."""
        out = []
        for r in self.verdict.rows:
            at = r.first_exit if r.first_exit is not None else max(range(len(r.pair)), key=lambda i: _ratio(r, i))
            where = f"step {r.first_exit}" if r.first_exit is not None else f"worst at step {at}"
            out.append((r.status, f"band/{r.metric}", where, _fmt(r.pair[at]), _fmt(r.limit[at]), r.note))
        for r in self.invariance:
            out.append((r.status, f"{r.check}", r.backend, _fmt(r.max_abs),
                        "-" if r.tol_ratio is None else f"ratio {r.tol_ratio:.2g}", r.note))
        return out

    def headline(self) -> list[str]:
        """A few lines: the final loss of each run, the final drift of each pair, routing agreement."""
        lines = []
        loss = ", ".join(f"{n} {h['loss'][-1]:.6g}" for n, h in self.history.items() if h["loss"])
        lines.append(f"final loss: {loss}")
        lines.append("final max |weight difference|: " + ", ".join(
            f"{k.replace('~', ' vs ')} {v:.2e}" for k, v in self.final_drift().items()))
        for side in ("torch", "jax"):
            h = self.history.get(side)
            if h:
                first = h["first_routing_divergence"]
                lines.append(f"{side}: routing agreement with {side}@{self.truth} min {min(h['routing_agreement']):.3f}, "
                             f"last {h['routing_agreement'][-1]:.3f}; first divergent step "
                             f"{'none' if first is None else first}")
        return lines

    # ---- Markdown --------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        s, summ = self.settings, self.summary()
        opt = s.get("optimizer", {})
        lines = [f"# moe-parity train: {summ['status'].upper()}", "",
                 f"- preset `{s.get('preset')}`, dtype `{s.get('dtype')}` (master weights `{s.get('master_dtype')}`, "
                 f"truth `{s.get('truth_dtype')}`), {s.get('steps')} steps of batch {s.get('batch')} x seq_len "
                 f"{s.get('seq_len')}, seed {s.get('seed')}",
                 f"- optimizer: {opt.get('name')} lr {opt.get('lr')}, weight decay {opt.get('weight_decay')}, "
                 f"momentum {opt.get('momentum')}, betas {opt.get('betas')}, eps {opt.get('eps')}, clip "
                 f"{opt.get('clip_norm')} ({opt.get('clip_rule')} rule); bias_lr {s.get('bias_lr')}",
                 f"- weights: {s.get('weights')}",
                 f"- band: {summ['band']}",
                 "- environment: " + ", ".join(f"{k} {v}" for k, v in self.environment.items()),
                 f"- timing: {self.timing}", ""]
        lines += [f"- {line}" for line in self.headline()] + [""]
        lines += ["## Band and invariance rows", "",
                  f"A band row passes when at every step `d(torch, jax) <= {s.get('factor')} * max(d(torch, "
                  f"torch@{self.truth}), d(jax, jax@{self.truth})) + 1 ULP` of the compared dtype at the truth's "
                  "magnitude (parity.train.verdict); a NaN/Inf fails. `value` is `d(torch, jax)` at the step "
                  "named (the first out of the band, else the worst), `limit` the band there. Invariance rows: "
                  "`value` is the largest gradient difference (0 = bit-identical), `limit` its tolerance ratio.",
                  "", "| status | check | where | value | limit | note |", "|---|---|---|---|---|---|"]
        for row in self.rows():
            lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
        lines += ["", "## Per step", "", "| step | loss torch | loss jax | loss torch@T | grad norm torch | "
                  "grad norm jax | torch~jax | torch~torch@T | jax~jax@T | routing torch | routing jax |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        t_, j_ = self.history["torch"], self.history["jax"]
        tt = self.history[f"torch@{self.truth}"]
        keys = list(self.drift)
        for i in range(len(t_["loss"])):
            lines.append(f"| {i} | {t_['loss'][i]:.7g} | {j_['loss'][i]:.7g} | {tt['loss'][i]:.7g} | "
                         f"{t_['grad_norm'][i]:.5g} | {j_['grad_norm'][i]:.5g} | " +
                         " | ".join(_fmt(self.drift[k][i]) for k in keys[:3]) +
                         f" | {t_['routing_agreement'][i]:.3f} | {j_['routing_agreement'][i]:.3f} |")
        lines += ["", f"(T = {self.truth}; drift columns: max abs weight difference)", "",
                  "## Config", "", "```json", json.dumps(s.get("config", {}), indent=2), "```", ""]
        return "\n".join(lines)

    # ---- terminal --------------------------------------------------------------------------------
    def rich_table(self, width: int | None = None):
        """The terminal table (fits 80 columns: long notes become numbered footnotes)."""
        from rich import box
        from rich.markup import escape
        from rich.table import Table

        summ = self.summary()
        table = Table(title=f"moe-parity train: {summ['status'].upper()}  preset={self.settings.get('preset')} "
                            f"dtype={self.settings.get('dtype')} steps={self.settings.get('steps')}",
                      box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False, padding=0)
        for head, justify in (("", "left"), ("check", "left"), ("where", "left"), ("value", "right"),
                              ("limit", "right")):
            table.add_column(head, justify=justify, no_wrap=head != "where", overflow="fold")
        notes: dict[str, int] = {}
        for status, check, where, value, limit, note in self.rows():
            ref = f" [{notes.setdefault(note, len(notes) + 1)}]" if note else ""
            table.add_row(f"[{_COLOURS.get(status, '')}]{status}[/]", escape(check + ref), escape(where), value,
                          escape(limit))
        lines = [f"band: value = d(torch, jax), limit = {self.settings.get('factor')} x own drift from "
                 f"@{self.truth} + 1 ULP; invariance: value = max gradient difference."]
        lines += [escape(f"[{n}] {text}") for text, n in notes.items()]
        table.caption = "\n".join(lines)
        table.caption_justify = "left"
        return table


def _ratio(row, i) -> float:
    lim = row.limit[i]
    return row.pair[i] / lim if lim > 0 else (math.inf if row.pair[i] > 0 else 0.0)
