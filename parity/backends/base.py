"""The backend-runner interface: what the harness asks of every column of the parity report.

A runner is one framework on one device ("torch:cpu", "jax:cpu", "hf:cpu", later "torch-ep2:cpu" for a
sharded layer). It receives plain NumPy data and returns plain NumPy data, so the harness never
imports a framework; the runner imports its framework lazily, inside its methods.

Inputs (all NumPy, float64 arrays holding values that are exactly representable in ``dtype``, so a
runner's cast to ``dtype`` is exact):

- ``cfg``: the ``MoEConfig``; ``weights``: the canonical mapping (DESIGN.md), ``expert_bias`` and
  ``tokens_per_expert`` included (float32 values); ``x``: ``[B, S, D]``; ``dtype``: one of
  ``parity.metrics.DTYPES``; ``selected_experts``: ``None`` or ``[N, k]`` int64 (replaces top-k); ``kept_slots`` (only passed
  when the config has a capacity and the run locks the drop decision): ``[N, k]`` bool (replaces
  step 6a's choice).

Outputs are ``Tensors``: a dict name -> float64 (or int64) array with ``.dtypes`` name -> the dtype the
framework computed it in ("bfloat16", "float32", ...), which is the dtype its ULPs are counted in.

Test hooks: ``weights_hook(weights) -> weights`` and ``config_hook(cfg) -> cfg`` let a test plant a
bug in one backend (a perturbed expert, swapped w1/w3, another score function).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from parity.config import MoEConfig

GRAD_INPUT = "x"


class Tensors(dict):
    """name -> NumPy array (float64 for floating tensors), plus ``dtypes``: name -> computed dtype."""

    def __init__(self, arrays: Mapping[str, np.ndarray] | None = None, dtypes: Mapping[str, str] | None = None):
        super().__init__(arrays or {})
        self.dtypes: dict[str, str] = dict(dtypes or {})

    def put(self, name: str, array: np.ndarray, dtype: str) -> None:
        self[name] = array
        self.dtypes[name] = dtype


class Runner:
    """Base class of a backend column. Subclasses implement the methods their ``capabilities`` name.

    capabilities: "forward" (out + aux), "aux" (aux tensors beyond ``out``), "lock" (accepts
    ``selected_experts``), "grad" (gradients), "bias" (training steps + ``update_expert_bias``).
    A runner without "lock" is never given ``selected_experts`` (its gradient runs route freely).
    """

    name: str = "?"
    capabilities: frozenset[str] = frozenset()
    #: capability -> why this column lacks it (one line). The harness shows each one the run asks for
    #: ("aux"; "grad" with grads on; "bias" with steps > 0; "lock" with lock_routing) as a SKIP row
    #: ``capability/<cap>/<name>``, never a PASS. User columns (docs/columns.md) fill it in.
    skip_reasons: Mapping[str, str] = {}

    def __init__(self, *, weights_hook: Callable | None = None, config_hook: Callable | None = None):
        self.weights_hook = weights_hook
        self.config_hook = config_hook

    # --- hooks ---------------------------------------------------------------------------------
    def prepare(self, cfg: MoEConfig, weights: Mapping[str, np.ndarray]) -> tuple[MoEConfig, dict]:
        """Apply the test hooks (on copies)."""
        weights = {k: np.array(v, copy=True) for k, v in weights.items()}
        if self.config_hook is not None:
            cfg = self.config_hook(cfg)
        if self.weights_hook is not None:
            weights = self.weights_hook(weights)
        return cfg, weights

    # --- interface -----------------------------------------------------------------------------
    def plan(self, cfg: MoEConfig, weights: Mapping[str, np.ndarray], x: np.ndarray, dtype: str,
             cotangent: np.ndarray, grad64_selected: np.ndarray, xs: Sequence[np.ndarray], lr: float) -> None:
        """Optional: told before the first call what a harness run will most likely ask (the free-routing
        forward and gradient of ``x``, the float64 gradient with ``grad64_selected``, the bias steps
        of ``xs``), so that a runner which starts processes (``parity.mesh.MeshRunner``) can run them
        together. The calls themselves still come, with the same arguments; a runner must give the
        same answers with or without a plan. Default: nothing."""

    def unavailable(self) -> str | None:
        """``None`` when this runner can run here, else the reason it is skipped (one line)."""
        return None

    def unsupported(self, cfg: MoEConfig) -> str | None:
        """``None`` when this column can express ``cfg``, else why not (one line; the column is then
        SKIPPED). Called once at the start of a run; a column may narrow ``capabilities`` /
        ``skip_reasons`` for ``cfg`` here. Default: every config."""
        return None

    def forward(self, cfg: MoEConfig, weights: Mapping[str, np.ndarray], x: np.ndarray, dtype: str,
                selected_experts: np.ndarray | None = None) -> Tensors:
        """Eval-mode forward: ``out [B,S,D]`` and the aux tensors (DESIGN.md keys, N = B*S rows)."""
        raise NotImplementedError

    def grad(self, cfg: MoEConfig, weights: Mapping[str, np.ndarray], x: np.ndarray, dtype: str,
             cotangent: np.ndarray, selected_experts: np.ndarray | None = None) -> Tensors:
        """Gradients of ``sum(out * cotangent) + enabled aux losses`` w.r.t. ``x`` and every parameter.

        Keys: ``"x"`` and the canonical parameter names (``router.gate.weight``, ``experts.w1`` ...).
        """
        raise NotImplementedError

    def bias_steps(self, cfg: MoEConfig, weights: Mapping[str, np.ndarray], xs: Sequence[np.ndarray],
                   dtype: str, lr: float) -> list[Tensors]:
        """For each ``x`` in ``xs``: a training-mode forward, then ``update_expert_bias(moe, lr)``.

        Per step: ``tokens_per_expert`` (the buffer just before the update), ``selected_experts``
        (of that forward) and ``expert_bias`` (after the update).
        """
        raise NotImplementedError


def objective_cotangent(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The fixed random cotangent of the gradient objective (float64, standard normal)."""
    return np.random.default_rng(seed + 2).standard_normal(shape)
