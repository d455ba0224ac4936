"""Fixtures and helpers shared by the moe_torch tests."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.torch.fake_npu import make_fake_torch_npu

KERNELS = ("loop", "grouped_mm", "auto", "npu")


@pytest.fixture
def fake_npu(monkeypatch):
    """Install the CPU stand-in of ``torch_npu`` for one test; returns it (``.calls`` records each call)."""
    mod = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    return mod


def build_moe(cfg, weights, dtype=torch.float32, **overrides):
    """A ``moe_torch.MoE`` for ``cfg`` loaded with the canonical ``weights`` and cast to ``dtype``."""
    from moe_torch import MoE

    moe = MoE(**cfg.to_kwargs(**overrides))
    moe.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    return moe.to(dtype)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 and back to float64 (what a bf16 module actually holds)."""
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).bfloat16().double().numpy()


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


@pytest.fixture(scope="session")
def gloo_group(tmp_path_factory):
    """A 1-process gloo process group (FileStore in a temp dir), torn down after the session."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
