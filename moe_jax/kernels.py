"""Expert kernels: step (7) of DESIGN.md on rows already sorted expert-major.

Every kernel is a small pure function ``(w1, w2, w3, x, counts) -> y`` with

- ``x``: ``(num_rows, dim)`` rows sorted by expert (expert 0's rows first, then expert 1's, ...);
  rows past ``counts.sum()`` are padding and come back as zeros (ragged_dot, dense) or are ignored;
- ``w1``, ``w3``: ``(num_experts, dim, hidden_dim)`` and ``w2``: ``(num_experts, hidden_dim, dim)``,
  the JAX ``x @ w`` layout (the canonical PyTorch layout of DESIGN.md, transposed);
- ``counts``: ``(num_experts,)`` int32, rows per expert (data, not shape: everything jits);
- ``y``: ``(num_rows, dim)`` in ``x.dtype``: ``(silu(x W1[e]) * (x W3[e])) W2[e]`` per row.

``KERNELS`` maps the ``expert_kernel`` names to functions and ``resolve_kernel`` chooses one in one
place. "auto" is ``ragged_dot`` on GPU/TPU and ``blocked`` on CPU, where ragged_dot lowers to dense
work over every expert. Measured on 2 shared CPU cores, float32, forward+backward under jit, as a
ratio to the dense-equivalent (3 GEMMs of ``[N*k, D] x [D, H]``): small config (D=256, H=512, E=8,
k=2, N=4096) whole MoE ragged_dot 10.4x, blocked 1.6x; medium config (D=1024, H=512, E=64, k=8,
N=8192) whole MoE blocked 1.3x-1.6x (ragged_dot grows with E and was not run there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from parity.config import JAX_KERNELS

# Rows per block of the "blocked" kernel (a multiple of 8). Measured on CPU at the issue-7 medium
# config (D=1024, H=512, E=64, k=8, N=8192): 128 balances matmul efficiency against the padding
# waste of ceil(count / BLOCK) * BLOCK rows per expert.
BLOCK_ROWS = 128


def swiglu(x: jax.Array, w1: jax.Array, w2: jax.Array, w3: jax.Array) -> jax.Array:
    """SwiGLU (Shazeer 2020): ``(silu(x @ w1) * (x @ w3)) @ w2``; x (n, D), w1/w3 (D, H), w2 (H, D)."""
    return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2


# Keyword-only options of every kernel (DESIGN.md step 7; the defaults, SwiGLU without biases, run
# exactly the ops the kernels ran before these options existed: the choice is made in Python, at trace
# time): ``b1``, ``b3`` (E, H) and ``b2`` (E, D) biases of the gate, up and down projections (all three
# or none; GPT-OSS), each added to its matmul's output in x's dtype (rows past ``counts.sum()`` get no
# bias); ``activation`` "silu" | "gelu_tanh" (GeGLU, Gemma 4) | "clamped_swiglu" (GPT-OSS), with
# ``alpha`` and ``limit`` for the latter (``gated_activation``).
def gated_activation(a1: jax.Array, a3: jax.Array, activation: str = "silu", alpha: float = 1.702,
                     limit: float = 7.0) -> jax.Array:
    """(7) The gated activation of gate ``a1`` and up ``a3`` projections (n, H), in their dtype.

    "silu": ``silu(a1) * a3`` (SwiGLU); "gelu_tanh": ``gelu(a1, approximate=True) * a3`` (GeGLU with
    tanh GELU, Gemma 4's ``gelu_pytorch_tanh``); "clamped_swiglu" (GPT-OSS, transformers'
    ``GptOssExperts._apply_gate``): ``g = min(a1, limit)``, ``(clip(a3, -limit, limit) + 1) * (g *
    sigmoid(g * alpha))``. Raises ``ValueError`` for another name.
    """
    if activation == "silu":
        return jax.nn.silu(a1) * a3
    if activation == "gelu_tanh":
        return jax.nn.gelu(a1, approximate=True) * a3
    if activation == "clamped_swiglu":
        g = jnp.minimum(a1, limit)
        return (jnp.clip(a3, -limit, limit) + 1) * (g * jax.nn.sigmoid(g * alpha))
    raise ValueError(f"expert_activation={activation!r} is not one of ('silu', 'gelu_tanh', 'clamped_swiglu')")


def _options(b1, b2, b3, activation, alpha, limit):
    """(biases, options): ``()`` or ``(b1, b2, b3)``, and ``None`` for SwiGLU without biases (the
    original code path) else ``(activation, alpha, limit)``. Raises ``ValueError`` for some biases only."""
    given = [b is not None for b in (b1, b2, b3)]
    if any(given) and not all(given):
        raise ValueError(f"expert biases b1, b2, b3 go together (given: {given})")
    biases = (b1, b2, b3) if all(given) else ()
    if activation == "silu" and not biases:
        return (), None
    gated_activation(jnp.zeros((0,)), jnp.zeros((0,)), activation)  # ValueError for an unknown name
    return biases, (activation, float(alpha), float(limit))


def expert_mlp(x, w1, w2, w3, biases=(), options=None):
    """One expert: ``act(x @ w1 + b1, x @ w3 + b3) @ w2 + b2``; x (n, D), w1/w3 (D, H), w2 (H, D),
    biases () or (b1 (H,), b2 (D,), b3 (H,)); ``options`` None: ``swiglu``."""
    if options is None:
        return swiglu(x, w1, w2, w3)
    a1, a3 = x @ w1, x @ w3
    if biases:
        a1, a3 = a1 + biases[0], a3 + biases[2]
    y = gated_activation(a1, a3, *options) @ w2
    return y + biases[1] if biases else y


def _bias_rows(b, expert):
    """(rows, n) bias of each row's expert, zero for padding rows (expert E); b (E, n)."""
    return jnp.concatenate([b, jnp.zeros((1, b.shape[-1]), b.dtype)])[expert]


def _expert_of_rows(counts: jax.Array, num_rows: int) -> jax.Array:
    """(num_rows,) int32 expert id of each expert-major row; padding rows past counts.sum() get E."""
    ends = jnp.cumsum(counts)
    return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=counts.dtype), side="right").astype(jnp.int32)


# --------------------------------------------------------------------------------------- ragged_dot
def _ragged_swiglu(w1, w2, w3, x, counts):
    h = jax.nn.silu(lax.ragged_dot(x, w1, counts)) * lax.ragged_dot(x, w3, counts)
    return lax.ragged_dot(h, w2, counts)


def _ragged_glu(w1, w2, w3, x, counts, biases, options):
    """``_ragged_swiglu`` with biases (per row, by expert) and/or another activation."""
    a1, a3 = lax.ragged_dot(x, w1, counts), lax.ragged_dot(x, w3, counts)
    if biases:
        expert = _expert_of_rows(counts, x.shape[0])
        a1, a3 = a1 + _bias_rows(biases[0], expert), a3 + _bias_rows(biases[2], expert)
    y = lax.ragged_dot(gated_activation(a1, a3, *options), w2, counts)
    return y + _bias_rows(biases[1], expert) if biases else y


def ragged_dot_kernel(w1, w2, w3, x, counts, *, b1=None, b2=None, b3=None, activation="silu", alpha=1.702,
                      limit=7.0):
    """``jax.lax.ragged_dot`` grouped GEMMs: the GPU/TPU path (dense over every expert on CPU).

    NOTE: on CPU, JAX lowers ``ragged_dot`` to one dot over every group with the rows of the other
    groups zeroed, so a NaN or Inf weight of one expert gives ``0 * inf = NaN`` in every row (and,
    through the backward, in every expert's gradient). There, weights that are not all finite take
    the ``dense`` kernel instead (a ``lax.cond``: finite weights keep the ragged_dot bits; the
    check reads the weights once). GPU/TPU lower to XLA's ragged-dot instruction; not checked
    there in this project (no device so far).
    """
    counts = counts.astype(jnp.int32)
    biases, options = _options(b1, b2, b3, activation, alpha, limit)
    if options is not None:
        ragged = functools.partial(_ragged_glu, biases=biases, options=options)
        if jax.default_backend() != "cpu":
            return ragged(w1, w2, w3, x, counts)
        finite = functools.reduce(jnp.logical_and, [jnp.isfinite(t).all() for t in (w1, w2, w3, *biases)])

        def dense(w1, w2, w3, x, counts):
            return _dense(w1, w2, w3, x, counts, biases, options)

        return lax.cond(finite, ragged, jax.checkpoint(dense), w1, w2, w3, x, counts)
    if jax.default_backend() != "cpu":
        return _ragged_swiglu(w1, w2, w3, x, counts)
    finite = jnp.isfinite(w1).all() & jnp.isfinite(w2).all() & jnp.isfinite(w3).all()
    # NOTE: dense under remat, so that under grad the cond does not carry (and zero-fill on the
    # ragged_dot side) dense's E-times-larger residuals
    return lax.cond(finite, _ragged_swiglu, jax.checkpoint(dense_kernel), w1, w2, w3, x, counts)


# -------------------------------------------------------------------------------------------- dense
def _dense(w1, w2, w3, x, counts, biases, options):
    """``dense_kernel`` with biases and/or another activation (``expert_mlp`` per expert)."""
    expert = _expert_of_rows(counts.astype(jnp.int32), x.shape[0])
    keep = expert[None, :, None] == jnp.arange(w1.shape[0])[:, None, None]  # (E, rows, 1)
    zero = jnp.zeros((), x.dtype)
    x_own = jnp.where(keep, x[None], zero)  # (E, rows, D)
    mlp = functools.partial(expert_mlp, options=options)
    y_all = jax.vmap(lambda xe, a, b, c, bs: mlp(xe, a, b, c, bs))(x_own, w1, w2, w3, biases)
    return jnp.where(keep, y_all, zero).sum(0)


def dense_kernel(w1, w2, w3, x, counts, *, b1=None, b2=None, b3=None, activation="silu", alpha=1.702, limit=7.0):
    """Every expert on every row, then keep each row's own expert: exact, slow, the reference path.

    Memory ``E * num_rows * max(D, H)``: for tests and small layers only.

    NOTE: each expert sees only its own rows, the others replaced by zeros with a select (before the
    expert and on its output), so the gradient of ``where`` is a select too: a NaN or Inf of one
    expert (weights, activations, a token) cannot reach another expert's rows or weight gradients
    through ``0 * inf``. Options: see ``gated_activation`` and the note above it.
    """
    biases, options = _options(b1, b2, b3, activation, alpha, limit)
    if options is not None:
        return _dense(w1, w2, w3, x, counts, biases, options)
    expert = _expert_of_rows(counts.astype(jnp.int32), x.shape[0])
    keep = expert[None, :, None] == jnp.arange(w1.shape[0])[:, None, None]  # (E, rows, 1)
    zero = jnp.zeros((), x.dtype)
    x_own = jnp.where(keep, x[None], zero)  # (E, rows, D)
    y_all = jax.vmap(swiglu)(x_own, w1, w2, w3)  # (E, rows, D)
    # NOTE: a sum of exact zeros and one value, so the result is exactly that expert's output.
    return jnp.where(keep, y_all, zero).sum(0)


# ------------------------------------------------------------------------------------------- static
def buffer_layout(counts: jax.Array, num_rows: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Where each expert-major row goes in fixed ``[E, capacity]`` buffers (DESIGN.md step 6a).

    counts (E,) int rows per expert; rows past ``counts.sum()`` and rows past an expert's
    ``capacity`` are not placed. Returns ``dest`` (num_rows,) int32, the flat buffer row
    ``expert * capacity + position`` (``E * capacity``, out of range, for rows not placed), and
    ``placed`` (num_rows,) bool.
    """
    counts = counts.astype(jnp.int32)
    e = counts.shape[0]
    expert = _expert_of_rows(counts, num_rows)  # E for rows past counts.sum()
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(num_rows, dtype=jnp.int32) - starts[jnp.minimum(expert, e - 1)]
    placed = (expert < e) & (pos < capacity)
    return jnp.where(placed, expert * capacity + pos, e * capacity).astype(jnp.int32), placed


def static_kernel(w1, w2, w3, x, counts, capacity: int | None = None, *, b1=None, b2=None, b3=None,
                  activation="silu", alpha=1.702, limit=7.0):
    """Fixed-shape expert buffers: rows scattered into ``[E, capacity, D]`` (zeros where empty), one
    batched GEMM chain over all experts, the rows gathered back. Every shape is static, nothing is
    ragged (the TPU-friendly capacity path of GShard / Switch / MaxText).

    ``capacity`` (rows per expert, a Python int) defaults to the number of rows, which holds any
    split (memory ``E * rows * D``); ``moe_jax.MoE`` with a capacity passes ``G * C``. Rows past
    ``counts.sum()`` or past an expert's capacity get a zero output.

    NOTE: the buffers are filled by a scatter of whole rows and read by a gather, not by one-hot
    einsums as in MaxText's dense path: a product with a 0/1 mask would carry ``0 * inf = NaN`` from
    one token into every buffer row, which the degenerate-input contract (DESIGN.md) forbids.
    """
    rows, dim = x.shape
    e = w1.shape[0]
    cap = rows if capacity is None else int(capacity)
    dest, placed = buffer_layout(counts, rows, cap)
    buffers = jnp.zeros((e * cap, dim), x.dtype).at[dest].set(x, mode="drop").reshape(e, cap, dim)
    biases, options = _options(b1, b2, b3, activation, alpha, limit)
    if options is None:
        y = jax.vmap(swiglu)(buffers, w1, w2, w3).reshape(e * cap, dim)
    else:  # (7) biases / another activation; empty buffer rows give act(b1, b3) W2 + b2, not read back
        y = jax.vmap(lambda xe, a, b, c, bs: expert_mlp(xe, a, b, c, bs, options))(
            buffers, w1, w2, w3, biases).reshape(e * cap, dim)
    return jnp.where(placed[:, None], y.at[dest].get(mode="fill", fill_value=0), jnp.zeros((), x.dtype))


# ------------------------------------------------------------------------------------------ blocked
def _segments(counts, block):
    """Per expert: first row, number of ``block``-row blocks covering its rows."""
    counts = counts.astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    return starts, (counts + block - 1) // block


def _zeros(shape, dtype, *like):
    """Zeros that vary over the same ``shard_map`` axes as ``like`` (so loop carries type-check with
    ``check_vma=True``): ``lax.full_like`` carries its argument's varying axes; adding scalar zeros
    is exact and folded away by XLA."""
    z = lax.full_like(like[0], 0, dtype, shape)
    for a in like[1:]:
        z = z + lax.full_like(a, 0, dtype, ())
    return z


def _upcast_matmuls(dtype) -> bool:
    """True where the block matmuls run on float32 operands: 16-bit floats on CPU, whose XLA dot in
    bf16/f16 is several times slower than in float32. Same semantics (float32 accumulation, one
    rounding of each matmul output to ``dtype``), see DESIGN.md (7)."""
    return jnp.dtype(dtype).itemsize == 2 and jax.default_backend() == "cpu"


def _storage(dtype):
    """(storage dtype, to storage, from storage): on CPU, 16-bit float buffers (x, dy, the weights,
    the outputs and the weight gradients) are carried as ``uint16`` bit patterns, because XLA CPU
    converts a whole bf16 buffer to float32 and back around every ``dynamic_update_slice`` /
    ``select`` into it (per block: 8x slower), and hoists the float32 upcast of a sliced bf16 input
    out of the loop (a float32 copy of all three weight tensors). Bit-exact. Measured at the issue-7
    medium config, bf16 forward+backward under jit: weights and weight gradients as ``uint16`` took
    the compiled temp memory from 962 to 711 MiB and the time from 6.3 to 4.5 s, same bits."""
    if not _upcast_matmuls(dtype):
        return dtype, (lambda a: a), (lambda a: a)
    return (jnp.uint16, lambda a: lax.bitcast_convert_type(a, jnp.uint16),
            lambda a: lax.bitcast_convert_type(a, dtype))


def _mm(a, b, mm_dtype, dtype):
    """``a @ b`` on ``mm_dtype`` operands, accumulated in ``mm_dtype``, rounded once to ``dtype``."""
    return jnp.dot(a.astype(mm_dtype), b, preferred_element_type=mm_dtype).astype(dtype)


def _blocked_forward(w1, w2, w3, x, counts, block, save_residuals, biases=(), options=None):
    """Loop over experts, then over the blocks of that expert's rows; returns y and the residuals.

    ``biases`` () or (b1, b2, b3), ``options`` None (SwiGLU: the original ops) or (activation, alpha,
    limit); the residuals are then the biased pre-activations.

    NOTE: a block starting at ``r = start + i * block`` may run past the expert's last row into the
    next expert's rows; those output rows are written with wrong values but are overwritten when the
    next expert (processed later) writes its own blocks, so no row gather is needed. No padded copy
    of ``x`` either: near the end ``lax.dynamic_slice`` clamps the start to ``rows - block`` and the
    rows before ``r`` (already final) keep their values (a masked write).
    """
    rows, dim = x.shape
    hidden = w1.shape[-1]
    dtype = x.dtype
    starts, nblocks = _segments(counts, block)
    offsets = jnp.arange(block)
    mm_dtype = jnp.float32 if _upcast_matmuls(dtype) else dtype
    mm = functools.partial(_mm, mm_dtype=mm_dtype, dtype=dtype)
    st, to_st, from_st = _storage(dtype)
    xs = to_st(x)
    ws = tuple(to_st(w) for w in (w1, w2, w3))
    y = _zeros((rows, dim), st, x, w1, w2, w3, counts)
    # pre-activations x W1, x W3 for the backward pass (a zero-size stand-in when not needed)
    h_rows = rows if save_residuals else 0
    h1 = _zeros((h_rows, hidden), st, x, w1, w2, w3, counts)
    h3 = _zeros((h_rows, hidden), st, x, w1, w2, w3, counts)

    def put(buf, val, rc, keep):
        old = lax.dynamic_slice_in_dim(buf, rc, block)
        return lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, old, to_st(val)), rc, 0)

    bs = tuple(to_st(b) for b in biases)

    def expert_body(e, carry):
        w1e, w2e, w3e = (from_st(w[e]).astype(mm_dtype) for w in ws)
        b1e, b2e, b3e = (from_st(b[e]) for b in bs) if bs else (None, None, None)

        def block_body(i, carry):
            y, h1, h3 = carry
            r = starts[e] + i * block
            rc = jnp.minimum(r, rows - block)  # the start dynamic_slice uses
            keep = (rc + offsets < r)[:, None]  # rows of earlier experts inside a clamped block
            xb = from_st(lax.dynamic_slice_in_dim(xs, rc, block))
            a1, a3 = mm(xb, w1e), mm(xb, w3e)
            if options is None:
                yb = mm(jax.nn.silu(a1) * a3, w2e)
            else:  # (7) biases in x's dtype, another activation
                if bs:
                    a1, a3 = a1 + b1e, a3 + b3e
                yb = mm(gated_activation(a1, a3, *options), w2e)
                if bs:
                    yb = yb + b2e
            if save_residuals:
                h1 = put(h1, a1, rc, keep)
                h3 = put(h3, a3, rc, keep)
            return put(y, yb, rc, keep), h1, h3

        return lax.fori_loop(0, nblocks[e], block_body, carry)

    y, h1, h3 = lax.fori_loop(0, w1.shape[0], expert_body, (y, h1, h3))
    return from_st(y), (h1, h3)  # residuals stay in the storage dtype


def _blocked_backward(w1, w2, w3, x, counts, h1, h3, dy, block, biases=(), options=None):
    """Gradients of ``_blocked_forward`` from its residuals (pre-activations ``h1 = x W1``, ``h3``).

    With ``options`` (biases / another activation) the activation's derivative is ``jax.vjp`` of
    ``gated_activation`` on the saved (biased) pre-activations, and the bias gradients are the sums
    of this expert's rows of ``d1``, ``dy``, ``d3`` (accumulated like the weight gradients). Returns
    ``(dw1, dw2, dw3, dx)``, then ``(db1, db2, db3)`` when there are biases."""
    rows, dim = x.shape
    dtype = x.dtype
    starts, nblocks = _segments(counts, block)
    ends = starts + counts.astype(jnp.int32)
    offsets = jnp.arange(block)
    acc = jnp.promote_types(dtype, jnp.float32)  # weight gradients accumulate over blocks in f32+
    mm_dtype = jnp.float32 if _upcast_matmuls(dtype) else dtype
    st, to_st, from_st = _storage(dtype)
    xs, dys = to_st(x), to_st(dy)
    ws = tuple(to_st(w) for w in (w1, w2, w3))
    dx = _zeros((rows, dim), st, x, dy, h1, h3, w1, w2, w3, counts)
    mm = functools.partial(_mm, mm_dtype=mm_dtype, dtype=dtype)

    def dot_acc(a, b):
        return jnp.dot(a.astype(mm_dtype), b.astype(mm_dtype), preferred_element_type=acc)

    def expert_body(e, carry):
        dx, dw1, dw2, dw3, *dbs = carry
        # transposed weights, once per expert
        w1t, w2t, w3t = (from_st(w[e]).T.astype(mm_dtype) for w in ws)

        def block_body(i, carry):
            dx, g1, g2, g3, *gbs = carry
            r = starts[e] + i * block
            rc = jnp.minimum(r, rows - block)
            pos = rc + offsets
            keep = (pos < r)[:, None]
            valid = (pos >= r)[:, None] & (pos < ends[e])[:, None]

            def own(t):  # this expert's rows of a matmul operand, the others exactly 0
                return jnp.where(valid, t.astype(mm_dtype), 0)

            # NOTE: rows of other experts inside this block (x, their saved activations: inf or NaN
            # when that expert overflowed) contribute nothing to this expert's weights. They are
            # zeroed by selects, never multiplied by a 0/1 mask (inf * 0 = NaN would leak); the
            # selects act on the matmul operands (after the cast to mm_dtype, so the 16-bit path
            # keeps its bits). Their dx rows are discarded (``keep``) or overwritten later.
            xb = from_st(jnp.where(valid, lax.dynamic_slice_in_dim(xs, rc, block), 0))
            dyb = from_st(jnp.where(valid, lax.dynamic_slice_in_dim(dys, rc, block), 0))
            a1 = from_st(lax.dynamic_slice_in_dim(h1, rc, block))
            a3 = from_st(lax.dynamic_slice_in_dim(h3, rc, block))
            if options is None:
                sig = jax.nn.sigmoid(a1)
                silu = a1 * sig
                g2 = g2 + dot_acc(jnp.where(valid.T, (silu * a3).T.astype(mm_dtype), 0), dyb)
                dh = mm(dyb, w2t)
                d1 = dh * a3 * (sig * (1 + a1 * (1 - sig)))
                d3 = dh * silu
            else:
                act, act_vjp = jax.vjp(lambda p, q: gated_activation(p, q, *options), a1, a3)
                g2 = g2 + dot_acc(jnp.where(valid.T, act.T.astype(mm_dtype), 0), dyb)
                dh = mm(dyb, w2t)
                d1, d3 = act_vjp(dh)
            xbt = xb.T
            g1 = g1 + dot_acc(xbt, own(d1))
            g3 = g3 + dot_acc(xbt, own(d3))
            if gbs:  # bias gradients: sums of this expert's rows (dyb is already 0 on the others)
                gbs = [gbs[0] + jnp.where(valid, d1, 0).astype(acc).sum(0), gbs[1] + dyb.astype(acc).sum(0),
                       gbs[2] + jnp.where(valid, d3, 0).astype(acc).sum(0)]
            dxb = mm(d1, w1t) + mm(d3, w3t)
            old = lax.dynamic_slice_in_dim(dx, rc, block)
            return (lax.dynamic_update_slice_in_dim(dx, jnp.where(keep, old, to_st(dxb)), rc, 0), g1, g2, g3,
                    *gbs)

        zeros = tuple(_zeros(w.shape[1:], acc, w, x, dy, h1, h3, counts) for w in (w1, w2, w3, *biases))
        dx, g1, g2, g3, *gbs = lax.fori_loop(0, nblocks[e], block_body, (dx, *zeros))
        dbs = [db.at[e].set(to_st(g.astype(dtype))) for db, g in zip(dbs, gbs, strict=True)]
        return (dx, dw1.at[e].set(to_st(g1.astype(dtype))), dw2.at[e].set(to_st(g2.astype(dtype))),
                dw3.at[e].set(to_st(g3.astype(dtype))), *dbs)

    like = (x, dy, h1, h3, counts)
    init = (dx, *(_zeros(w.shape, st, w1, w2, w3, *like) for w in (w1, w2, w3, *biases)))
    dx, dw1, dw2, dw3, *dbs = lax.fori_loop(0, w1.shape[0], expert_body, init)
    grads = (from_st(dw1), from_st(dw2), from_st(dw3), from_st(dx))
    return grads + tuple(from_st(db) for db in dbs) if biases else grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(w1, w2, w3, x, counts, block):
    return _blocked_forward(w1, w2, w3, x, counts, block, save_residuals=False)[0]


def _blocked_fwd(w1, w2, w3, x, counts, block):
    y, (h1, h3) = _blocked_forward(w1, w2, w3, x, counts, block, save_residuals=True)
    return y, (w1, w2, w3, x, counts, h1, h3)


def _blocked_bwd(block, res, dy):
    w1, w2, w3, x, counts, h1, h3 = res
    dw1, dw2, dw3, dx = _blocked_backward(w1, w2, w3, x, counts, h1, h3, dy, block)
    return dw1, dw2, dw3, dx, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _blocked_glu(w1, w2, w3, x, counts, biases, block, options):
    """``_blocked`` with biases (() or (b1, b2, b3)) and/or another activation (``options``)."""
    return _blocked_forward(w1, w2, w3, x, counts, block, False, biases, options)[0]


def _blocked_glu_fwd(w1, w2, w3, x, counts, biases, block, options):
    y, (h1, h3) = _blocked_forward(w1, w2, w3, x, counts, block, True, biases, options)
    return y, (w1, w2, w3, x, counts, biases, h1, h3)


def _blocked_glu_bwd(block, options, res, dy):
    w1, w2, w3, x, counts, biases, h1, h3 = res
    dw1, dw2, dw3, dx, *dbs = _blocked_backward(w1, w2, w3, x, counts, h1, h3, dy, block, biases, options)
    return dw1, dw2, dw3, dx, None, tuple(dbs)


_blocked_glu.defvjp(_blocked_glu_fwd, _blocked_glu_bwd)


def block_rows(num_rows: int, num_experts: int) -> int:
    """Static block size: ``BLOCK_ROWS``, or less (a power of two >= 8) when the mean rows per
    expert are fewer, so small batches (decoding, tests) do not pay for mostly-empty blocks."""
    mean_rows = -(-num_rows // num_experts)
    return int(min(BLOCK_ROWS, max(8, 1 << max(mean_rows - 1, 0).bit_length())))


def blocked_kernel(w1, w2, w3, x, counts, block: int | None = None, *, b1=None, b2=None, b3=None,
                   activation="silu", alpha=1.702, limit=7.0):
    """Blocks of ``block`` rows, each a dense ``(block, D) x (D, H)`` GEMM with its expert's weights.

    The fast CPU path: a loop over experts and, inside, over the ``ceil(count / block)`` blocks of
    that expert's rows (trip counts are data, shapes static), so the work is ``N*k`` rows plus at
    most ``block - 1`` rows per expert, with no gathered copy of the weights. Its gradient is written
    by hand (``jax.custom_vjp``) from the saved pre-activations, so the backward loop is as lean as
    the forward one. Rows past ``counts.sum()`` are ignored (their output is unspecified).
    ``block``: rows per block (default ``block_rows(rows, E)``). Options: see ``gated_activation``.
    """
    block = block or block_rows(x.shape[0], w1.shape[0])
    rows = x.shape[0]
    biases, options = _options(b1, b2, b3, activation, alpha, limit)
    if options is not None:
        xp = x if rows >= block else jnp.concatenate([x, lax.full_like(x, 0, shape=(block - rows, x.shape[1]))])
        return _blocked_glu(w1, w2, w3, xp, counts.astype(jnp.int32), tuple(biases), block, options)[:rows]
    if rows < block:  # tiny inputs: pad (static shapes) so every block fits inside the rows
        xp = jnp.concatenate([x, lax.full_like(x, 0, shape=(block - rows, x.shape[1]))])
        return _blocked(w1, w2, w3, xp, counts.astype(jnp.int32), block)[:rows]
    return _blocked(w1, w2, w3, x, counts.astype(jnp.int32), block)


KERNELS = {"ragged_dot": ragged_dot_kernel, "blocked": blocked_kernel, "dense": dense_kernel,
           "static": static_kernel}


def resolve_kernel(name: str, platform: str | None = None, dtype=None) -> str:
    """The kernel name that ``name`` stands for on ``platform`` (default: JAX's default backend).

    "auto": ``ragged_dot`` on GPU/TPU (a grouped GEMM there) and ``blocked`` on CPU, where it was
    measured 6.5x faster than ragged_dot's dense-over-experts lowering (whole MoE forward+backward,
    D=256, H=512, E=8, k=2, N=4096; the gap grows with E); float64 always gets ``blocked`` (plain
    XLA dots on every platform).
    Raises ValueError for a name that is not one of ``parity.config.JAX_KERNELS``.
    """
    if name not in JAX_KERNELS:
        raise ValueError(f"expert_kernel={name!r} is not a JAX kernel; allowed: {JAX_KERNELS}")
    if name != "auto":
        return name
    if dtype is not None and jnp.dtype(dtype) == jnp.float64:
        return "blocked"
    platform = platform or jax.default_backend()
    return "blocked" if platform == "cpu" else "ragged_dot"


def get_kernel(name: str, platform: str | None = None, dtype=None):
    """The kernel function for ``name`` ("auto" resolved for ``platform`` and ``dtype``)."""
    return KERNELS[resolve_kernel(name, platform, dtype)]
