"""Benchmark the MoE kernels of moe_torch and moe_jax against the dense limit and against peers.

Usage::

    python benchmarks/bench_moe.py [--config small,medium|dsv3] [--backend torch|jax|all]
        [--dtype float32,bfloat16] [--json out.json] [--quick] [--full] [--sizes D,H,E,k,N]
        [--rounds R] [--device cpu|cuda] [--no-peers]

What is measured, per config and dtype, on one device, in one process:

* ``limit``: a dense SwiGLU on the same ``rows = N*k`` routed rows with one (D, H) weight set, i.e. the
  three matmuls ``[rows, D] x [D, H]`` (W1, W3) and ``[rows, H] x [H, D]`` (W2) with the same elementwise
  work as every expert kernel: the same FLOPs without the grouping. Forward, and forward+backward
  (gradients of the input and the weights, a random cotangent).
* ``experts/<kernel>``: ``GroupedExperts`` alone on pre-sorted rows, with counts from a realistic
  random routing (the layer's own router, softmax top-k, on random tokens), every kernel of the backend.
* ``layer/<kernel>``: the whole ``MoE`` layer (router, dispatch, experts, combine) on ``(1, N, D)``.
* peers, same weights and input: transformers' Mixtral / Qwen3-MoE / DeepSeek-V3 blocks (each
  ``_experts_implementation``), torchtitan's MoE; each is compared with ``layer/auto`` built with the
  peer's own routing semantics (``parity.hf.moe_config_from_hf``), so both sides do the same work.

Timing: after one warm-up run each (which also compiles the JAX functions and measures memory),
every round times each candidate right after the limit; a ratio is the median over rounds of
``t(candidate) / t(limit just before it)``, so load from other jobs on a shared machine, which
drifts over minutes, cancels out. ``GFLOP/s`` uses the min time and the expert FLOPs (``6 * rows * D * H`` forward, 3x
that for forward+backward; the router's ``2 * N * D * E`` is left out).
NOTE (CPU): glibc hands every tensor above 32 MiB back to the OS when it is freed, so each call
page-faults its outputs in again (medium config: ~3M page faults and ~5 s of system time in 14
calls); that cost is in every timing, as in a user's own run. Keeping freed memory instead
(``mallopt``: no mmap, no trim) cut it to 0.7M and steadied the ratios, but fragmented the heap
until a 3-round run with peers was killed at 24 GiB, so the allocator is left as it is.

Memory of forward+backward: torch counts the bytes of the tensors saved for backward
(``torch.autograd.graph.saved_tensors_hooks``; unique storages, parameters excluded; on CUDA the note
adds the peak of ``torch.cuda.max_memory_allocated`` above the start, gradients included); JAX reports
``jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``. ``mem x`` divides by the
activations the "loop" kernel keeps: ``rows * (D + 4H)`` elements (x, h1, silu(h1), h3, h), which
is what ``experts/loop`` measures.

The "auto" rows are the kernel that "auto" resolves to on this device and dtype (the same function,
so it is not timed twice); ``--full`` also times the layer for every kernel, ragged_dot on CPU at
sizes where it does E times the work, the exact JAX ``dense`` kernel past toy sizes, and every
transformers implementation (by default eager and grouped_mm; grouped_mm only for Qwen3-MoE, whose
experts are Mixtral's code). The log gives each group's wall time; the verdict lines say, per device
and dtype, whether "auto" was the fastest kernel measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from parity.config import MoEConfig  # noqa: E402 (after the path fix, for a checkout without install)

# D, H, E, k, N. dsv3: DeepSeek-V3's expert shape with a one-device share of its 256 experts.
CONFIGS: dict[str, dict[str, int]] = {
    "small": dict(dim=256, hidden_dim=512, num_experts=8, top_k=2, tokens=4096),
    "medium": dict(dim=1024, hidden_dim=512, num_experts=64, top_k=8, tokens=8192),
    "dsv3": dict(dim=7168, hidden_dim=2048, num_experts=32, top_k=8, tokens=8192),
}
# Targets of issue 7 (CPU, medium, float32): ratios to the limit, and memory to the loop's activations.
TARGETS = {"torch_fwd": 1.3, "torch_fwdbwd": 1.5, "jax_fwdbwd": 2.0, "mem": 1.5,
           "torch_compiled_fwdbwd": 1.2}  # issue 18: the whole layer under torch.compile
H200_BF16_PEAK = 790e12  # dense bf16 FLOP/s (without sparsity), for the GPU report


@dataclass
class Result:
    """One row of the table (times in seconds; ratios to the limit of the same backend and run)."""

    config: str
    dtype: str
    backend: str
    device: str
    name: str
    kind: str  # limit | experts | layer | peer
    flops_fwd: float
    fwd_s: float | None = None
    fwdbwd_s: float | None = None
    fwd_ratio: float | None = None
    fwdbwd_ratio: float | None = None
    fwd_flops_per_s: float | None = None
    fwdbwd_flops_per_s: float | None = None
    mem_bytes: int | None = None
    mem_ratio: float | None = None
    versus: str | None = None  # for peers: the moe_torch row doing the same work
    note: str = ""
    skipped: str | None = None
    rounds: int = 0
    raw: dict[str, list[float]] = field(default_factory=dict)


def loop_activation_bytes(rows: int, dim: int, hidden: int, itemsize: int) -> int:
    """Bytes of the activations autograd keeps for the "loop" kernel: x, h1, silu(h1), h3, h."""
    return rows * (dim + 4 * hidden) * itemsize


# ==================================================================================== timing core
class Candidate:
    """Something to time: ``fwd()`` and ``fwdbwd()`` callables (each blocks until done)."""

    def __init__(self, result: Result, fwd, fwdbwd, memory=None, rounds: int | None = None, warm: bool = True):
        self.result, self.fwd, self.fwdbwd, self.memory, self.max_rounds = result, fwd, fwdbwd, memory, rounds
        self.warm = warm  # False: ``memory()`` already ran a forward+backward (torch CPU) or compiled both (JAX)
        self.times: dict[str, list[float]] = {"fwd": [], "fwdbwd": []}
        self.ratios: dict[str, list[float]] = {"fwd": [], "fwdbwd": []}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_interleaved(cands: list[Candidate], limit: Candidate, rounds: int, log) -> None:
    """Warm up (and measure memory) once each, then ``rounds`` rounds in which every candidate runs
    right after the limit (fwd, then fwd+bwd): each ratio compares two adjacent timings, so a change
    of load on a shared machine during the run does not bias it.

    torch CPU: the memory pass is a forward+backward and serves as that warm-up (the forward runs the
    same ops; measured: the no_grad forwards after it took 0.98-0.99 s, the first one included);
    JAX limit and kernels: the memory pass compiles both functions ahead of time, no warm-up call;
    the JAX layer (``nnx.jit``) and CUDA: one call of each function after compiling.
    """
    for c in cands:
        if c.result.skipped is not None:
            continue
        try:
            if c.memory is not None:
                c.result.mem_bytes = c.memory()
            if c.warm:  # else the memory pass (a forward+backward) was the warm-up
                c.fwd()
                c.fwdbwd()
        except Exception as exc:  # a peer or kernel that cannot run here is reported, not fatal
            c.result.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(f"  skipped {c.result.name}: {c.result.skipped}")
    live = [c for c in cands if c.result.skipped is None and c is not limit]
    for r in range(rounds):
        for c in live:
            if c.max_rounds is not None and r >= c.max_rounds:
                continue
            for mode in ("fwd", "fwdbwd"):
                t_limit = _time(getattr(limit, mode))
                t = _time(getattr(c, mode))
                limit.times[mode].append(t_limit)
                c.times[mode].append(t)
                c.ratios[mode].append(t / t_limit)
        log(f"  round {r + 1}/{rounds} done")
    for c in [limit, *live]:
        c.result.raw = c.times
        c.result.rounds = len(c.times["fwd"])


def summarise(cands: list[Candidate], limit: Candidate, loop_bytes: int) -> None:
    """Fill ratios (median of the paired ratios), FLOP/s (min time) and the memory ratio."""
    for c in cands:
        res = c.result
        if res.skipped is not None:
            continue
        for mode, mult in (("fwd", 1), ("fwdbwd", 3)):
            ts = c.times[mode]
            if not ts:
                continue
            setattr(res, f"{mode}_s", min(ts))
            setattr(res, f"{mode}_ratio", 1.0 if c is limit else statistics.median(c.ratios[mode]))
            setattr(res, f"{mode}_flops_per_s", mult * res.flops_fwd / min(ts))
        if res.mem_bytes is not None and res.kind != "limit":
            res.mem_ratio = res.mem_bytes / loop_bytes


# ==================================================================================== routing data
def routed_counts(cfg: MoEConfig, tokens: int, seed: int = 0) -> np.ndarray:
    """Rows per expert from a softmax top-k router with canonical init on random tokens (NumPy)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, cfg.dim), dtype=np.float32)
    gate = rng.standard_normal((cfg.num_experts, cfg.dim), dtype=np.float32) * cfg.dim ** -0.5
    logits = x @ gate.T
    top = np.argpartition(-logits, cfg.top_k - 1, axis=-1)[:, : cfg.top_k]
    return np.bincount(top.reshape(-1), minlength=cfg.num_experts).astype(np.int64)


# ==================================================================================== torch
def torch_candidates(name: str, cfg: MoEConfig, tokens: int, dtype_name: str, device: str, opts) -> tuple:
    import torch
    import torch.nn.functional as F

    from moe_torch import GroupedExperts, MoE
    from moe_torch.kernels import KERNELS, resolve_kernel

    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    d, h, e, k = cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k
    rows = tokens * k
    flops = 6.0 * rows * d * h
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dtype)

    base = dict(config=name, dtype=dtype_name, backend="torch", device=device, flops_fwd=flops)
    cands: list[Candidate] = []
    param_ptrs: set[int] = set()
    peaks: list[int] = []  # CUDA only: peak bytes of the last memory pass

    def saved_bytes(run) -> int:
        """Bytes of unique storages saved for backward during ``run()`` (parameters excluded), on any
        device; on CUDA the peak allocation above the start (gradients included) goes to ``peaks``."""
        if cuda:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        seen: dict[int, int] = {}

        def pack(t):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in param_ptrs:
                    seen[ptr] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(backward=True)
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        return sum(seen.values())

    def make(result: Result, step, params, rounds=None) -> Candidate:
        """``step(backward)`` runs forward (no_grad) or forward+backward; grads are dropped each time."""

        def fwd():
            with torch.no_grad():
                step(False)
            sync()

        def fwdbwd():
            for p in params:
                p.grad = None
            step(True)
            sync()

        def mem():
            for p in params:
                p.grad = None
            saved = saved_bytes(lambda backward: step(backward))
            if peaks:
                result.note = (result.note + f" peak {peaks.pop() / 2 ** 30:.2f} GiB").strip()
            return saved

        return Candidate(result, fwd, fwdbwd, mem, rounds, warm=cuda)

    # ---- limit: dense SwiGLU with the same FLOPs
    x_rows = rand(rows, d)
    gy = rand(rows, d)
    w1 = rand(d, h, scale=d ** -0.5).requires_grad_()
    w3 = rand(d, h, scale=d ** -0.5).requires_grad_()
    w2 = rand(h, d, scale=h ** -0.5).requires_grad_()
    param_ptrs.update(p.untyped_storage().data_ptr() for p in (w1, w2, w3))

    def dense_step(backward, keep_graph_only=False):
        xx = x_rows.detach().requires_grad_(backward or keep_graph_only)
        y = (F.silu(xx @ w1) * (xx @ w3)) @ w2
        if backward:
            y.backward(gy)
        return y

    limit = make(Result(**base, name="limit (dense SwiGLU)", kind="limit"), dense_step, [w1, w2, w3])
    cands.append(limit)

    # ---- experts alone, every kernel
    counts_np = routed_counts(cfg, tokens)
    counts = torch.from_numpy(counts_np).to(dev)
    auto = resolve_kernel("auto", dev, dtype)
    kernels = [kn for kn in KERNELS if kn != "npu" or dev.type == "npu"]
    experts_mods = {}
    for kn in kernels:
        with torch.device(dev):
            ge = GroupedExperts(d, h, e, expert_kernel=kn).to(dtype=dtype)
        experts_mods[kn] = ge
        param_ptrs.update(p.untyped_storage().data_ptr() for p in ge.parameters())

        def exp_step(backward, keep_graph_only=False, ge=ge):
            xx = x_rows.detach().requires_grad_(backward or keep_graph_only)
            y = ge(xx, counts)
            if backward:
                y.backward(gy)
            return y

        note = "= auto" if kn == auto else ""
        # NOTE: loop's backward costs ~4x grouped_mm's on CPU (3*E full-size weight-slice gradients);
        # one timed round keeps the default run short, --full times it every round.
        rounds = None if (opts.full or kn != "loop" or cuda) else 1
        cands.append(make(Result(**base, name=f"experts/{kn}", kind="experts", note=note), exp_step,
                          [xx for xx in ge.parameters()], rounds))

    # ---- whole layer
    x_tok = rand(1, tokens, d)
    gy_tok = rand(1, tokens, d)
    layer_kernels = kernels if opts.full else ["auto"]
    for kn in layer_kernels:
        with torch.device(dev):
            moe = MoE(dim=d, hidden_dim=h, num_experts=e, top_k=k, expert_kernel=kn).to(dtype=dtype)
        param_ptrs.update(p.untyped_storage().data_ptr() for p in moe.parameters())

        def layer_step(backward, keep_graph_only=False, moe=moe):
            xx = x_tok.detach().requires_grad_(backward or keep_graph_only)
            y = moe(xx)
            if backward:
                y.backward(gy_tok)
            return y

        label = f"layer/{kn}" + (f" ({auto})" if kn == "auto" else "")
        cands.append(make(Result(**base, name=label, kind="layer"), layer_step, list(moe.parameters())))
        if opts.compile and kn == "auto":
            cands.append(compiled_layer(moe, auto, base, x_tok, gy_tok, make))

    # ---- peers: transformers blocks and torchtitan's MoE, each against our layer with its semantics
    # NOTE: peers at the medium size (3 transformers/torchtitan layers x 2 dtypes) take minutes on 2 CPU
    # cores: the default run times them at the small size and at medium only with --peers.
    if not opts.no_peers and (opts.peers or name != "medium" or cuda):
        cands += torch_peers(cfg, tokens, dtype, dev, base, x_tok, gy_tok, make, param_ptrs, opts)
    loop_bytes = loop_activation_bytes(rows, d, h, torch.tensor([], dtype=dtype).element_size())
    return cands, limit, loop_bytes


def compiled_layer(moe, auto: str, base: dict, x_tok, gy_tok, make) -> Candidate:
    """``layer/auto+compile``: a copy of the eager ``layer/auto`` (same weights, so the same routing)
    under ``torch.compile(fullgraph=True, dynamic=False)``, default inductor backend (issue 18).

    The warm-up calls compile (no_grad forward, then forward+backward: two graphs); their wall
    times are the compile times in the note. Memory is not measured (saved-tensor hooks and a
    compiled graph do not mix), so ``mem_bytes`` stays None.
    """
    import copy

    import torch

    layer = copy.deepcopy(moe)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)

    def step(backward, keep_graph_only=False):
        xx = x_tok.detach().requires_grad_(backward or keep_graph_only)
        y = compiled(xx)
        if backward:
            y.backward(gy_tok)
        return y

    res = Result(**base, name=f"layer/auto+compile ({auto})", kind="layer",
                 note="torch.compile fullgraph, inductor")
    cand = make(res, step, list(layer.parameters()))
    cand.memory, cand.warm = None, True
    for mode, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
        cand.__dict__[mode] = _first_call_timed(getattr(cand, mode), res, label)
    return cand


def _first_call_timed(fn, res: Result, label: str):
    """``fn``, noting the wall time of its first call (the compilation) in ``res.note``."""
    first = [True]

    def run():
        if not first[0]:
            return fn()
        first[0] = False
        t0 = time.perf_counter()
        out = fn()
        res.note += f"; compile+first {label} call {time.perf_counter() - t0:.0f} s"
        return out

    return run


HF_FAMILIES = {
    # model_type: (config class, module, block class, config kwargs for D, H, E, k)
    "mixtral": ("MixtralConfig", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
                lambda d, h, e, k: dict(hidden_size=d, intermediate_size=h, num_local_experts=e,
                                        num_experts_per_tok=k)),
    "qwen3_moe": ("Qwen3MoeConfig", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock",
                  lambda d, h, e, k: dict(hidden_size=d, moe_intermediate_size=h, num_experts=e,
                                          num_experts_per_tok=k, norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", "transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE",
                    lambda d, h, e, k: dict(hidden_size=d, moe_intermediate_size=h, n_routed_experts=e,
                                            num_experts_per_tok=k, n_group=1, topk_group=1, n_shared_experts=1,
                                            first_k_dense_replace=0)),
}


def torch_peers(cfg, tokens, dtype, dev, base, x_tok, gy_tok, make, param_ptrs, opts) -> list[Candidate]:
    import torch

    from moe_torch import MoE
    from parity.hf import moe_config_from_hf

    d, h, e, k = cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k
    out: list[Candidate] = []

    def ours_for(pcfg: MoEConfig, label):
        """Our layer with the peer's semantics, initialised on the device; returns (candidate, weights)."""
        with torch.device(dev):
            moe = MoE(**pcfg.replace(expert_kernel="auto").to_kwargs())
        weights = {n: t.detach().clone() for n, t in moe.state_dict().items()}
        moe.to(dtype)
        param_ptrs.update(p.untyped_storage().data_ptr() for p in moe.parameters())

        def step(backward, keep_graph_only=False):
            xx = x_tok.detach().requires_grad_(backward or keep_graph_only)
            y = moe(xx)
            if backward:
                y.backward(gy_tok)
            return y

        cand = make(Result(**base, name=f"layer/auto ({label} semantics)", kind="layer"), step,
                    list(moe.parameters()))
        return cand, weights

    def peer(name, module, versus, note=""):
        param_ptrs.update(p.untyped_storage().data_ptr() for p in module.parameters())

        def step(backward, keep_graph_only=False):
            xx = x_tok.detach().requires_grad_(backward or keep_graph_only)
            y = module(xx)
            y = y[0] if isinstance(y, tuple) else y
            if backward:
                y.backward(gy_tok)
            return y

        return make(Result(**base, name=name, kind="peer", versus=versus, note=note), step,
                    list(module.parameters()))

    # transformers
    if importlib.util.find_spec("transformers") is None:
        out.append(Candidate(Result(**base, name="transformers", kind="peer", skipped="not installed"),
                             None, None))
    else:
        import transformers

        families = list(HF_FAMILIES)
        for fam in families:
            # transformers 5: Qwen3-MoE's experts are Mixtral's code (other config names): grouped_mm only, unless --full
            impls = (["eager", "grouped_mm", "batched_mm"] if opts.full
                     else ["grouped_mm"] if fam == "qwen3_moe" else ["eager", "grouped_mm"])
            cls_name, mod_name, block_name, kw = HF_FAMILIES[fam]
            try:
                hf_cfg = getattr(transformers, cls_name)(**kw(d, h, e, k))
                pcfg = moe_config_from_hf(hf_cfg.to_dict() | {"model_type": fam})
                ours, weights = ours_for(pcfg, fam)
                out.append(ours)
                block_cls = getattr(importlib.import_module(mod_name), block_name)
            except Exception as exc:
                out.append(Candidate(Result(**base, name=f"transformers {fam}", kind="peer",
                                            skipped=f"{type(exc).__name__}: {exc}"), None, None))
                continue
            for impl in impls:
                hf_cfg._experts_implementation = impl
                try:
                    with torch.device(dev):
                        block = block_cls(hf_cfg)
                    block.load_state_dict(hf_state(fam, weights), strict=True)
                    for child_name, child in block.named_children():
                        if not (fam == "deepseek_v3" and child_name == "gate"):  # fp32 router, as transformers
                            child.to(device=dev, dtype=dtype)
                        else:
                            child.to(device=dev)
                    block.train()
                    name = f"hf {fam} ({impl})"
                    out.append(peer(name, block, ours.result.name, f"transformers {transformers.__version__}"))
                except Exception as exc:
                    out.append(Candidate(Result(**base, name=f"hf {fam} ({impl})", kind="peer",
                                                skipped=f"{type(exc).__name__}: {exc}"), None, None))
    # torchtitan
    # torchtitan multiplies the expert output by the score (score_before_experts=False), softmax, no norm
    pcfg = MoEConfig(dim=d, hidden_dim=h, num_experts=e, top_k=k, score_func="softmax", route_norm=False,
                     score_before_experts=False)
    tt = torchtitan_moe(pcfg, dtype, dev, None)
    if isinstance(tt, str):
        out.append(Candidate(Result(**base, name="torchtitan MoE", kind="peer", skipped=tt), None, None))
    else:
        ours, weights = ours_for(pcfg, "torchtitan")
        module, version = torchtitan_moe(pcfg, dtype, dev, weights)
        out.append(ours)
        note = f"torchtitan {version}; computes experts in bf16 always"
        out.append(peer("torchtitan MoE", module, ours.result.name, note))
    return out


def hf_state(fam: str, t: dict) -> dict:
    """Canonical weights (torch tensors) -> the state_dict of a transformers 5 MoE block (as
    parity.hf.hf_block does it)."""
    import torch

    state = {"gate.weight": t["router.gate.weight"],
             "experts.gate_up_proj": torch.cat([t["experts.w1"], t["experts.w3"]], dim=1),
             "experts.down_proj": t["experts.w2"]}
    if fam == "deepseek_v3":
        state["gate.e_score_correction_bias"] = t["expert_bias"]
        for proj, canon in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            state[f"shared_experts.{proj}.weight"] = t[f"shared_expert.{canon}.weight"]
    return state


def torchtitan_moe(cfg: MoEConfig, dtype, dev, weights):
    """torchtitan's MoE (``torchtitan.models.common.moe``) loaded with canonical ``weights`` (torch
    tensors; None: only check that it imports), as (module, version), or a string saying why not."""
    try:
        import torchtitan
        from torchtitan.models.common import moe as tt
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    except Exception as exc:
        return f"cannot import torchtitan.models.common.moe: {type(exc).__name__}: {exc}"
    if weights is None:
        return None, None
    d, h, e, k = cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k
    try:
        config = tt.MoE.Config(
            num_experts=e,
            routed_experts=tt.RoutedExperts.Config(
                inner_experts=tt.GroupedExperts.Config(dim=d, hidden_dim=h, num_experts=e),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k)),
            router=tt.TokenChoiceTopKRouter.Config(num_experts=e, top_k=k, score_func="softmax", route_norm=False,
                                                   gate=Linear.Config(in_features=d, out_features=e, bias=False)),
            load_balance_coeff=None)
        module = config.build()
        state = {"routed_experts.inner_experts.w1_EFD": weights["experts.w1"],
                 "routed_experts.inner_experts.w2_EDF": weights["experts.w2"],
                 "routed_experts.inner_experts.w3_EFD": weights["experts.w3"],
                 "router.gate.weight": weights["router.gate.weight"]}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if [m for m in missing if "tokens_per_expert" not in m] or unexpected:
            return f"torchtitan MoE state mismatch: missing {missing}, unexpected {unexpected}"
        module.to(device=dev, dtype=dtype)
        module.train()
        return module, getattr(torchtitan, "__version__", "?")
    except Exception as exc:
        return f"torchtitan MoE could not be built: {type(exc).__name__}: {exc}"


# ==================================================================================== jax
def jax_candidates(name: str, cfg: MoEConfig, tokens: int, dtype_name: str, opts) -> tuple:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import moe_jax
    from moe_jax.kernels import KERNELS, resolve_kernel

    dtype = jnp.dtype(dtype_name)
    platform_name = jax.default_backend()
    device = f"{platform_name}"
    d, h, e, k = cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k
    rows = tokens * k
    flops = 6.0 * rows * d * h
    base = dict(config=name, dtype=dtype_name, backend="jax", device=device, flops_fwd=flops)
    key = jax.random.PRNGKey(0)
    ks = jax.random.split(key, 8)
    x_rows = jax.random.normal(ks[0], (rows, d), jnp.float32).astype(dtype)
    gy = jax.random.normal(ks[1], (rows, d), jnp.float32).astype(dtype)
    cands: list[Candidate] = []

    def block(tree):
        jax.block_until_ready(tree)

    def make_fn(result, f, args, rounds=None):
        """f(*args) -> y; fwd = jit(f), fwd+bwd = jit(vjp of f with cotangent w.r.t. every arg)."""
        fwd_j = jax.jit(f)
        out_shape = jax.eval_shape(f, *args)
        cot = gy if out_shape.shape == gy.shape else jax.random.normal(ks[2], out_shape.shape,
                                                                       jnp.float32).astype(dtype)

        def fb(*a):
            y, vjp = jax.vjp(f, *a)
            return y, vjp(cot)

        fb_j = jax.jit(fb)
        # NOTE: compiled ahead of time, once, for the memory analysis and the timing (jit would compile
        # again); a compiled executable has no first-call cost (measured: 3.76 / 3.78 / 3.75 s for its
        # first three runs), so these candidates need no warm-up call.
        compiled: dict[str, Any] = {}

        def run(kind):
            if kind not in compiled:
                compiled[kind] = (fwd_j if kind == "fwd" else fb_j).lower(*args).compile()
            block(compiled[kind](*args))

        def mem():
            compiled["fwd"] = fwd_j.lower(*args).compile()
            compiled["fb"] = fb_j.lower(*args).compile()
            ma = compiled["fb"].memory_analysis()
            return None if ma is None else int(ma.temp_size_in_bytes)

        return Candidate(result, lambda: run("fwd"), lambda: run("fb"), mem, rounds, warm=False)

    # ---- limit
    w1 = jax.random.normal(ks[3], (d, h), jnp.float32).astype(dtype) * d ** -0.5
    w3 = jax.random.normal(ks[4], (d, h), jnp.float32).astype(dtype) * d ** -0.5
    w2 = jax.random.normal(ks[5], (h, d), jnp.float32).astype(dtype) * h ** -0.5

    def dense(x, w1, w2, w3):
        return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2

    limit = make_fn(Result(**base, name="limit (dense SwiGLU)", kind="limit"), dense, (x_rows, w1, w2, w3))
    cands.append(limit)

    # ---- experts alone
    counts = jnp.asarray(routed_counts(cfg, tokens), jnp.int32)
    auto = resolve_kernel("auto", platform_name, dtype)
    W1 = jax.random.normal(ks[6], (e, d, h), jnp.float32).astype(dtype) * d ** -0.5
    W3 = jax.random.normal(ks[7], (e, d, h), jnp.float32).astype(dtype) * d ** -0.5
    W2 = jax.random.normal(ks[2], (e, h, d), jnp.float32).astype(dtype) * h ** -0.5
    # ragged_dot and dense lower to E times the work on CPU: skipped past these rows * E unless --full
    heavy = platform_name == "cpu" and rows * e > 2 ** 17
    for kn, fn in KERNELS.items():
        res = Result(**base, name=f"experts/{kn}", kind="experts", note="= auto" if kn == auto else "")
        if kn == "dense" and (e * rows * max(d, h) * dtype.itemsize > 2 ** 31 or (rows * e > 2 ** 14 and not opts.full)):
            res.skipped = ("dense (the exact reference path) computes every expert on every row (E x the work "
                           "and memory): toy sizes, or --full")
            cands.append(Candidate(res, None, None))
            continue
        if kn == "ragged_dot" and heavy and not opts.full:
            res.skipped = (f"ragged_dot on {platform_name} lowers to dense work over all {e} experts; "
                           f"--full to time it")
            cands.append(Candidate(res, None, None))
            continue

        def f(x, a, b, c, fn=fn):
            return fn(a, b, c, x, counts)

        cands.append(make_fn(res, f, (x_rows, W1, W2, W3)))

    # ---- layer under nnx.jit
    x_tok = jax.random.normal(ks[0], (1, tokens, d), jnp.float32).astype(dtype)
    gy_tok = jax.random.normal(ks[1], (1, tokens, d), jnp.float32).astype(dtype)
    layer_kernels = [kn for kn in ("auto", *KERNELS) if opts.full and kn != "dense"] or ["auto"]
    for kn in layer_kernels:
        moe = moe_jax.MoE(dim=d, hidden_dim=h, num_experts=e, top_k=k, expert_kernel=kn,
                          rngs=nnx.Rngs(0), param_dtype=dtype)
        moe.eval()

        @nnx.jit
        def layer_fwd(m, x):
            return m(x)

        @nnx.jit
        def layer_fb(m, x):
            def loss(m, x):
                return jnp.vdot(m(x).astype(jnp.float32), gy_tok.astype(jnp.float32))

            return nnx.grad(loss, argnums=(0, 1))(m, x)

        def mem(m=moe, layer_fb=layer_fb):
            graphdef, state = nnx.split(m)

            def pure(state, x):
                mm = nnx.merge(graphdef, state)

                def loss(mm, x):
                    return jnp.vdot(mm(x).astype(jnp.float32), gy_tok.astype(jnp.float32))

                return nnx.grad(loss, argnums=(0, 1))(mm, x)

            ma = jax.jit(pure).lower(state, x_tok).compile().memory_analysis()
            return None if ma is None else int(ma.temp_size_in_bytes)

        label = f"layer/{kn}" + (f" ({auto})" if kn == "auto" else "")
        cands.append(Candidate(Result(**base, name=label, kind="layer", note="nnx.jit"),
                               lambda m=moe, f=layer_fwd: block(f(m, x_tok)),
                               lambda m=moe, f=layer_fb: block(f(m, x_tok)), mem))
    loop_bytes = loop_activation_bytes(rows, d, h, dtype.itemsize)
    return cands, limit, loop_bytes


# ==================================================================================== driver
def parse_sizes(text: str) -> dict[str, int]:
    try:
        dim, hidden, experts, top_k, tokens = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--sizes {text!r}: expected five integers D,H,E,k,N") from None
    return dict(dim=dim, hidden_dim=hidden, num_experts=experts, top_k=top_k, tokens=tokens)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small,medium",
                   help=f"comma list of {sorted(CONFIGS)} (default small,medium)")
    p.add_argument("--backend", default="all", choices=["torch", "jax", "all"])
    p.add_argument("--dtype", default="float32,bfloat16", help="comma list (default float32,bfloat16)")
    p.add_argument("--device", default=None, help="torch device: cpu | cuda (default: cuda if available)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="one timed round, medium -> small unless --config is given")
    p.add_argument("--full", action="store_true",
                   help="every kernel in the layer, ragged_dot on CPU, every transformers implementation")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3 on CUDA, 1 on CPU and with --quick)")
    p.add_argument("--sizes", default=None, help="override D,H,E,k,N for every config (e.g. 64,128,8,2,256)")
    p.add_argument("--no-peers", action="store_true", help="skip transformers / torchtitan")
    p.add_argument("--peers", action="store_true",
                   help="time the peers at the medium size too (default: small only on CPU; minutes more)")
    p.add_argument("--compile", action="store_true",
                   help="also time the whole torch layer under torch.compile (layer/auto+compile; "
                        "minutes of compilation per config and dtype on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (CPU). NOTE: on a machine shared with other jobs each "
                        "per-expert GEMM call waits for all N threads to join; 1 shows the kernels' own cost")
    return p


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [c.strip() for c in args.config.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise SystemExit(f"--config {bad}: not one of {sorted(CONFIGS)}")
    dtypes = [t.strip() for t in args.dtype.split(",") if t.strip()]
    for t in dtypes:
        if t not in ("float32", "bfloat16", "float16"):
            raise SystemExit(f"--dtype {t!r}: not one of float32, bfloat16, float16")
    on_cuda = (args.device or ("cuda" if _cuda_available() else "cpu")) == "cuda"
    rounds = args.rounds or (3 if on_cuda and not args.quick else 1)
    backends = ["torch", "jax"] if args.backend == "all" else [args.backend]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    results: list[Result] = []
    t_start = time.perf_counter()
    meta: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "python": platform.python_version(),
                            "machine": platform.machine(), "cpus": os.cpu_count(), "rounds": rounds}
    for cname in names:
        sizes = parse_sizes(args.sizes) if args.sizes else CONFIGS[cname]
        tokens = sizes["tokens"]
        cfg = MoEConfig(**{k: v for k, v in sizes.items() if k != "tokens"})
        for dtype_name in dtypes:
            for backend in backends:
                log(f"[{cname} {dtype_name} {backend}] D={cfg.dim} H={cfg.hidden_dim} E={cfg.num_experts} "
                    f"k={cfg.top_k} N={tokens}")
                try:
                    if backend == "torch":
                        import torch

                        if args.threads:
                            torch.set_num_threads(args.threads)
                            meta["torch_threads"] = args.threads

                        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
                        meta["torch"] = torch.__version__
                        if args.compile:  # a graph per (config, dtype, grad mode): fail, never run eagerly
                            import torch._dynamo

                            torch._dynamo.config.recompile_limit = 64
                            torch._dynamo.config.fail_on_recompile_limit_hit = True
                        cands, limit, loop_bytes = torch_candidates(cname, cfg, tokens, dtype_name, device, args)
                    else:
                        import jax

                        meta["jax"] = jax.__version__
                        cands, limit, loop_bytes = jax_candidates(cname, cfg, tokens, dtype_name, args)
                except ImportError as exc:
                    log(f"  {backend} skipped: {exc}")
                    results.append(Result(config=cname, dtype=dtype_name, backend=backend, device="-", name=backend,
                                          kind="limit", flops_fwd=0.0, skipped=f"not installed ({exc})"))
                    continue
                t_group = time.perf_counter()
                run_interleaved(cands, limit, rounds, log)
                log(f"  {cname} {dtype_name} {backend}: {time.perf_counter() - t_group:.1f} s")
                summarise(cands, limit, loop_bytes)
                group = [c.result for c in cands]
                results += group
                del cands, limit
                gc.collect()
                print_table(group, meta)  # each group as soon as it is done; JSON rewritten too
                meta["seconds"] = round(time.perf_counter() - t_start, 1)
                write_json(args.json, meta, results, check_targets(results))
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    verdicts = check_targets(results)
    for line in verdicts:
        print(line)
    print(f"total {meta['seconds']} s; {meta}")
    write_json(args.json, meta, results, verdicts)
    if args.json:
        log(f"wrote {args.json}")
    return 0


def write_json(path: str | None, meta: dict, results: list[Result], verdicts: list[str]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "targets": TARGETS, "verdicts": verdicts,
                       "results": [vars(r) for r in results]}, f, indent=1)


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(results: list[Result], meta: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.config, r.dtype, r.backend, r.device), []).append(r)
    for (cname, dtype, backend, device), rows in groups.items():
        table = Table(title=f"{cname} {dtype} {backend} on {device}  (x = time / dense limit timed just before, "
                            f"median of {meta['rounds']} rounds)")
        for col in ("what", "fwd x", "fwd+bwd x", "GFLOP/s fwd", "GFLOP/s f+b", "mem f+b", "mem x loop", "note"):
            table.add_column(col, justify="left" if col in ("what", "note") else "right")
        for r in rows:
            if r.skipped:
                table.add_row(escape(r.name), "-", "-", "-", "-", "-", "-", escape(f"skipped: {r.skipped}"))
                continue
            note = r.note + (f" vs {r.versus}" if r.versus else "") + (f" ({r.rounds} rnd)" if r.rounds < meta["rounds"] else "")
            mem = "-" if r.mem_bytes is None else f"{r.mem_bytes / 2 ** 20:.0f} MiB"
            table.add_row(escape(r.name), _fmt(r.fwd_ratio, ".2f"), _fmt(r.fwdbwd_ratio, ".2f"),
                          _fmt(r.fwd_flops_per_s and r.fwd_flops_per_s / 1e9, ".1f"),
                          _fmt(r.fwdbwd_flops_per_s and r.fwdbwd_flops_per_s / 1e9, ".1f"),
                          mem, _fmt(r.mem_ratio, ".2f"), escape(note.strip()))
        console.print(table)


def check_targets(results: list[Result]) -> list[str]:
    """Issue-7 targets, judged on the medium float32 CPU rows when present (else on what ran)."""
    out = []
    for r in results:
        if r.skipped or r.kind == "limit" or r.config != "medium" or r.dtype != "float32":
            continue
        if r.backend == "torch" and r.kind == "experts" and "auto" in r.note:
            ok_f = r.fwd_ratio is not None and r.fwd_ratio <= TARGETS["torch_fwd"]
            ok_b = r.fwdbwd_ratio is not None and r.fwdbwd_ratio <= TARGETS["torch_fwdbwd"]
            out.append(f"target torch auto ({r.name}) forward <= {TARGETS['torch_fwd']}x: {_fmt(r.fwd_ratio, '.2f')} "
                       f"{'MET' if ok_f else 'MISSED'}")
            out.append(f"target torch auto ({r.name}) fwd+bwd <= {TARGETS['torch_fwdbwd']}x: {_fmt(r.fwdbwd_ratio, '.2f')} "
                       f"{'MET' if ok_b else 'MISSED'}")
        if r.backend == "torch" and r.name.startswith("layer/auto+compile"):  # issue 18
            ok = r.fwdbwd_ratio is not None and r.fwdbwd_ratio <= TARGETS["torch_compiled_fwdbwd"]
            out.append(f"target torch compiled layer fwd+bwd <= {TARGETS['torch_compiled_fwdbwd']}x: "
                       f"{_fmt(r.fwdbwd_ratio, '.2f')} {'MET' if ok else 'MISSED'}")
        if r.backend == "jax" and r.name.startswith("experts/") and "auto" in r.note:
            ok = r.fwdbwd_ratio is not None and r.fwdbwd_ratio <= TARGETS["jax_fwdbwd"]
            out.append(f"target jax auto ({r.name}) fwd+bwd <= {TARGETS['jax_fwdbwd']}x: "
                       f"{_fmt(r.fwdbwd_ratio, '.2f')} {'MET' if ok else 'MISSED'}")
        if r.kind == "experts" and "auto" in r.note and r.mem_ratio is not None:
            ok = r.mem_ratio <= TARGETS["mem"]
            out.append(f"target {r.backend} auto memory <= {TARGETS['mem']}x loop activations: "
                       f"{r.mem_ratio:.2f} {'MET' if ok else 'MISSED'}")
    # "auto" must be the fastest kernel measured (forward+backward) for its device and dtype
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if not r.skipped and r.kind == "experts" and r.fwdbwd_ratio is not None:
            groups.setdefault((r.backend, r.config, r.dtype, r.device), []).append(r)
    for (backend, cname, dtype, device), rows in groups.items():
        auto = next((r for r in rows if "auto" in r.note), None)
        if auto is None or len(rows) < 2:
            continue
        best = min(rows, key=lambda r: r.fwdbwd_ratio)
        ok = best is auto or auto.fwdbwd_ratio <= 1.1 * best.fwdbwd_ratio  # within 10%: noise
        rounds = min(r.rounds for r in (auto, best))
        if ok:
            verdict = "OK" if best is auto else "OK (within 10%)"
        elif rounds >= 3:
            verdict = "auto is not the fastest here: update AUTO_TABLE"
        else:
            verdict = f"auto was not the fastest in {rounds} round(s): confirm with --rounds 3"
        out.append(f"{backend} {cname} {dtype} on {device}: auto = {auto.name} ({_fmt(auto.fwdbwd_ratio, '.2f')} fwd+bwd), "
                   f"fastest {best.name} ({_fmt(best.fwdbwd_ratio, '.2f')}): {verdict}")
    for r in results:  # GPU: achieved throughput of the grouped GEMM against the H200's dense bf16 peak
        if (not r.skipped and r.device.startswith(("cuda", "gpu")) and r.dtype == "bfloat16"
                and r.kind == "experts" and r.fwd_flops_per_s):
            out.append(f"{r.backend} {r.config} {r.name}: {r.fwd_flops_per_s / 1e12:.0f} TFLOP/s fwd "
                       f"({100 * r.fwd_flops_per_s / H200_BF16_PEAK:.0f}% of 790), "
                       f"{r.fwdbwd_flops_per_s / 1e12:.0f} TFLOP/s fwd+bwd "
                       f"({100 * r.fwdbwd_flops_per_s / H200_BF16_PEAK:.0f}%); target >= 60% for grouped_mm")
    return out


if __name__ == "__main__":
    sys.exit(main())
