"""A CPU stand-in for ``torch_npu.npu_grouped_matmul`` that follows its documented semantics (tests only).

Source: the torch_npu API reference ("torch_npu.npu_grouped_matmul", PyTorch 2.1+ prototype)::

    npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None,
                       activation_input=None, activation_quant_scale=None, activation_quant_offset=None,
                       split_item=0, group_type=-1, group_list_type=0, act_type=0, output_dtype=None)
        -> List[Tensor]

- ``x`` / ``weight``: lists of tensors (at most 128 each); float16, bfloat16 or float32 (non-quantised).
  ``weight`` tensors are (K, N), or one stacked (E, K, N).
- ``group_type``: -1 no grouping, 0 split the M axis of a single x, 2 split the K axis (C[m,n] = A[m,k] B[k,n]).
- ``group_list``: int64 1-D tensor (or list of ints), one entry per group; ``group_list_type`` 0 =
  cumulative ends, 1 = per-group counts.
- ``split_item``: 0/1 -> one output per group; 2/3 -> a single output tensor (x single when 1/3).

What the docs leave unspecified is filled with NaN here (rows of a single output past the last group,
K-split results of empty groups), so a caller that relies on it fails loudly. Every call is recorded
in ``module.calls`` so tests can check shapes, transposes and group sizes at the call site.
"""

from __future__ import annotations

import types

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_LIST = 128


def _group_sizes(group_list, group_list_type: int, num_groups: int, total: int, device) -> list[int]:
    if isinstance(group_list, torch.Tensor):
        if group_list.dtype != torch.int64 or group_list.ndim != 1:
            raise TypeError(f"group_list must be a 1-D int64 tensor, got {group_list.dtype} {tuple(group_list.shape)}")
        if group_list.device != device:
            raise ValueError(f"group_list is on {group_list.device}, x on {device}")
        values = group_list.tolist()
    else:
        values = [int(v) for v in group_list]
    if len(values) != num_groups:
        raise ValueError(f"group_list has {len(values)} entries for {num_groups} groups")
    if group_list_type == 0:
        if any(b < a for a, b in zip([0] + values, values, strict=False)):
            raise ValueError(f"group_list (cumulative, group_list_type=0) must be non-decreasing: {values}")
        sizes = [b - a for a, b in zip([0] + values, values, strict=False)]
    elif group_list_type == 1:
        if any(v < 0 for v in values):
            raise ValueError(f"group_list (counts, group_list_type=1) must be >= 0: {values}")
        sizes = values
    else:
        raise ValueError(f"group_list_type={group_list_type} is not 0 or 1")
    if sum(sizes) > total:
        raise ValueError(f"group_list covers {sum(sizes)} rows, the grouped axis has {total}")
    return sizes


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() @ b.float()).to(a.dtype)  # the NPU cube unit accumulates in float32


def make_fake_torch_npu() -> types.ModuleType:
    """A module object to put in ``sys.modules["torch_npu"]``."""
    mod = types.ModuleType("torch_npu")
    mod.calls = []

    def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                           antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                           activation_quant_scale=None, activation_quant_offset=None, split_item=0,
                           group_type=-1, group_list_type=0, act_type=0, output_dtype=None):
        if not isinstance(x, (list, tuple)) or not isinstance(weight, (list, tuple)):
            raise TypeError("x and weight must be lists of tensors")
        if len(x) > MAX_LIST or len(weight) > MAX_LIST:
            raise ValueError(f"at most {MAX_LIST} tensors per list")
        for t in (*x, *weight):
            if t.dtype not in DTYPES:
                raise TypeError(f"npu_grouped_matmul does not support dtype {t.dtype}")
            if t.dtype != x[0].dtype:
                raise TypeError(f"mixed dtypes {x[0].dtype} and {t.dtype}")
        if any(v is not None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                                       activation_input, activation_quant_scale, activation_quant_offset)):
            raise NotImplementedError("the stand-in covers the non-quantised, bias-free case only")
        if split_item not in (0, 1, 2, 3):
            raise ValueError(f"split_item={split_item} is not in 0..3")
        mod.calls.append(dict(x=[tuple(t.shape) for t in x], x_transposed=[not t.is_contiguous() for t in x],
                              weight=[tuple(t.shape) for t in weight], split_item=split_item, group_type=group_type,
                              group_list_type=group_list_type,
                              group_list=None if group_list is None else list(map(int, group_list))))
        if group_type == -1:
            if len(x) != len(weight):
                raise ValueError("group_type=-1 needs as many x as weight tensors")
            ys = [_mm(a, b) for a, b in zip(x, weight, strict=True)]
            return ys if split_item in (0, 1) else [torch.cat(ys)]
        if len(x) != 1 or x[0].ndim != 2:
            raise NotImplementedError("the stand-in covers a single 2-D x for group_type 0 and 2")
        a = x[0]
        if len(weight) == 1 and weight[0].ndim == 3:
            ws = list(weight[0].unbind(0))
        elif all(w.ndim == 2 for w in weight):
            ws = list(weight)
        else:
            raise ValueError(f"weight must be one (E, K, N) tensor or E (K, N) tensors, got {[tuple(w.shape) for w in weight]}")
        if group_type == 0:  # split M: y[rows of g] = x[rows of g] @ w[g]
            if split_item not in (1, 3):
                raise ValueError(f"a single x split along M needs split_item 1 or 3, got {split_item}")
            sizes = _group_sizes(group_list, group_list_type, len(ws), a.shape[0], a.device)
            for w in ws:
                if w.shape[0] != a.shape[1]:
                    raise ValueError(f"K mismatch: x {tuple(a.shape)} @ weight {tuple(w.shape)}")
            parts = list(torch.split(a[: sum(sizes)], sizes))
            ys = [_mm(p, w) for p, w in zip(parts, ws, strict=True)]
            if split_item == 1:
                return ys
            y = torch.full((a.shape[0], ws[0].shape[1]), float("nan"), dtype=a.dtype, device=a.device)
            y[: sum(sizes)] = torch.cat(ys)
            return [y]
        if group_type == 2:  # split K: out[g] = x[:, cols of g] @ weight[rows of g]
            if split_item != 3 or len(ws) != 1:
                raise ValueError("the K-split form takes one x, one 2-D weight and split_item=3")
            b = ws[0]
            if b.shape[0] != a.shape[1]:
                raise ValueError(f"K mismatch: x {tuple(a.shape)} @ weight {tuple(b.shape)}")
            sizes = _group_sizes(group_list, group_list_type, len(group_list), a.shape[1], a.device)
            out = torch.full((len(sizes), a.shape[0], b.shape[1]), float("nan"), dtype=a.dtype, device=a.device)
            start = 0
            for g, n in enumerate(sizes):
                if n:
                    out[g] = _mm(a[:, start:start + n], b[start:start + n])
                start += n
            return [out]
        raise ValueError(f"group_type={group_type} is not -1, 0 or 2 (1 is unsupported)")

    mod.npu_grouped_matmul = npu_grouped_matmul
    return mod
