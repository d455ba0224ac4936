"""Training parity of the MoE layer: ``moe-parity train`` (issue 17).

K optimizer steps of the layer on a fixed synthetic task (``task``: regress a teacher layer), the same
data and initial canonical weights in ``moe_torch`` (``torch_loop``) and ``moe_jax`` (``jax_loop``), the
optimizers matched (``optim``), each backend also run in float64 as its truth. Per step the runs are
compared (``metrics``) and judged by a drift band (``verdict``); invariance rows (``invariance``:
gradient accumulation, activation checkpointing, determinism) run next to it; ``report`` and
``plots`` write what ``command`` (the CLI) prints. Entry point: ``run_training(settings, weights)``.

Importing this package is cheap: torch, jax and optax are imported inside the functions that use them.
"""

from parity.train.optim import OptimizerSpec
from parity.train.task import TrainSettings

__all__ = ["OptimizerSpec", "TrainSettings", "run_training"]


def run_training(*args, **kwargs):
    """``parity.train.run.run_training`` (imported on first use)."""
    from parity.train.run import run_training as run

    return run(*args, **kwargs)
