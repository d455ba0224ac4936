"""Expert kernels agree with "loop", and the known grouped-GEMM traps stay closed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moe_torch import GroupedExperts
from moe_torch.kernels import KERNELS, grouped_mm_experts, loop_experts, resolve_kernel

FAST = ("grouped_mm", "npu")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _weights(e, h, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(e, h, d, generator=g) * d**-0.5, torch.randn(e, d, h, generator=g) * h**-0.5,
          torch.randn(e, h, d, generator=g) * d**-0.5]
    return [w.to(dtype).requires_grad_() for w in ws]


def _run(name, ws, x, counts):
    for t in (*ws, x):
        t.grad = None
    y = KERNELS[name](*ws, x, counts)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [t.grad.clone() for t in (*ws, x)]


@pytest.fixture(params=FAST)
def fast_kernel(request):
    if request.param == "npu":
        request.getfixturevalue("fake_npu")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("dims", [(16, 24), (13, 7)], ids=["aligned", "unaligned"])
def test_kernel_agrees_with_loop(fast_kernel, dtype, dims):
    """Output and every gradient, with empty experts (0, 3, 7) and odd dims (padding path)."""
    d, h = dims
    e = 8
    counts = torch.tensor([0, 5, 1, 0, 9, 2, 3, 0])
    ws = _weights(e, h, d, dtype)
    x = torch.randn(int(counts.sum()), d).to(dtype).requires_grad_()
    y_ref, g_ref = _run("loop", ws, x, counts)
    y, g = _run(fast_kernel, ws, x, counts)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for a, b, name in zip(g, g_ref, ("w1", "w2", "w3", "x"), strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=name)
    for grad in g[:3]:  # experts without tokens: an exactly-zero weight gradient
        assert (grad[[0, 3, 7]] == 0).all()


def test_sum_backward(fast_kernel):
    """``experts(x, counts).sum().backward()``: the expanded stride-0 gradient is accepted."""
    ws = _weights(4, 8, 8, torch.float32)
    x = torch.randn(6, 8, requires_grad=True)
    KERNELS[fast_kernel](*ws, x, torch.tensor([2, 0, 3, 1])).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (*ws, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_rows_past_counts_do_not_leak(fast_kernel, dtype):
    """Padding rows past counts.sum() (here NaN) give a zero output and no NaN anywhere in the gradients."""
    ws = _weights(4, 16, 8, dtype)
    counts = torch.tensor([3, 0, 2, 1])
    x = torch.cat([torch.randn(6, 8), torch.full((5, 8), float("nan"))]).to(dtype).requires_grad_()
    for _ in range(3):  # uninitialised memory differs between calls
        for t in (*ws, x):
            t.grad = None
        y = KERNELS[fast_kernel](*ws, x, counts)
        assert torch.isfinite(y[:6]).all() and (y[6:] == 0).all()
        y.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in ws)
        assert torch.isfinite(x.grad[:6]).all() and (x.grad[6:] == 0).all()
    y_loop = loop_experts(*ws, x, counts)
    torch.testing.assert_close(y.float(), y_loop.float(), **TOL[dtype])


def test_zero_rows_in_total(fast_kernel):
    ws = _weights(4, 8, 8, torch.float32)
    x = torch.zeros(0, 8, requires_grad=True)
    y = KERNELS[fast_kernel](*ws, x, torch.zeros(4, dtype=torch.int64))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert all((w.grad == 0).all() for w in ws)


def test_grouped_mm_passes_one_offset_per_expert(monkeypatch):
    """offs = int32 inclusive cumulative ends, E entries (the original module passed E-1)."""
    import torch.nn.functional as F

    seen = []
    real = F.grouped_mm

    def spy(a, b, *, offs=None, **kw):
        seen.append(offs.clone())
        return real(a, b, offs=offs, **kw)

    monkeypatch.setattr(F, "grouped_mm", spy)
    ws = _weights(4, 8, 8, torch.float32)
    grouped_mm_experts(*ws, torch.randn(6, 8), torch.tensor([2, 0, 3, 1]))
    assert seen and all(o.dtype == torch.int32 and o.tolist() == [2, 2, 5, 6] for o in seen)


def test_npu_call_site(fake_npu):
    """The npu kernel's calls: one x (M, K), a stacked (E, K, N) weight, counts as int64 group_list."""
    e, h, d = 4, 24, 16
    ws = _weights(e, h, d, torch.bfloat16)
    counts = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, d).bfloat16().requires_grad_()
    KERNELS["npu"](*ws, x, counts).sum().backward()
    fwd = [c for c in fake_npu.calls if c["group_type"] == 0]
    ksplit = [c for c in fake_npu.calls if c["group_type"] == 2]
    assert [c["weight"] for c in fwd[:3]] == [[(e, d, h)], [(e, d, h)], [(e, h, d)]]  # w1^T, w3^T, w2^T
    assert all(c["x"][0][0] == 6 and c["group_list"] == [2, 0, 3, 1] and c["group_list_type"] == 1
               and c["split_item"] == 3 for c in fwd)
    assert len(ksplit) == 3 and all(c["x_transposed"] == [True] for c in ksplit)


def test_resolve_kernel():
    assert resolve_kernel("grouped_mm", torch.device("cpu"), torch.float64) == "loop"
    assert resolve_kernel("npu", torch.device("cpu"), torch.float64) == "loop"
    assert resolve_kernel("auto", torch.device("cpu"), torch.float64) == "loop"
    assert resolve_kernel("auto", torch.device("cpu"), torch.float32) in KERNELS
    npu = SimpleNamespace(type="npu")  # torch only knows the "npu" device type once torch_npu is loaded
    assert resolve_kernel("auto", npu, torch.bfloat16) == "npu"
    with pytest.raises(ValueError, match="expert_kernel='bogus'"):
        resolve_kernel("bogus", torch.device("cpu"), torch.float32)


def test_grouped_experts_module_errors():
    ge = GroupedExperts(8, 16, 4, expert_kernel="grouped_mm")
    with pytest.raises(ValueError, match=r"expected \[rows, dim=8\]"):
        ge(torch.randn(3, 7), torch.tensor([3, 0, 0, 0]))
    with pytest.raises(TypeError, match="bfloat16"):
        ge(torch.randn(3, 8).bfloat16(), torch.tensor([3, 0, 0, 0]))
    with pytest.raises(ValueError, match="one count per local expert"):
        ge(torch.randn(3, 8), torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="expert_kernel='ragged_dot'"):
        GroupedExperts(8, 16, 4, expert_kernel="ragged_dot")


def test_auto_rule_from_benchmark():
    """"auto" follows AUTO_TABLE (measured by benchmarks/bench_moe.py): grouped_mm on CPU for the
    dtypes it runs, loop for float64 (exact fallback) and for pairs not in the table."""
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_kernel("auto", cpu, dtype) == "grouped_mm"
    assert resolve_kernel("auto", cpu, torch.float64) == "loop"
    assert resolve_kernel("auto", SimpleNamespace(type="cuda"), torch.bfloat16) == "grouped_mm"
    assert resolve_kernel("auto", SimpleNamespace(type="cuda"), torch.float32) == "loop"
    assert resolve_kernel("auto", SimpleNamespace(type="xpu"), torch.float32) == "loop"
