"""moe_torch.moe on CPU scales, gathers and combines routed rows chunk by chunk (``_chunked_on``); the
chunked code must give the bits of the unchunked expressions (run under torch.compile and on
accelerators) for every dtype, kernel and chunk size, forward and every gradient."""

import pytest

torch = pytest.importorskip("torch")

import moe_torch.moe as moe_module  # noqa: E402
from moe_torch import MoE  # noqa: E402


def run(dtype, kernel, score_before_experts):
    torch.manual_seed(0)
    moe = MoE(dim=12, hidden_dim=8, num_experts=5, top_k=3, expert_kernel=kernel,
              score_before_experts=score_before_experts).to(dtype)
    x = torch.randn(2, 23, 12, dtype=dtype, requires_grad=True)
    y = moe(x)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(torch.randn_like(y))
    return {"out": y.detach(), "x": x.grad, **{n: p.grad for n, p in moe.named_parameters()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kernel", ["grouped_mm", "loop"])
@pytest.mark.parametrize("score_before_experts", [True, False])
@pytest.mark.parametrize("chunks", [(5, 3), (4096, 4096)])  # (rows, tokens): many chunks with a ragged last one; one
def test_chunked_dispatch_and_combine_give_the_unchunked_bits(dtype, kernel, score_before_experts, chunks,
                                                               monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(moe_module, "_chunked_on", lambda t: False)
        expected = run(dtype, kernel, score_before_experts)
    monkeypatch.setattr(moe_module, "_SCALE_CHUNK", chunks[0])
    monkeypatch.setattr(moe_module, "_COMBINE_CHUNK", chunks[1])
    calls = []
    chunked_on = moe_module._chunked_on
    monkeypatch.setattr(moe_module, "_chunked_on", lambda t: calls.append(t.shape) or chunked_on(t))
    got = run(dtype, kernel, score_before_experts)
    assert calls and all(chunked_on(torch.empty(1)) for _ in calls)  # the chunked code ran
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert value is not None and got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), f"{name}: max abs {(got[name].double() - value.double()).abs().max()}"
