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

Kernels: "loop" (the reference: one matmul per expert, a host sync for the counts), "grouped_mm"
(``torch.nn.functional.grouped_mm``, CPU and CUDA), "npu" (``torch_npu.npu_grouped_matmul``, imported
only when called). ``select_kernel`` is the one place where a name becomes a function; "auto" is
resolved there from ``AUTO_TABLE`` (a fixed table from measurement, see its comment).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _zero_rows_past(y: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``y`` with rows ``>= total`` set to 0 (a select, so garbage or NaN there cannot leak)."""
    valid = torch.arange(y.shape[0], device=y.device) < total
    return torch.where(valid.unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device))


# ---------------------------------------------------------------------------------------- loop
def loop_experts(w1, w2, w3, x, counts):
    """Reference kernel: one SwiGLU per expert on its slice of rows. Any dtype, any device."""
    # NOTE: .tolist() is a host-device sync; acceptable for the reference kernel.
    sizes = counts.tolist()
    total = sum(sizes)
    outs = []
    for e, xe in enumerate(torch.split(x[:total], sizes)):
        h = F.silu(xe @ w1[e].transpose(0, 1)) * (xe @ w3[e].transpose(0, 1))
        outs.append(h @ w2[e].transpose(0, 1))
    y = torch.cat(outs) if outs else x.new_zeros((0, x.shape[-1]))
    if total < x.shape[0]:
        y = torch.cat([y, y.new_zeros((x.shape[0] - total, y.shape[-1]))])
    return y


# ---------------------------------------------------------------------------------- grouped_mm
class _GroupedMM(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e]^T`` per group with ``F.grouped_mm``; x (M, in), w (E, out, in).

    NOTE: a custom backward for three reasons. (a) grouped_mm's CPU backward rejects the expanded,
    stride-0 gradient that ``y.sum()`` produces ("Invalid strides/sizes"), so the gradient is made
    contiguous first. (b) grouped_mm leaves rows past ``offs[-1]`` unwritten (uninitialised memory, NaN
    in bf16), in the forward and in the input gradient, so those rows are zeroed in both. (c) The
    weight gradient of an expert without rows is an exact zero (grouped_mm writes zeros there).
    """

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return _zero_rows_past(F.grouped_mm(x, w.transpose(-2, -1), offs=offs), offs[-1])

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        if grad.numel() == 0:  # NOTE: an empty gradient may keep stride 0 even after .contiguous()
            return torch.zeros_like(x), torch.zeros_like(w), None
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _zero_rows_past(F.grouped_mm(grad, w, offs=offs), offs[-1])
        if ctx.needs_input_grad[1]:
            # 2-D x 2-D: the row dimension is the jagged reduction dim -> (E, out, in)
            grad_w = F.grouped_mm(grad.transpose(0, 1), x, offs=offs)
        return grad_x, grad_w, None


def _pad_to(t: torch.Tensor, dims: dict[int, int]) -> torch.Tensor:
    """Zero-pad ``t`` at the end of each dim ``d`` to size ``dims[d]``."""
    pad = []
    for d in range(t.ndim - 1, -1, -1):
        pad += [0, dims.get(d - t.ndim, t.shape[d]) - t.shape[d]]
    return F.pad(t, pad) if any(pad) else t


def grouped_mm_experts(w1, w2, w3, x, counts):
    """Grouped-GEMM kernel (``torch.nn.functional.grouped_mm``): float32, bfloat16, float16.

    ``offs`` = int32 inclusive cumulative ends, one per local expert (E entries; the module this kit
    grew from passed only E-1). grouped_mm needs 16-byte aligned strides, so dims that are not
    multiples of 16 bytes (4 float32 / 8 bf16 elements) are zero-padded, which changes no value
    (silu(0) * 0 = 0; padded weight rows/columns get a zero gradient and are sliced away).
    """
    dim, hidden = x.shape[-1], w1.shape[1]
    align = 16 // x.element_size()
    dp, hp = -(-dim // align) * align, -(-hidden // align) * align
    if (dp, hp) != (dim, hidden):
        x = _pad_to(x, {-1: dp})
        w1, w3 = _pad_to(w1, {-2: hp, -1: dp}), _pad_to(w3, {-2: hp, -1: dp})
        w2 = _pad_to(w2, {-2: dp, -1: hp})
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = x.contiguous()
    h = F.silu(_GroupedMM.apply(x, w1, offs)) * _GroupedMM.apply(x, w3, offs)
    y = _GroupedMM.apply(h, w2, offs)
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


def npu_experts(w1, w2, w3, x, counts):
    """Ascend kernel (``torch_npu.npu_grouped_matmul``): float32, bfloat16, float16."""
    counts = counts.to(torch.int64)
    x = x.contiguous()
    h = F.silu(_NpuGroupedMatmul.apply(x, w1, counts)) * _NpuGroupedMatmul.apply(x, w3, counts)
    return _NpuGroupedMatmul.apply(h, w2, counts)


# ------------------------------------------------------------------------------------ selection
KERNELS: dict[str, Kernel] = {"loop": loop_experts, "grouped_mm": grouped_mm_experts, "npu": npu_experts}

# dtypes each kernel can run; anything else (float64) falls back to "loop", which is exact.
KERNEL_DTYPES = {
    "loop": None,  # any
    "grouped_mm": (torch.float32, torch.bfloat16, torch.float16),
    "npu": (torch.float32, torch.bfloat16, torch.float16),
}

# "auto": (device type, dtype) -> kernel. A fixed table (the same kernel on every run, so results are
# reproducible), filled from measurement where a device was available. CPU (torch 2.13, 2 shared
# cores, forward only unless stated, best of 2-5 runs):
#   D=64   H=128 E=8  k=2 N=512   f32 loop 0.62 ms / grouped_mm 0.95 ms; bf16 0.80 / 0.89 ms
#   D=256  H=512 E=16 k=2 N=2048  f32 loop 21 ms   / grouped_mm 28 ms;   bf16 11 / 13 ms
#   D=512  H=512 E=32 k=4 N=4096  f32 loop 0.15 s  / grouped_mm 0.24 s
#   D=1024 H=512 E=64 k=8 N=8192  f32 loop 1.3-6.2 s / grouped_mm 1.5-4.4 s (fwd+bwd 12.7 / 5.1 s);
#                                 bf16 loop 2.8 s / grouped_mm 2.0 s (fwd+bwd 6.4 / 3.5 s)
# i.e. the loop wins consistently up to medium sizes and the large-size timings are within the noise
# of a shared machine, so CPU uses "loop". CUDA was not measured in this task (no GPU drawn): bf16
# follows torchtitan's measured default (grouped GEMM), other CUDA dtypes stay on "loop" until the
# benchmark issue measures them. NPU has one fast kernel. Pairs not listed use "loop".
AUTO_TABLE: dict[tuple[str, torch.dtype], str] = {
    ("cpu", torch.float32): "loop",
    ("cpu", torch.bfloat16): "loop",
    ("cpu", torch.float16): "loop",
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
    """The kernel function for ``name`` (see ``resolve_kernel``)."""
    return KERNELS[resolve_kernel(name, device, dtype)]
