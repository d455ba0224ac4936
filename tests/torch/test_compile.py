"""torch.compile of moe_torch.MoE (issue 18): compiled == eager, one graph, no recompilation per routing.

Tiny layers (D=16, H=32, E=4, k=2, 16 tokens). Dynamo is reset around every test and told to fail
rather than fall back to eager when its recompile limit is hit, so a test cannot pass by silently
running eagerly. Backends: "aot_eager" (dynamo + AOT autograd, the eager kernels: bits must be
identical), "eager" (dynamo alone) and, in one test, the default inductor (generated code: a stated
tolerance).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from moe_torch import MoE

DIM, HIDDEN, E, K = 16, 32, 4, 2

# compiled by inductor vs eager (float32, measured here: out identical, gradients <= 9.5e-7 abs)
INDUCTOR_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch.compiler.reset()


def _layer(kernel: str, dtype=torch.float32, **kw) -> MoE:
    torch.manual_seed(0)
    return MoE(DIM, HIDDEN, E, top_k=K, expert_kernel=kernel, load_balance_coeff=0.01, router_z_loss_coeff=1e-3,
               **kw).to(dtype)


def _inputs(dtype, n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, 8, DIM, generator=gen).to(dtype) for _ in range(n)]


def _step(call, module: MoE, x: torch.Tensor, train: bool, **kw) -> dict[str, torch.Tensor]:
    """One call of ``call`` (``module`` or its compiled form; ``kw``: e.g. ``selected_experts``): the output
    and aux tensors, and in training the gradients of x and of every parameter (a fixed cotangent plus
    both aux losses)."""
    if not train:
        with torch.no_grad():
            out, aux = call(x, return_aux=True, **kw)
        return {"out": out, **aux}
    xt = x.clone().requires_grad_()
    out, aux = call(xt, return_aux=True, **kw)
    cot = torch.linspace(-1, 1, out.numel()).view(out.shape)
    loss = (out.float() * cot).sum() + aux["load_balance_loss"] + aux["router_z_loss"]
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, [xt, *params.values()])
    return {"out": out.detach(), **{k: v.detach() for k, v in aux.items()},
            **{f"grad/{n}": g for n, g in zip(["x", *params], grads, strict=True)}}


def _compare(kernel: str, backend: str, fullgraph: bool, dtype=torch.float32, tol=None, modes=(True, False),
             **layer_kw):
    """Compile a copy of the layer and run both on three routings per mode; returns the counter."""
    eager = _layer(kernel, dtype, **layer_kw)
    with torch.no_grad():  # non-zero expert biases, when there are any
        for b in (getattr(eager.experts, n, None) for n in ("b1", "b2", "b3")):
            if b is not None:
                b.normal_(0.0, 0.5)
    comp = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(comp, backend=counter, fullgraph=fullgraph)
    for train in modes:
        eager.train(train)
        comp.train(train)
        seen = []
        for x in _inputs(dtype):
            got, want = _step(compiled, comp, x, train), _step(eager, eager, x, train)
            assert got.keys() == want.keys()
            for key in want:
                assert torch.isfinite(want[key].float()).all(), key
                if tol is None:
                    assert torch.equal(got[key], want[key]), (key, (got[key] - want[key]).abs().max())
                else:
                    torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
            seen.append(want["tokens_per_expert"].tolist())
        assert len({tuple(c) for c in seen}) == 3, f"the three inputs should route differently: {seen}"
    assert torch.equal(comp.tokens_per_expert, eager.tokens_per_expert)  # training forwards count alike
    # one graph per mode (grad on / off), none more for a new routing, no graph break
    assert counter.frame_count == len(modes), counter.frame_count
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    return counter


# ------------------------------------------------------------------------------------------ ops
def test_custom_ops_pass_opcheck():
    """Schema, fake kernel and autograd registration of the custom ops (torch.library.opcheck; its
    AOT-dispatch check, ~40 s here, is left to the compiled-layer tests, which run AOT autograd)."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.manual_seed(0)
    a, b = torch.randn(12, DIM), torch.randn(E, DIM, HIDDEN)
    offs = torch.tensor([2, 5, 5, 8], dtype=torch.int32)
    gmm = torch.ops.moe_torch.grouped_mm.default
    torch.library.opcheck(gmm, (a, b, offs), test_utils=checks)
    torch.library.opcheck(gmm, (a.t().contiguous(), torch.randn(12, HIDDEN), offs), test_utils=checks)
    w1, w3 = (torch.randn(E, HIDDEN, DIM, requires_grad=True) for _ in range(2))
    w2 = torch.randn(E, DIM, HIDDEN, requires_grad=True)
    x = torch.randn(14, DIM, requires_grad=True)
    counts = torch.tensor([3, 4, 0, 5])  # 2 padding rows
    torch.library.opcheck(torch.ops.moe_torch.expert_mlp.default,
                          ("loop", x, w1, w2, w3, counts, None, None, None, "{}"), test_utils=checks)


def test_expert_mlp_gradient_is_eager_autograd_bit_for_bit():
    """The opaque op's backward re-runs the eager kernel under autograd: the same bits as eager."""
    from moe_torch import custom_ops, kernels

    torch.manual_seed(0)
    w1, w3 = (torch.randn(E, HIDDEN, DIM, requires_grad=True) for _ in range(2))
    w2 = torch.randn(E, DIM, HIDDEN, requires_grad=True)
    x = torch.randn(14, DIM, requires_grad=True)
    counts = torch.tensor([3, 4, 0, 5])
    y = custom_ops.opaque_kernel("loop")(w1, w2, w3, x, counts)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w1, w2, w3], dy)
    want_y = kernels.loop_experts(w1, w2, w3, x, counts)
    want = torch.autograd.grad(want_y, [x, w1, w2, w3], dy)
    assert torch.equal(y, want_y)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert not y[12:].any() and not got[0][12:].any()  # padding rows: zero output, zero gradient


# ------------------------------------------------------------------------------------ the layer
@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm", "npu"])
def test_compiled_layer_fullgraph_equals_eager(kernel, request):
    """fullgraph=True, dynamo + AOT autograd: training (forward + backward) and eval, bit-identical."""
    if kernel == "npu":
        request.getfixturevalue("fake_npu")
    _compare(kernel, "aot_eager", fullgraph=True)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm", "npu"])
def test_compiled_layer_default_mode_equals_eager(kernel, request):
    """fullgraph=False (torch.compile's default): no graph break either, bit-identical."""
    if kernel == "npu":
        request.getfixturevalue("fake_npu")
    _compare(kernel, "eager", fullgraph=False)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_compiled_gpt_oss_experts_equal_eager(kernel):
    """Expert biases and the clamped SwiGLU (GPT-OSS): the kernel runs as the opaque op under compile."""
    _compare(kernel, "aot_eager", fullgraph=True, modes=(True,), expert_proj_bias=True,
             expert_activation="clamped_swiglu")


@pytest.mark.slow
def test_bf16_compiled_layer_equals_eager():
    _compare("auto", "aot_eager", fullgraph=True, dtype=torch.bfloat16, modes=(True,))


@pytest.mark.slow
def test_three_routings_compile_once():
    """The routing counts are data: three inputs routed differently, one compiled graph, no recompile."""
    eager = _layer("auto")
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(copy.deepcopy(eager).eval(), backend=counter, fullgraph=True)
    eager.eval()
    routings = set()
    for x in _inputs(torch.float32):
        with torch.no_grad():
            out, aux = compiled(x, return_aux=True)
            want = eager(x)
        assert torch.equal(out, want)
        routings.add(tuple(aux["tokens_per_expert"].tolist()))
    assert len(routings) == 3
    assert counter.frame_count == 1
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.slow
def test_inductor_compiled_layer_matches_eager():
    """The default backend (inductor), fullgraph, training: within INDUCTOR_TOL of eager."""
    _compare("auto", "inductor", fullgraph=True, tol=INDUCTOR_TOL[torch.float32], modes=(True,))


# ------------------------------------------------------------------ capacity and locked routing
# C = 6 rows per expert for 16 tokens x k=2 over E=4 experts: every test input drops 8-10 of its 32 slots
CAPACITY = dict(capacity_factor=0.75)


def _drops_some(kernel: str, **layer_kw) -> None:
    with torch.no_grad():
        kept = [_layer(kernel, **layer_kw)(x, return_aux=True)[1]["kept_slots"] for x in _inputs(torch.float32)]
    assert all(not k.all() and k.any() for k in kept), "the capacity should drop some slots and keep others"


@pytest.mark.slow
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm", "npu"])
def test_compiled_capacity_layer_fullgraph_equals_eager(kernel, pad, request):
    """Token dropping compiles in one graph per mode (no host read of the kept rows): training and
    eval, three routings, no graph break, no recompile, bit-identical with the eager kernels."""
    if kernel == "npu":
        request.getfixturevalue("fake_npu")
    _drops_some(kernel, **CAPACITY, capacity_pad=pad)
    _compare(kernel, "aot_eager", fullgraph=True, **CAPACITY, capacity_pad=pad)


@pytest.mark.slow
def test_inductor_compiled_capacity_layer_matches_eager():
    """Token dropping under the default backend (inductor), fullgraph, training: within INDUCTOR_TOL."""
    _compare("auto", "inductor", fullgraph=True, tol=INDUCTOR_TOL[torch.float32], modes=(True,), **CAPACITY)


@pytest.mark.slow
def test_capacity_pad_overfull_kept_slots_raise_under_compile():
    """A locked ``kept_slots`` with more than G*C rows of one expert still fails when compiled (a
    run-time assert in place of the eager host read)."""
    layer = _layer("loop", **CAPACITY, capacity_pad=True).eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = _inputs(torch.float32, 1)[0]
    sel = torch.zeros(16, K, dtype=torch.int64)
    sel[:, 1] = 1  # every token on experts 0 and 1: 16 rows each, C = 6
    with torch.no_grad():
        with pytest.raises(ValueError, match="more than its 6 padded rows"):
            layer(x, selected_experts=sel, kept_slots=torch.ones(16, K, dtype=torch.bool))
        with pytest.raises(RuntimeError, match="more kept rows than its 6 padded rows"):
            compiled(x, selected_experts=sel, kept_slots=torch.ones(16, K, dtype=torch.bool))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.slow
def test_locked_routing_compiles_fullgraph():
    """``selected_experts=`` (locked routing) under fullgraph: three locked routings, one graph, no
    break, eager bits (training); an out-of-range index still raises, at run time."""
    eager = _layer("auto")
    comp = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(comp, backend=counter, fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    seen = set()
    for x in _inputs(torch.float32):
        sel = torch.randint(0, E, (16, K), generator=gen)
        got, want = _step(compiled, comp, x, True, selected_experts=sel), _step(eager, eager, x, True,
                                                                                 selected_experts=sel)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (key, (got[key] - want[key]).abs().max())
        assert torch.equal(got["selected_experts"], sel)
        seen.add(tuple(want["tokens_per_expert"].tolist()))
    assert len(seen) == 3, seen
    assert counter.frame_count == 1, counter.frame_count
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    bad = torch.randint(0, E, (16, K), generator=gen)
    for value in (E, -1):
        bad[3, 1] = value
        with pytest.raises(RuntimeError, match=rf"selected_experts holds values outside \[0, {E - 1}\]"):
            compiled(_inputs(torch.float32, 1)[0], selected_experts=bad)
    with pytest.raises(ValueError, match=rf"holds values in \[0, {E}\]"):  # eager: unchanged message
        bad[3, 1] = E
        eager(_inputs(torch.float32, 1)[0], selected_experts=bad)


# ---------------------------------------------------------------------------------- sharded
@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_layer_compiles_without_fullgraph():
    """moe_torch.parallel (ep=2, gloo): torch.compile(fullgraph=False) runs, equals eager bit for bit.

    Its graph breaks are the host syncs of the token exchange (``.tolist()`` of the split sizes and
    the all_to_all calls with Python split lists in ``moe_torch.parallel._dispatch`` / ``_combine``).
    """
    from parity.mesh_job import STALL_TIMEOUT_S
    from parity.mesh_torch import spawn

    with tempfile.TemporaryDirectory(prefix="moe_test_compile_") as tmp:
        spawn("tests.torch.compile_workers:compiled_expert_parallel", 2, tmp, "aot_eager", timeout_s=STALL_TIMEOUT_S)
        ranks = []
        for r in range(2):
            with open(os.path.join(tmp, f"compile.rank{r}.json")) as f:
                ranks.append(json.load(f))
    for res in ranks:
        assert res["max_diff"] and all(v == 0.0 for v in res["max_diff"].values()), res["max_diff"]
        assert res["frames"] >= 1
        assert len({tuple(c) for c in res["counts"]}) == 3  # three routings
