"""``torch.library`` custom ops that let ``torch.compile`` trace the expert kernels (DESIGN.md step 7).

Two things in the eager kernels stop a compiler that traces with fake tensors (shapes, no values):

- ``torch.nn.functional.grouped_mm`` has a fake (meta) implementation that rejects float32 on CPU
  ("Expected inputs of BF16 type"), although the CPU kernel runs float32; and the kernel reads the
  last offset on the host to zero the unwritten rows past it.
- the "loop" kernel splits its rows by ``counts.tolist()`` (a host sync), and the "npu" kernel's
  ``torch_npu`` call takes host-side group sizes: sizes that depend on the routing, i.e. on data.

So, under ``torch.compile`` only (``torch.compiler.is_compiling()``; eager calls the kernels directly,
unchanged), ``moe_torch.kernels`` calls:

- ``torch.ops.moe_torch.grouped_mm(a, b, offs)``: ``F.grouped_mm`` plus the zeroed tail, one opaque
  op whose fake gives the output shape (2-D x 3-D -> (M, N); 2-D x 2-D -> (groups, M, N)). It runs
  inside the "grouped_mm" kernel's ``autograd.Function`` (whose backward is written out in the same
  op), so it needs no autograd formula of its own.
- ``torch.ops.moe_torch.expert_mlp(kernel, x, w1, w2, w3, counts, b1, b2, b3, options)``: a whole
  eager kernel ("loop", "npu") as one opaque op, output (rows, D) in x's dtype. Its gradient is
  ``torch.ops.moe_torch.expert_mlp_backward``, which re-runs the eager kernel under autograd and takes
  ``torch.autograd.grad`` of it: the same operations as eager autograd through the kernel, so the
  same bits, at the cost of one more expert forward in the backward (the "loop" kernel is the
  reference, not the fast path). ``b1``/``b2``/``b3`` are optional expert biases (None: none) and
  ``options`` the ``repr`` of a dict of the kernel's other keyword arguments (e.g. the activation:
  Python literals, read back with ``ast.literal_eval``), passed through unchanged.

The routing counts stay tensors inside both ops, so a compiled layer neither breaks its graph nor
recompiles when the counts change (``tests/torch/test_compile.py`` counts both).
"""

from __future__ import annotations

import ast
import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grouped_mm", "expert_mlp", "OPAQUE_KERNELS"]

#: kernels that run as one opaque op under torch.compile (their eager code syncs the counts to the host)
OPAQUE_KERNELS = ("loop", "npu")


# ---------------------------------------------------------------------------------- grouped_mm
@torch.library.custom_op("moe_torch::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``F.grouped_mm(a, b, offs=offs)``; for a 2-D x 3-D product the rows past ``offs[-1]`` are zeroed
    (grouped_mm leaves them unwritten). a (M, K), b (E, K, N) -> (M, N); a (M, R), b (R, N) ->
    (E, M, N) (groups along R). offs: (E,) int32 inclusive cumulative ends."""
    from moe_torch.kernels import _zero_rows_past  # on CPU it reads offs[-1] on the host (outside any graph)

    y = F.grouped_mm(a, b, offs=offs)
    return _zero_rows_past(y, offs[-1]) if b.ndim == 3 else y


@grouped_mm.register_fake
def _grouped_mm_fake(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.ndim == 3:
        return a.new_empty((a.shape[0], b.shape[-1]))
    return a.new_empty((offs.shape[0], a.shape[0], b.shape[-1]))


# ----------------------------------------------------------------------------------- expert_mlp
def _run_kernel(kernel: str, x, w1, w2, w3, counts, b1, b2, b3, options: str) -> Tensor:
    from moe_torch.kernels import KERNELS

    kwargs = ast.literal_eval(options)
    for name, bias in (("b1", b1), ("b2", b2), ("b3", b3)):
        if bias is not None:
            kwargs[name] = bias
    return KERNELS[kernel](w1, w2, w3, x, counts, **kwargs)


@torch.library.custom_op("moe_torch::expert_mlp", mutates_args=())
def expert_mlp(kernel: str, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, counts: Tensor, b1: Tensor | None,
               b2: Tensor | None, b3: Tensor | None, options: str) -> Tensor:
    """The eager expert kernel ``kernel`` (a name in ``moe_torch.kernels.KERNELS``) as one op:
    x (rows, D), w1/w3 (E, H, D), w2 (E, D, H), counts (E,) int -> (rows, D) in x's dtype."""
    with torch.no_grad():
        y = _run_kernel(kernel, x, w1, w2, w3, counts, b1, b2, b3, options)
    return y if not _aliases(y, (x, w1, w2, w3)) else y.clone()


def _aliases(y: Tensor, inputs) -> bool:
    """A custom op must not return a view of an input (a kernel could, e.g. for zero experts)."""
    storage = y.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == storage for t in inputs if y.numel())


@expert_mlp.register_fake
def _expert_mlp_fake(kernel, x, w1, w2, w3, counts, b1, b2, b3, options):
    return x.new_empty((x.shape[0], w2.shape[1]))


_AUTOGRAD_KEYS = ("AutogradFunctionality", "AutogradOther", "ADInplaceOrView", "AutogradCPU", "AutogradCUDA",
                  "AutogradPrivateUse1")


@contextlib.contextmanager
def _autograd_reenabled():
    """Autograd on again inside a custom op's implementation.

    NOTE: the dispatcher runs an op's implementation below autograd (its autograd keys are excluded
    from the thread-local dispatch set), so ``torch.enable_grad()`` alone records nothing there and
    ``torch.autograd.grad`` fails. ``torch.func.vjp`` does work there, but its gradients differ from
    eager autograd's in the last bits (measured: dx and dw1 of the "loop" kernel, float32, up to
    1.5e-5 on values of order 100, about 1 ULP); so the
    autograd keys are taken off the exclude set for the re-run (a private guard of torch._C; the
    autocast keys stay excluded: the forward ran without autocast too).
    """
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        key = getattr(C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("moe_torch::expert_mlp_backward", mutates_args=())
def expert_mlp_backward(dy: Tensor, kernel: str, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, counts: Tensor,
                        b1: Tensor | None, b2: Tensor | None, b3: Tensor | None, options: str,
                        needs: list[bool]) -> list[Tensor]:
    """Gradients of ``expert_mlp`` w.r.t. (x, w1, w2, w3, b1, b2, b3) for the output gradient ``dy``:
    the eager kernel re-run under autograd. ``needs[i]`` False (or a None bias) gives an empty (0,)
    placeholder in slot i (turned into None by the autograd formula)."""
    inputs = (x, w1, w2, w3, b1, b2, b3)
    with _autograd_reenabled():
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(inputs, needs, strict=True)]
        y = _run_kernel(kernel, leaves[0], *leaves[1:4], counts, *leaves[4:], options)
        wanted = [i for i, t in enumerate(leaves) if t is not None and needs[i]]
        # NOTE: y without a graph: no rows at all (counts all zero); every gradient is then zero
        grads = torch.autograd.grad(y, [leaves[i] for i in wanted], dy, allow_unused=True) if wanted and \
            y.requires_grad else [None] * len(wanted)
    out = [x.new_empty((0,)) for _ in inputs]
    for i, g in zip(wanted, grads, strict=True):
        g = torch.zeros_like(inputs[i]) if g is None else g
        out[i] = g.clone() if _aliases(g, (dy, *(t for t in inputs if t is not None))) else g
    return out


@expert_mlp_backward.register_fake
def _expert_mlp_backward_fake(dy, kernel, x, w1, w2, w3, counts, b1, b2, b3, options, needs):
    inputs = (x, w1, w2, w3, b1, b2, b3)
    return [torch.empty_like(t) if t is not None and need else x.new_empty((0,))
            for t, need in zip(inputs, needs, strict=True)]


def _setup_context(ctx, inputs, output):
    kernel, x, w1, w2, w3, counts, b1, b2, b3, options = inputs
    ctx.kernel, ctx.options = kernel, options
    ctx.has_bias = (b1 is not None, b2 is not None, b3 is not None)
    ctx.save_for_backward(x, w1, w2, w3, counts, *(b for b in (b1, b2, b3) if b is not None))


def _backward(ctx, dy):
    x, w1, w2, w3, counts, *rest = ctx.saved_tensors
    rest = iter(rest)
    b1, b2, b3 = (next(rest) if has else None for has in ctx.has_bias)
    needs = [bool(n) for n in ctx.needs_input_grad[1:5]] + [bool(n) for n in ctx.needs_input_grad[6:9]]
    grads = torch.ops.moe_torch.expert_mlp_backward(dy.contiguous(), ctx.kernel, x, w1, w2, w3, counts, b1, b2, b3,
                                                    ctx.options, needs)
    gx, g1, g2, g3, gb1, gb2, gb3 = (g if need else None for g, need in zip(grads, needs, strict=True))
    return None, gx, g1, g2, g3, None, gb1, gb2, gb3, None


expert_mlp.register_autograd(_backward, setup_context=_setup_context)


def opaque_kernel(kernel: str):
    """A kernel function ``(w1, w2, w3, x, counts, **kwargs) -> y`` that runs the eager ``kernel`` through
    ``torch.ops.moe_torch.expert_mlp`` (for use under ``torch.compile``). Tensor keyword arguments
    named b1, b2, b3 are the optional biases; the others must be Python literals (str, number, bool, None).
    NOTE: the ``repr`` of a sorted dict, not ``json.dumps``: dynamo folds the former into a constant and
    cannot trace the latter."""

    def run(w1, w2, w3, x, counts, b1=None, b2=None, b3=None, **options):
        return torch.ops.moe_torch.expert_mlp(kernel, x, w1, w2, w3, counts, b1, b2, b3,
                                              repr(dict(sorted(options.items()))))

    run.__name__ = f"opaque_{kernel}"
    return run
