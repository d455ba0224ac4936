"""The fixed synthetic task every run trains on: regress a teacher MoE layer's output.

A teacher layer of the same config with other weights (``parity.weights.init_weights(cfg, seed + 1)``,
its expert bias zero) maps each input to a target; the student starts from the canonical weights
(``--weights``, else ``init_weights(cfg, seed)``) and must learn the teacher's routing as well as its
experts. Inputs are standard normal, one batch per step from its own seed, so the stream is the same
for every backend, dtype and rerun. Targets are the float64 reference (``parity.reference``) of the
teacher, rounded to float32 with the inputs: the float32 and float64 runs see the same numbers.

Objective per step: ``mean((out - y) ** 2)`` over every element (float32; float64 in a float64 run)
plus the auxiliary losses the config enables (``load_balance_loss``, ``router_z_loss``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from parity import reference as ref
from parity.config import MoEConfig
from parity.metrics import round_to
from parity.train.optim import OptimizerSpec
from parity.weights import init_weights

BUFFERS = ("expert_bias", "tokens_per_expert")
TRAIN_DTYPES = ("float32", "bfloat16")  #: compute dtypes of ``moe-parity train``; float64 is the truth


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training-parity run depends on besides the initial weights.

    ``dtype``: compute dtype, "float32" (truth: each backend's float64 run) or "bfloat16" (bf16
    compute, float32 master weights and optimizer state; truth: each backend's float32 run).
    ``steps`` >= 1; ``batch``, ``seq_len`` >= 1; ``bias_lr``: ``update_expert_bias`` rate (finite,
    >= 0; used when ``cfg.use_expert_bias``); ``factor``: the drift band (``parity.train.verdict``),
    a finite number >= 1; ``micro_batches``: n of the gradient-accumulation row (divides ``batch``);
    ``invariance``: run the invariance rows. Raises ``ValueError`` naming the field.
    """

    cfg: MoEConfig
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    dtype: str = "float32"
    steps: int = 50
    batch: int = 4
    seq_len: int = 32
    seed: int = 0
    bias_lr: float = 1e-3
    factor: float = 4.0
    micro_batches: int = 2
    invariance: bool = True
    preset: str | None = None
    weights_source: str = "parity.weights.init_weights(seed=0)"

    def __post_init__(self):
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {TRAIN_DTYPES} (the float64 runs are the "
                             f"truth of a float32 run; bfloat16 is compared with float32)")
        for name, low in (("steps", 1), ("batch", 1), ("seq_len", 1), ("micro_batches", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name}={v!r} must be an integer >= {low}")
        if self.batch % self.micro_batches:
            raise ValueError(f"micro_batches={self.micro_batches} does not divide batch={self.batch}")
        for name, low in (("bias_lr", 0.0), ("factor", 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                raise ValueError(f"{name}={v!r} must be a finite number >= {low:g}")

    @property
    def truth_dtype(self) -> str:
        """The dtype of each backend's own reference run: float64, or float32 for a bfloat16 run."""
        return "float32" if self.dtype == "bfloat16" else "float64"

    @property
    def master_dtype(self) -> str:
        """The dtype of the master weights and optimizer state (float32 for bfloat16 compute)."""
        return "float32" if self.dtype == "bfloat16" else self.dtype

    def to_dict(self) -> dict:
        return {"preset": self.preset, "config": self.cfg.to_dict(), "optimizer": self.optimizer.to_dict(),
                "dtype": self.dtype, "master_dtype": self.master_dtype, "truth_dtype": self.truth_dtype,
                "steps": self.steps, "batch": self.batch, "seq_len": self.seq_len, "seed": self.seed,
                "bias_lr": self.bias_lr, "factor": self.factor, "micro_batches": self.micro_batches,
                "invariance": self.invariance, "weights": self.weights_source}


class Task:
    """The data stream and the initial weights of one run (shared by every backend and dtype).

    ``initial``: canonical weights rounded to float32 (as float64 arrays; buffers float32, missing
    ones zero); ``batch(t)`` -> ``(x, y)``, ``[batch, seq_len, dim]`` float64 arrays holding float32
    values, the same on every call.
    """

    def __init__(self, settings: TrainSettings, weights: Mapping[str, np.ndarray] | None = None):
        cfg = settings.cfg
        self.settings = settings
        w = init_weights(cfg, settings.seed) if weights is None else weights
        self.initial = {k: round_to(np.asarray(v, np.float64), "float32") for k, v in w.items()}
        for name in BUFFERS:
            self.initial.setdefault(name, np.zeros(cfg.num_experts))
        self.initial["tokens_per_expert"] = np.zeros(cfg.num_experts)
        teacher = init_weights(cfg, settings.seed + 1)
        teacher["expert_bias"] = np.zeros(cfg.num_experts, np.float32)
        self.teacher = {k: np.asarray(v, np.float64) for k, v in teacher.items()}
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        if step not in self._cache:
            s = self.settings
            rng = np.random.default_rng([s.seed, 5000 + step])
            x = round_to(rng.standard_normal((s.batch, s.seq_len, s.cfg.dim)), "float32")
            y, _ = ref.moe_forward(self.teacher, x, s.cfg)
            self._cache[step] = (x, round_to(y, "float32"))
        return self._cache[step]
