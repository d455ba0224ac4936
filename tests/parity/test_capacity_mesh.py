"""Step 6a under expert parallelism: with ``capacity_group="sequence"`` each rank holds whole sequences,
so ``--mesh ep=2`` keeps exactly the slots of one device (torch and JAX), and the output agrees."""

from __future__ import annotations

import numpy as np
import pytest

from parity.harness import Settings, run_parity
from parity.mesh import MeshRunner
from parity.presets import get_preset
from parity.weights import init_weights

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_ep2_keeps_the_slots_of_one_device(framework):
    pytest.importorskip("torch" if framework == "torch" else "jax")
    cfg = get_preset("maxtext-capacity").config.replace(dim=16, hidden_dim=24)
    assert cfg.capacity_group == "sequence"
    weights = init_weights(cfg, 0)
    report = run_parity(Settings(cfg=cfg, batch=2, seq_len=8, steps=0, grads=False), weights,
                        [MeshRunner(framework, {"ep": 2})])
    rows = {c.id: c for c in report.checks}
    name = f"{framework}:cpu[ep=2]"
    kept = rows[f"routing/kept_slots/{name}~reference"]
    assert kept.status == "PASS" and kept.masked_tokens == 0, kept.note
    assert "dropped" in kept.note and not kept.note.startswith("0 of")  # something was dropped
    assert rows[f"forward/out/{name}~reference"].status == "PASS"
    assert report.passed, [c.id for c in report.checks if c.status == "FAIL"]
    assert np.isfinite(rows[f"forward/out/{name}~reference"].max_abs)
