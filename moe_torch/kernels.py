"""Expert kernels (DESIGN.md step 7): small pure functions ``(w1, w2, w3, x, counts) -> y``.

Every kernel computes, for each expert ``e`` and the rows of ``x`` that belong to it,
``y = (silu(x W1[e]^T) * (x W3[e]^T)) W2[e]^T`` in x's dtype. Arguments:

- ``w1``, ``w3``: (num_experts, hidden_dim, dim); ``w2``: (num_experts, dim, hidden_dim) (plain tensors,
  ``[E, out, in]``; transposes happen here, at the call site of each matmul);
- ``x``: (rows, dim), rows sorted expert-major (expert 0's rows first);
- ``counts``: (num_experts,) int64, rows per expert; ``counts.sum() <= rows``. Rows past
  ``counts.sum()`` (padding, e.g. from a later expert-parallel dispatch) get a zero output and a zero
  gradient, whatever the kernel;
- returns ``y``: (rows, dim), x's dtype.

Keyword-only options (DESIGN.md step 7; the defaults are SwiGLU without biases, and then every kernel
runs exactly the ops it ran before these options existed: the choice is made in Python):

- ``b1``, ``b3``: (num_experts, hidden_dim) and ``b2``: (num_experts, dim) biases of the gate, up and
  down projections, or None (GPT-OSS): ``y = act(x W1[e]^T + b1[e], x W3[e]^T + b3[e]) W2[e]^T + b2[e]``,
  each bias added to its matmul's output in x's dtype (as transformers does); rows past
  ``counts.sum()`` get no bias (they stay zero);
- ``activation``: "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma 4) | "clamped_swiglu" (GPT-OSS), with
  ``alpha`` and ``limit`` for the latter (``gated_activation``).

Kernels: "loop" (the reference: one matmul per expert, a host sync for the counts), "grouped_mm"
(``torch.nn.functional.grouped_mm``, CPU and CUDA), "npu" (``torch_npu.npu_grouped_matmul``, imported
only when called). ``select_kernel`` is the one place where a name becomes a function; "auto" is
resolved there from ``AUTO_TABLE`` (a fixed table from measurement, see its comment).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_torch import custom_ops

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _zero_rows_past(y: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``y`` with rows ``>= total`` set to 0, in place (so garbage or NaN there cannot leak).

    NOTE: on CPU ``total`` is read on the host (no device to wait for) and only the tail is written:
    in the MoE layer there is no tail, and a full-size select cost ~8% of the layer's forward at the
    issue-7 medium config. Elsewhere a device-side masked fill, so CUDA/NPU never sync here.
    """
    if y.device.type == "cpu":
        end = int(total)
        if end < y.shape[0]:
            y[end:].zero_()
        return y
    past = torch.arange(y.shape[0], device=y.device) >= total
    return y.masked_fill_(past.unsqueeze(-1), 0)


def gated_activation(a1: torch.Tensor, a3: torch.Tensor, activation: str = "silu", alpha: float = 1.702,
                     limit: float = 7.0) -> torch.Tensor:
    """(7) The gated activation of gate ``a1`` and up ``a3`` projections, (rows, H) each, in their dtype.

    "silu": ``silu(a1) * a3`` (SwiGLU, Shazeer 2020); "gelu_tanh": ``gelu(a1, approximate="tanh") * a3``
    (GeGLU, Gemma 4's ``gelu_pytorch_tanh``); "clamped_swiglu" (GPT-OSS, transformers'
    ``GptOssExperts._apply_gate``, the same op order): ``g = a1.clamp(max=limit)``,
    ``(a3.clamp(-limit, limit) + 1) * (g * sigmoid(g * alpha))``. Raises ``ValueError`` for another name.
    """
    if activation == "silu":
        return F.silu(a1) * a3
    if activation == "gelu_tanh":
        return F.gelu(a1, approximate="tanh") * a3
    if activation == "clamped_swiglu":
        g = a1.clamp(max=limit)
        return (a3.clamp(min=-limit, max=limit) + 1) * (g * torch.sigmoid(g * alpha))
    raise ValueError(f"expert_activation={activation!r} is not one of ('silu', 'gelu_tanh', 'clamped_swiglu')")


def _is_plain(activation: str, b1, b2, b3) -> bool:
    """The default expert (SwiGLU, no biases): the kernels' original code path."""
    return activation == "silu" and b1 is None and b2 is None and b3 is None


def _row_experts(ends: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,) int64 expert of each expert-major row from ``ends`` (E,) inclusive cumulative row ends;
    rows past ``ends[-1]`` (padding) get E. On the device, no host sync."""
    return torch.searchsorted(ends, torch.arange(rows, device=ends.device, dtype=ends.dtype), right=True)


def _bias_rows(b: torch.Tensor | None, row_expert: torch.Tensor) -> torch.Tensor | None:
    """(rows, n) the bias of each row's expert, zero for padding rows (expert E); b (E, n) or None."""
    if b is None:
        return None
    return torch.cat([b, b.new_zeros((1, b.shape[-1]))]).index_select(0, row_expert)


def _add(y: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return y if b is None else y + b


# ---------------------------------------------------------------------------------------- loop
def loop_experts(w1, w2, w3, x, counts, *, b1=None, b2=None, b3=None, activation="silu", alpha=1.702, limit=7.0):
    """Reference kernel: one gated MLP (SwiGLU by default) per expert on its slice of rows. Any dtype,
    any device. Options: see the module docstring."""
    # NOTE: .tolist() is a host-device sync; acceptable for the reference kernel.
    sizes = counts.tolist()
    total = sum(sizes)
    outs = []
    plain = _is_plain(activation, b1, b2, b3)
    for e, xe in enumerate(torch.split(x[:total], sizes)):
        if plain:
            h = F.silu(xe @ w1[e].transpose(0, 1)) * (xe @ w3[e].transpose(0, 1))
            outs.append(h @ w2[e].transpose(0, 1))
            continue
        a1 = _add(xe @ w1[e].transpose(0, 1), None if b1 is None else b1[e])
        a3 = _add(xe @ w3[e].transpose(0, 1), None if b3 is None else b3[e])
        h = gated_activation(a1, a3, activation, alpha, limit)
        outs.append(_add(h @ w2[e].transpose(0, 1), None if b2 is None else b2[e]))
    y = torch.cat(outs) if outs else x.new_zeros((0, x.shape[-1]))
    if total < x.shape[0]:
        y = torch.cat([y, y.new_zeros((x.shape[0] - total, y.shape[-1]))])
    return y


# ---------------------------------------------------------------------------------- grouped_mm
def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm`` with the rows past ``offs[-1]`` of a 2-D x 3-D product zeroed (it leaves them
    unwritten: uninitialised memory, NaN in bf16). Under torch.compile: the same as one custom op
    (``moe_torch.custom_ops.grouped_mm``: grouped_mm's own fake rejects float32 on CPU)."""
    if torch.compiler.is_compiling():
        return custom_ops.grouped_mm(a, b, offs)
    y = F.grouped_mm(a, b, offs=offs)
    return _zero_rows_past(y, offs[-1]) if b.ndim == 3 else y


def _grouped_swiglu(x, w1, w2, w3, offs, inplace: bool):
    """The forward of the "grouped_mm" kernel: ``(h1, h3, y)``. ``inplace``: silu overwrites h1
    (inference: one (rows, H) buffer fewer; h1 is then no longer the pre-activation)."""
    h1 = _gmm(x, w1.transpose(1, 2), offs)  # (rows, H)
    h3 = _gmm(x, w3.transpose(1, 2), offs)
    y = _gmm(F.silu(h1, inplace=inplace).mul_(h3), w2.transpose(1, 2), offs)  # (rows, D)
    return h1, h3, y


class _GroupedSwiGLU(torch.autograd.Function):
    """The whole expert MLP of the "grouped_mm" kernel as one autograd node.

    Forward: ``h1 = x @ W1[e]^T``, ``h3 = x @ W3[e]^T``, ``y = (silu(h1) * h3) @ W2[e]^T`` per expert
    (three grouped GEMMs). Saved for backward: x, h1 and h3 only (``silu(h1) * h3`` is recomputed,
    elementwise), i.e. (D + 2H) values per row where autograd through separate ops keeps (D + 4H):
    x, h1, silu(h1), h3 and h.

    NOTE: (a) the backward is written out (measured on CPU at the issue-7 medium config, see
    benchmarks/bench_moe.py: fewer autograd nodes, less memory); it uses ``aten.silu_backward`` and the
    same GEMM layouts as autograd through "loop" (weights as transposed views, ``x @ w.T``), so the two
    kernels agree to the last bit in float32 forward and to rounding in the backward. A contiguous
    transposed weight copy, or one fused W1|W3 GEMM, would change the rounding (NN vs NT GEMM; silu
    of a strided view takes another vector path). (b) The gradient is made contiguous first
    (grouped_mm's CPU backward rejects the stride-0 gradient of ``y.sum()``). (c) Rows past
    ``offs[-1]`` get zero output and zero input gradient; an expert without rows gets an exact zero
    weight gradient (grouped_mm writes zeros there).
    """

    @staticmethod
    def forward(ctx, x, w1, w2, w3, offs):
        h1, h3, y = _grouped_swiglu(x, w1, w2, w3, offs, inplace=False)
        ctx.save_for_backward(x, w1, w2, w3, offs, h1, h3)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, w3, offs, h1, h3 = ctx.saved_tensors
        if dy.numel() == 0:  # NOTE: an empty gradient may keep stride 0 even after .contiguous()
            return torch.zeros_like(x), torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3), None
        dy = dy.contiguous()
        silu = F.silu(h1)
        dh = _gmm(dy, w2, offs)  # (rows, H); w2 (E, D, H) is already (K, N) per expert
        dw2 = _gmm(dy.transpose(0, 1), silu * h3, offs)  # (E, D, H)
        dh1 = torch.ops.aten.silu_backward(dh * h3, h1)
        dh3 = silu.mul_(dh)  # in place: fewer fresh (rows, H) buffers to fault in on CPU
        del dh, silu
        dx = _gmm(dh1, w1, offs).add_(_gmm(dh3, w3, offs))  # (rows, D)
        dw1 = _gmm(dh1.transpose(0, 1), x, offs)  # (E, H, D)
        dw3 = _gmm(dh3.transpose(0, 1), x, offs)
        return dx, dw1, dw2, dw3, None


def _segment_sum(g: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, n) sum of the rows of each expert of ``g`` (rows, n), accumulated in float32 (float64 for
    float64), cast to ``dtype``: the gradient of a per-expert bias. ``torch.segment_reduce`` over the E
    segments and the padding rows past ``offs[-1]`` (dropped): a reduction per segment, no atomics."""
    acc = torch.promote_types(g.dtype, torch.float32)
    ends = offs.to(torch.int64)
    lengths = torch.diff(ends, prepend=ends.new_zeros(1))
    lengths = torch.cat([lengths, (g.shape[0] - ends[-1:]).clamp(min=0)])
    return torch.segment_reduce(g.to(acc), "sum", lengths=lengths)[:-1].to(dtype)


def _grouped_glu(x, w1, w2, w3, b1, b2, b3, offs, options):
    """The forward of the "grouped_mm" kernel with biases or another activation: ``(h1, h3, y)``,
    h1 / h3 the biased gate / up pre-activations."""
    rows_e = _row_experts(offs, x.shape[0])
    h1 = _add(_gmm(x, w1.transpose(1, 2), offs), _bias_rows(b1, rows_e))
    h3 = _add(_gmm(x, w3.transpose(1, 2), offs), _bias_rows(b3, rows_e))
    y = _add(_gmm(gated_activation(h1, h3, *options), w2.transpose(1, 2), offs), _bias_rows(b2, rows_e))
    return h1, h3, y


class _GroupedGLU(torch.autograd.Function):
    """``_GroupedSwiGLU`` with the options of step 7: expert biases and the activation (``options`` =
    (activation, alpha, limit)). Saved: x, h1, h3 (biased pre-activations). The backward recomputes the
    elementwise activation under autograd (``torch.autograd.grad`` of ``gated_activation``: the same
    derivative as autograd through "loop", the clamp's included) and the bias gradients are
    per-expert row sums (``_segment_sum``). Rows past ``offs[-1]`` get no bias, zero output and zero
    gradient; an expert without rows gets zero gradients.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, w3, b1, b2, b3, offs, options):
        h1, h3, y = _grouped_glu(x, w1, w2, w3, b1, b2, b3, offs, options)
        ctx.options = options
        ctx.bias_dtypes = tuple(None if b is None else b.dtype for b in (b1, b2, b3))
        ctx.save_for_backward(x, w1, w2, w3, offs, h1, h3)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, w3, offs, h1, h3 = ctx.saved_tensors
        if dy.numel() == 0:
            zeros = tuple(torch.zeros_like(t) for t in (x, w1, w2, w3))
            biases = tuple(None if d is None else torch.zeros(((w1 if i != 1 else w2).shape[0],
                                                              (w1.shape[1] if i != 1 else w2.shape[1])),
                                                             dtype=d, device=x.device)
                           for i, d in enumerate(ctx.bias_dtypes))
            return (*zeros, *biases, None, None)
        dy = dy.contiguous()
        with torch.enable_grad():
            a1, a3 = h1.detach().requires_grad_(), h3.detach().requires_grad_()
            h = gated_activation(a1, a3, *ctx.options)
        dh = _gmm(dy, w2, offs)  # (rows, H)
        dh1, dh3 = torch.autograd.grad(h, (a1, a3), dh)
        h = h.detach()
        dw2 = _gmm(dy.transpose(0, 1), h, offs)  # (E, D, H)
        dx = _gmm(dh1, w1, offs).add_(_gmm(dh3, w3, offs))  # (rows, D)
        dw1 = _gmm(dh1.transpose(0, 1).contiguous(), x, offs)  # (E, H, D)
        dw3 = _gmm(dh3.transpose(0, 1).contiguous(), x, offs)
        db1, db2, db3 = (None if d is None else _segment_sum(g, offs, d)
                         for g, d in zip((dh1, dy, dh3), ctx.bias_dtypes, strict=True))
        return dx, dw1, dw2, dw3, db1, db2, db3, None, None


def _pad_to(t: torch.Tensor, dims: dict[int, int]) -> torch.Tensor:
    """Zero-pad ``t`` at the end of each dim ``d`` to size ``dims[d]``."""
    pad = []
    for d in range(t.ndim - 1, -1, -1):
        pad += [0, dims.get(d - t.ndim, t.shape[d]) - t.shape[d]]
    return F.pad(t, pad) if any(pad) else t


def grouped_mm_experts(w1, w2, w3, x, counts, *, b1=None, b2=None, b3=None, activation="silu", alpha=1.702,
                       limit=7.0):
    """Grouped-GEMM kernel (``torch.nn.functional.grouped_mm``): float32, bfloat16, float16.

    ``offs`` = int32 inclusive cumulative ends, one per local expert (E entries; the module this kit
    grew from passed only E-1). grouped_mm needs 16-byte aligned strides, so dims that are not
    multiples of 16 bytes (4 float32 / 8 bf16 elements) are zero-padded, which changes no value
    (silu(0) * 0 = 0, and so for every activation with zero-padded biases; padded weight rows/columns
    get a zero gradient and are sliced away).
    The expert MLP is one autograd node (``_GroupedSwiGLU``; with biases or another activation
    ``_GroupedGLU``). Options: see the module docstring.
    """
    dim, hidden = x.shape[-1], w1.shape[1]
    align = 16 // x.element_size()
    dp, hp = -(-dim // align) * align, -(-hidden // align) * align
    plain = _is_plain(activation, b1, b2, b3)
    if not plain and torch.compiler.is_compiling():  # NOTE: dynamo cannot trace _GroupedGLU's autograd.grad
        return custom_ops.opaque_kernel("grouped_mm")(w1, w2, w3, x, counts, b1=b1, b2=b2, b3=b3,
                                                      activation=activation, alpha=alpha, limit=limit)
    if (dp, hp) != (dim, hidden):
        x = _pad_to(x, {-1: dp})
        w1, w3 = _pad_to(w1, {-2: hp, -1: dp}), _pad_to(w3, {-2: hp, -1: dp})
        w2 = _pad_to(w2, {-2: dp, -1: hp})
        if not plain:
            b1, b3 = (None if b is None else _pad_to(b, {-1: hp}) for b in (b1, b3))
            b2 = None if b2 is None else _pad_to(b2, {-1: dp})
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = x.contiguous()
    if not plain:
        options = (activation, alpha, limit)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, w2, w3, b1, b2, b3)):
            y = _GroupedGLU.apply(x, w1, w2, w3, b1, b2, b3, offs, options)
        else:
            y = _grouped_glu(x, w1, w2, w3, b1, b2, b3, offs, options)[2]
        return y[:, :dim] if dp != dim else y
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w2, w3)):
        y = _GroupedSwiGLU.apply(x, w1, w2, w3, offs)
    else:  # inference: the same ops without an autograd node, silu in place
        y = _grouped_swiglu(x, w1, w2, w3, offs, inplace=True)[2]
    return y[:, :dim] if dp != dim else y


# ----------------------------------------------------------------------------------------- npu
class _NpuGroupedMatmul(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e]^T`` with ``torch_npu.npu_grouped_matmul``; x (M, in), w (E, out, in).

    Call convention (torch_npu >= 2.1 docs, "npu_grouped_matmul"): x and weight are lists; one x of
    shape (M, K) split along M (``group_type=0``) by ``group_list`` = per-expert counts
    (``group_list_type=1``, int64 tensor), one stacked weight (E, K, N), one output (M, N)
    (``split_item=3``: x and y are single tensors). The weight gradient is the K-split form
    (``group_type=2``): ``[x^T] @ [grad]`` -> (E, in, out). Rows past ``counts.sum()`` and the
    weight gradient of empty experts are not specified by the docs, so they are zeroed here.
    """

    @staticmethod
    def forward(ctx, x, w, counts):
        import torch_npu  # NOTE: imported only here: without the Ascend toolkit it breaks `import torch`

        ctx.save_for_backward(x, w, counts)
        y = torch_npu.npu_grouped_matmul([x], [w.transpose(1, 2)], bias=None, group_list=counts,
                                         split_item=3, group_type=0, group_list_type=1)[0]
        return _zero_rows_past(y, counts.sum())

    @staticmethod
    def backward(ctx, grad):
        import torch_npu

        x, w, counts = ctx.saved_tensors
        if grad.numel() == 0:
            return torch.zeros_like(x), torch.zeros_like(w), None
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch_npu.npu_grouped_matmul([grad], [w], bias=None, group_list=counts,
                                                  split_item=3, group_type=0, group_list_type=1)[0]
            grad_x = _zero_rows_past(grad_x, counts.sum())
        if ctx.needs_input_grad[1]:
            gw = torch_npu.npu_grouped_matmul([x.transpose(0, 1)], [grad], bias=None, group_list=counts,
                                              split_item=3, group_type=2, group_list_type=1)[0]
            gw = gw.transpose(1, 2)  # (E, in, out) -> (E, out, in)
            grad_w = torch.where((counts > 0).view(-1, 1, 1), gw, torch.zeros((), dtype=gw.dtype, device=gw.device))
        return grad_x, grad_w, None


def npu_experts(w1, w2, w3, x, counts, *, b1=None, b2=None, b3=None, activation="silu", alpha=1.702, limit=7.0):
    """Ascend kernel (``torch_npu.npu_grouped_matmul``): float32, bfloat16, float16. Options: see the
    module docstring (biases added per row after each grouped matmul, autograd through the rest)."""
    counts = counts.to(torch.int64)
    x = x.contiguous()
    if _is_plain(activation, b1, b2, b3):
        h = F.silu(_NpuGroupedMatmul.apply(x, w1, counts)) * _NpuGroupedMatmul.apply(x, w3, counts)
        return _NpuGroupedMatmul.apply(h, w2, counts)
    rows_e = _row_experts(torch.cumsum(counts, 0), x.shape[0])
    a1 = _add(_NpuGroupedMatmul.apply(x, w1, counts), _bias_rows(b1, rows_e))
    a3 = _add(_NpuGroupedMatmul.apply(x, w3, counts), _bias_rows(b3, rows_e))
    h = gated_activation(a1, a3, activation, alpha, limit)
    return _add(_NpuGroupedMatmul.apply(h, w2, counts), _bias_rows(b2, rows_e))


# ------------------------------------------------------------------------------------ selection
KERNELS: dict[str, Kernel] = {"loop": loop_experts, "grouped_mm": grouped_mm_experts, "npu": npu_experts}

# dtypes each kernel can run; anything else (float64) falls back to "loop", which is exact.
KERNEL_DTYPES = {
    "loop": None,  # any
    "grouped_mm": (torch.float32, torch.bfloat16, torch.float16),
    "npu": (torch.float32, torch.bfloat16, torch.float16),
}

# "auto": (device type, dtype) -> kernel. A fixed table (the same kernel on every run, so results are
# reproducible), filled from measurement: benchmarks/bench_moe.py, issue-7 medium config (D=1024 H=512
# E=64 k=8 N=8192), expert compute, ratio to a dense SwiGLU of the same FLOPs timed just before
# (CPU: torch 2.13, 2 threads; median of 3 rounds, loop 1 round; the range of 7 other runs in brackets):
#                forward: loop / grouped_mm             forward+backward: loop / grouped_mm
#   float32      0.83 / 0.95  (0.91-1.07 / 0.87-1.27)   2.79 / 1.00  (1.53-3.65 / 1.03-1.35)
#   bfloat16     1.48 / 1.12  (0.95-1.18 / 1.04-1.16)   4.03 / 1.15  (1.71-4.02 / 1.07-1.17)
# Forward alone the two are within noise (bf16: loop often ~5% ahead); forward+backward grouped_mm is
# 1.5-3.5x faster (loop's backward builds 3*E full-size (E, out, in) gradients of weight slices and
# adds them), and it keeps 0.67x the activations. At the small config (D=256, E=8, k=2) they are
# within ~10% either way. So CPU uses grouped_mm for every dtype it runs (float64 falls back to loop).
# CUDA: bf16 follows torchtitan's choice (grouped GEMM); NOT yet measured here (no GPU so far):
# benchmarks/gpu_check.sh times both kernels and its summary says whether this row holds ("auto =
# ... fastest ..."). NPU has one fast kernel. Pairs not listed use "loop".
AUTO_TABLE: dict[tuple[str, torch.dtype], str] = {
    ("cpu", torch.float32): "grouped_mm",
    ("cpu", torch.bfloat16): "grouped_mm",
    ("cpu", torch.float16): "grouped_mm",
    ("cuda", torch.bfloat16): "grouped_mm",
    ("npu", torch.float32): "npu",
    ("npu", torch.bfloat16): "npu",
    ("npu", torch.float16): "npu",
}


def resolve_kernel(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel that runs for ``name`` on this device and dtype.

    "auto" -> ``AUTO_TABLE`` (default "loop"). A kernel that cannot run ``dtype`` (float64 on
    "grouped_mm" / "npu") falls back to "loop" so float64 gradients always work.
    Raises ``ValueError`` for a name not in ("auto", "loop", "grouped_mm", "npu").
    """
    if name == "auto":
        name = AUTO_TABLE.get((device.type, dtype), "loop")
    elif name not in KERNELS:
        raise ValueError(f"expert_kernel={name!r} is not one of {('auto', *KERNELS)}")
    allowed = KERNEL_DTYPES[name]
    if allowed is not None and dtype not in allowed:
        return "loop"
    return name


def select_kernel(name: str, device: torch.device, dtype: torch.dtype) -> Kernel:
    """The kernel function for ``name`` (see ``resolve_kernel``). Under torch.compile, "loop" and "npu"
    (host syncs on the counts) run as one opaque custom op (``moe_torch.custom_ops.opaque_kernel``)."""
    resolved = resolve_kernel(name, device, dtype)
    if resolved in custom_ops.OPAQUE_KERNELS and torch.compiler.is_compiling():
        return custom_ops.opaque_kernel(resolved)
    return KERNELS[resolved]
