"""Invariance rows of ``moe-parity train``: what must not change the step, per backend.

- ``grad_accumulation``: one batch of B against n micro-batches of B/n, each objective scaled by 1/n
  and the expert bias updated once after all of them: the same gradients (to the dtype's gradient
  tolerance: the sums run in another order), the same ``tokens_per_expert`` and the same new
  ``expert_bias`` (exactly). An update after every micro-batch would move the bias n times per step
  (torchtitan PR 1324). The "switch" balance loss is not invariant by construction (its ``f_i`` and
  ``P_i`` are means over the micro-batch, and a mean of products is not the product of means): the
  row is then a WARN that gives the size of the difference; the "sequence" loss and the z-loss are
  means over sequences / tokens and stay invariant.
- ``checkpointing``: the layer under activation recomputation (``torch.utils.checkpoint``,
  non-reentrant; ``nnx.remat`` = ``jax.checkpoint``) against the plain layer: the same aux loss (bit
  for bit: it is taken from the first forward, never counted twice; Megatron-LM issue 1478), the
  same gradients (tolerance), the same new ``expert_bias``. torch's recomputed forward counts its
  tokens again (the buffer holds twice the counts, which ``update_expert_bias(num_recomputations=2)``
  divides out); JAX's remat recomputes a pure function, so its counts are single.
- ``determinism``: the whole training run twice in one process: every recorded value and the final
  weights bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from parity.metrics import compare, tolerance

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"


@dataclass
class InvarianceRow:
    """One row: ``check`` ("grad_accumulation" | "checkpointing" | "determinism"), ``backend``,
    ``status``, ``max_abs`` (largest gradient or value difference; 0.0 when bit-identical),
    ``tol_ratio`` (of the gradient comparison; None where the check is exact), ``note``."""

    check: str
    backend: str
    status: str
    max_abs: float
    tol_ratio: float | None
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def _grad_metrics(a: dict, b: dict, dtype: str):
    tol = tolerance(dtype, "grad")
    worst_abs, worst_ratio, nonfinite = 0.0, 0.0, False
    for k in a:
        m = compare(a[k], b[k], dtype, rtol=tol["rtol"], atol=tol["atol"])
        worst_abs, worst_ratio = max(worst_abs, m.max_abs), max(worst_ratio, m.tol_ratio)
        nonfinite |= bool(m.nonfinite or m.mask_mismatch or m.nonfinite_matched)
    return worst_abs, worst_ratio, nonfinite


def _bitwise(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _row(check, backend, dtype, base, other, extra_notes, expect_aux_diff=""):
    """Compare two ``accumulate`` results: gradients (tolerance), counts and bias (exact), aux (exact)."""
    g_abs, g_ratio, nonfinite = _grad_metrics(other["grads"], base["grads"], dtype)
    same_counts = _bitwise(other["counts"], base["counts"])
    same_bias = _bitwise(other["expert_bias"], base["expert_bias"])
    aux_diff = max((abs(other["aux"][k] - base["aux"][k]) for k in base["aux"]), default=0.0)
    problems = []
    if nonfinite:
        problems.append("NaN/Inf in a gradient")
    if g_ratio > 1:
        problems.append(f"gradients differ beyond the {dtype} gradient tolerance (ratio {g_ratio:.3g})")
    if not same_counts:
        problems.append(f"tokens_per_expert differ ({base['counts'].tolist()} vs {other['counts'].tolist()})")
    if not same_bias:
        problems.append("the new expert_bias differs")
    if aux_diff and not expect_aux_diff:
        problems.append(f"aux loss differs by {aux_diff:.3g}")
    notes = list(extra_notes)
    if expect_aux_diff and (aux_diff or g_ratio > 1):
        notes.insert(0, f"{expect_aux_diff}: aux loss differs by {aux_diff:.3g}, gradient tol ratio {g_ratio:.3g}")
        problems = [p for p in problems if not p.startswith("gradients differ")]
        status = FAIL if problems else WARN
    else:
        status = FAIL if problems else PASS
    bit = all(_bitwise(other["grads"][k], base["grads"][k]) for k in base["grads"])
    notes.append("gradients bit-identical" if bit else f"gradients within tolerance (max abs {g_abs:.2e})")
    return InvarianceRow(check=check, backend=backend, status=status, max_abs=0.0 if bit else g_abs,
                         tol_ratio=g_ratio, note="; ".join(problems + notes))


def grad_accumulation(backend: str, make, x, y, micro_batches: int, dtype: str, cfg) -> InvarianceRow:
    """``make()`` builds a fresh trainer of ``backend`` at the initial weights."""
    full = make().accumulate(x, y, 1)
    micro = make().accumulate(x, y, micro_batches)
    expect = ""
    if cfg.load_balance_loss == "switch":
        expect = ("expected: the switch loss of a micro-batch is not 1/n of the batch's (f_i, P_i are "
                  "micro-batch means)")
    return _row("grad_accumulation", backend, dtype, full, micro,
                [f"1 batch of {x.shape[0]} vs {micro_batches} micro-batches of {x.shape[0] // micro_batches}; "
                 f"bias updated once per step"], expect)


def checkpointing(backend: str, make_plain, make_ckpt, x, y, dtype: str, recomputed_counts: int) -> InvarianceRow:
    """Plain layer vs the layer under recomputation; ``recomputed_counts``: how many times the
    checkpointed run's ``tokens_per_expert`` holds the counts (torch 2, JAX 1)."""
    plain = make_plain().accumulate(x, y, 1)
    ckpt = make_ckpt().accumulate(x, y, 1)
    raw = np.asarray(ckpt["counts"])
    counted = raw / recomputed_counts
    ckpt = {**ckpt, "counts": counted}
    note = (f"recomputation counted the tokens {recomputed_counts}x (update_expert_bias(num_recomputations="
            f"{recomputed_counts}))" if recomputed_counts > 1 else "counts not doubled (remat is pure)")
    return _row("checkpointing", backend, dtype, plain, ckpt, [note])


def determinism(first: dict, second: dict, backend: str) -> InvarianceRow:
    """``first`` / ``second``: {"records": [StepRecord], "params": final canonical weights} of two reruns."""
    diffs = []
    for t, (a, b) in enumerate(zip(first["records"], second["records"], strict=True)):
        for name in ("loss", "mse", "grad_norm"):
            if not _bitwise(np.float64(getattr(a, name)), np.float64(getattr(b, name))):
                diffs.append(f"{name} at step {t}")
        for name in ("selected", "tokens_per_expert", "expert_bias"):
            if not _bitwise(getattr(a, name), getattr(b, name)):
                diffs.append(f"{name} at step {t}")
    worst = 0.0
    for k, v in first["params"].items():
        if not _bitwise(v, second["params"][k]):
            diffs.append(f"final {k}")
            worst = max(worst, float(np.max(np.abs(v - second["params"][k]))))
    n = len(first["records"])
    if diffs:
        return InvarianceRow("determinism", backend, FAIL, worst, None,
                             f"two reruns differ: {', '.join(diffs[:4])}" + (f", +{len(diffs) - 4} more" if len(diffs) > 4 else ""))
    return InvarianceRow("determinism", backend, PASS, 0.0, None,
                         f"two reruns of {n} steps bit-identical (every record and the final weights)")
