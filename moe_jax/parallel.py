"""Expert (and tensor) parallelism for ``moe_jax.MoE`` with ``jax.shard_map`` over a ``jax.sharding.Mesh``.

The JAX twin of ``moe_torch.parallel``, on JAX's own sharding engine (no runtime of our own).

Mesh axes (names are arguments; ``ep_axis`` and ``tp_axis`` may each be None):

- ``ep_axis`` (expert parallel): shards along it hold *different tokens* (the batch is split on its
  first axis) and ``E / ep`` experts each: ``experts.w1``, ``w3`` ``(E, D, H)`` and ``w2`` ``(E, H, D)``
  have ``PartitionSpec(ep, ...)`` on the expert axis.
- ``tp_axis`` (tensor parallel): shards along it hold *the same tokens* and a slice of every expert's
  hidden dim (``w1``/``w3`` ``P(ep, None, tp)``, ``w2`` ``P(ep, tp, None)``; the shared expert likewise,
  ``w1``/``w3`` ``P(None, tp)``, ``w2`` ``P(tp, None)``). The partial outputs are summed over ``tp``
  (``psum``) after ``w2``, as Megatron-LM's MLP (Shoeybi et al. 2019).

Dispatch (dropless; DESIGN.md step (6) then the exchange) has two implementations, chosen by
``exchange`` ("auto" picks by platform):

- ``"all_gather"`` (every platform; the CPU path, since XLA:CPU has no ``ragged-all-to-all``): each
  shard all-gathers the routed rows and their expert ids over ``ep`` (static shape
  ``ep * rows_per_shard``, the dropless worst case), sorts the rows of its own experts to the front in
  expert-major order (a stable sort: rows of one expert keep [source shard][token] order), runs its
  experts on them (rows of other shards' experts are padding, given zero counts and masked to zero)
  and returns every row to its token owner with ``psum_scatter`` (each row is non-zero on exactly
  one shard, so the sum is exact). Its transpose is the reverse pair, so autodiff needs nothing extra.
- ``"ragged_all_to_all"`` (GPU/TPU): ``jax.lax.ragged_all_to_all`` sends each shard only the rows of
  its experts. NOTE: XLA:CPU cannot run it, so this path is not exercised by the CPU test suite.

What is reduced where (all sums, never means, so nothing is scaled by a mesh size): an expert's
gradient on its owner shard already sums every shard's tokens (the transpose of the all-gather is a
reduce-scatter); replicated parameters (router gate, shared expert under EP) enter ``shard_map`` with
``P()`` and JAX sums their gradients over the axes their uses vary on. The aux losses are whole-batch
values (counts, summed router probabilities and squared log-sum-exps ``psum``-ed over ``ep``), equal
on every shard to the single-device value of the concatenated batch.

Two levels of API:

- Outside ``shard_map`` (the usual one): ``shard_moe(moe, mesh, ep_axis="ep")`` places the parameters
  with ``NamedSharding``; ``sharded_call(moe, x, mesh, ep_axis="ep", ...)`` runs the layer on a global
  ``x`` and returns global arrays (``aux["tokens_per_expert"]`` the whole batch's counts, which a
  training-mode forward adds to ``moe.tokens_per_expert``, so ``update_expert_bias(moe, lr)`` then
  matches a single device bit for bit). Works under ``jax.grad`` / ``nnx.grad`` and ``jit``.
- Inside your own ``shard_map`` (a whole training step on shards): ``parallel_call(moe, x, ep_axis=...)``
  on a module holding its shard of the parameters; ``moe.tokens_per_expert`` then counts this shard's
  tokens and ``moe_jax.update_expert_bias(moe, lr, group=ep_axis)`` sums them (``psum``) first, so every
  shard computes the same ``expert_bias``.

Errors (``ValueError``): a mesh without a named axis (the name given and the axis names present),
``num_experts`` not divisible by the ``ep`` size, ``hidden_dim`` / ``shared_hidden_dim`` not divisible
by the ``tp`` size, a batch not divisible by the ``ep`` size, an unknown ``exchange``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.balancing import load_balance_loss, router_z_loss
from moe_jax.capacity import drop_tokens
from moe_jax.moe import MoE, combine, dispatch, permute, permute_rows

__all__ = ["EXCHANGES", "axis_size", "check_parallel", "param_specs", "place", "shard_moe", "sharded_call",
           "parallel_call", "resolve_exchange"]

EXCHANGES = ("auto", "all_gather", "ragged_all_to_all")


# ------------------------------------------------------------------------------------ mesh checks
def axis_size(mesh: Mesh, name: str, what: str = "moe_jax.parallel") -> int:
    """Size of the mesh axis ``name``; ValueError naming ``name`` and the axis names present."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{what} needs a jax.sharding.Mesh, got {type(mesh).__name__}")
    if name not in mesh.axis_names:
        raise ValueError(f"{what}: the mesh has no axis named {name!r}; its axes are {tuple(mesh.axis_names)} "
                         f"(shape {dict(mesh.shape)}); build it with Mesh(devices, axis_names=(..., {name!r}, ...))")
    return mesh.shape[name]


def check_parallel(moe: MoE, mesh: Mesh, ep_axis: str | None = "ep", tp_axis: str | None = None,
                   dp_axis: str | tuple[str, ...] | None = None) -> tuple[int, int]:
    """Validate ``moe`` against ``mesh``; returns (ep size, tp size) (1 for an axis that is None).

    Raises ValueError for a missing axis (``dp_axis`` included), ``num_experts % ep``, ``hidden_dim % tp``
    or ``shared_hidden_dim % tp`` != 0, and when no axis is given; TypeError for a non-MoE module.
    """
    if not isinstance(moe, MoE):
        raise TypeError(f"moe_jax.parallel applies to a moe_jax.MoE, got {type(moe).__name__}")
    dp_axes = (_token_axes(dp_axis, None) or ())
    if ep_axis is None and tp_axis is None and not dp_axes:
        raise ValueError("moe_jax.parallel: give ep_axis and/or tp_axis (both are None)")
    for name in dp_axes:
        axis_size(mesh, name)
    ep = tp = 1
    if moe.experts.expert_proj_bias:  # NOTE: b1/b2/b3 are not sharded (nor b2 kept off the TP partial sums) yet
        raise ValueError("moe_jax.parallel: expert_proj_bias=True (experts.b1/b2/b3) is not supported yet")
    if ep_axis is not None:
        ep = axis_size(mesh, ep_axis)
        if moe.num_experts % ep:
            raise ValueError(f"moe_jax.parallel: num_experts={moe.num_experts} is not divisible by the "
                             f"{ep_axis!r} mesh size {ep}")
    if tp_axis is not None:
        tp = axis_size(mesh, tp_axis)
        hidden = moe.experts.hidden_dim
        if hidden % tp:
            raise ValueError(f"moe_jax.parallel: hidden_dim={hidden} is not divisible by the {tp_axis!r} "
                             f"mesh size {tp}")
        if moe.shared_expert is not None and moe.shared_expert.hidden_dim % tp:
            raise ValueError(f"moe_jax.parallel: shared_hidden_dim={moe.shared_expert.hidden_dim} is not "
                             f"divisible by the {tp_axis!r} mesh size {tp}")
    return ep, tp


def _spec_of(path: str, ep_axis: str | None, tp_axis: str | None) -> P:
    """PartitionSpec of the variable at ``path`` (internal NNX path, e.g. "experts.w1")."""
    if path in ("experts.w1", "experts.w3"):  # (E, D, H)
        return P(ep_axis, None, tp_axis)
    if path == "experts.w2":  # (E, H, D)
        return P(ep_axis, tp_axis, None)
    if path in ("shared_expert.w1", "shared_expert.w3"):  # (D, Hs)
        return P(None, tp_axis)
    if path == "shared_expert.w2":  # (Hs, D)
        return P(tp_axis, None)
    return P()  # router gate, expert_bias, tokens_per_expert: replicated


def param_specs(state: nnx.State, ep_axis: str | None = "ep", tp_axis: str | None = None) -> nnx.State:
    """The ``PartitionSpec`` of every variable of ``state`` (``nnx.state(moe)``), as a matching State."""

    def spec(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return _spec_of(".".join(n for n in names if n != "value"), ep_axis, tp_axis)

    return jax.tree_util.tree_map_with_path(spec, state)


def shard_moe(moe: MoE, mesh: Mesh, ep_axis: str | None = "ep", tp_axis: str | None = None,
              dp_axis: str | tuple[str, ...] | None = None) -> None:
    """Place ``moe``'s variables on ``mesh`` in place: expert weights ``NamedSharding(mesh, P(ep, ...))``
    (hidden dim on ``tp``), everything else replicated (over ``dp_axis`` everything is replicated;
    give it for a mesh of data-parallel axes only). Works in a multi-process run (``place``).
    Raises as ``check_parallel``."""
    check_parallel(moe, mesh, ep_axis, tp_axis, dp_axis)
    state = nnx.state(moe)
    specs = param_specs(state, ep_axis, tp_axis)
    placed = jax.tree.map(lambda a, s: place(a, NamedSharding(mesh, s)), state, specs)
    nnx.update(moe, placed)


def place(a, sharding: NamedSharding) -> jax.Array:
    """``a`` (a host or single-process array holding the *whole* value) as a global array on ``sharding``.

    In one process this is ``jax.device_put``; when ``sharding`` spans devices of other processes
    (``jax.distributed.initialize``), each process builds its own shards from its copy of ``a``
    (``jax.make_array_from_callback``), so every process must hold the same ``a``."""
    if sharding.is_fully_addressable:
        return jax.device_put(a, sharding)
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def resolve_exchange(exchange: str, platform: str | None = None) -> str:
    """"auto" -> "ragged_all_to_all" on GPU/TPU, "all_gather" on CPU (no ragged-all-to-all in XLA:CPU)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}")
    if exchange != "auto":
        return exchange
    platform = platform or jax.default_backend()
    return "all_gather" if platform == "cpu" else "ragged_all_to_all"


# --------------------------------------------------------------------- token exchange (in shard_map)
def _local_order(key: jax.Array, num_local: int):
    """Stable expert-major order of rows whose local expert is ``key`` (``num_local`` = not ours).

    Returns perm (rows,), inverse (rows,), local counts (num_local,), valid (rows,) bool.
    """
    perm = jnp.argsort(key, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32))
    counts = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    valid = jnp.arange(perm.shape[0]) < counts.sum()
    return perm, inverse, counts, valid


def gather_dispatch(routed: jax.Array, row_experts: jax.Array, num_experts: int, ep_axis: str):
    """(6) CPU-safe dropless dispatch: all-gather the routed rows over ``ep_axis``, keep this shard's.

    routed (R, D) expert-major rows of this shard; row_experts (R,) int32 their (global) experts.
    Returns rows (ep*R, D) sorted by local expert (rows of this shard's experts first, in
    [local expert][source shard][token] order; the rest padding), counts (E/ep,) int32, and the
    ``plan`` for ``gather_combine``.
    """
    ep = lax.axis_size(ep_axis)
    num_local = num_experts // ep
    all_rows = lax.all_gather(routed, ep_axis, tiled=True)  # (ep*R, D), [source shard][row]
    local = lax.all_gather(row_experts, ep_axis, tiled=True) - lax.axis_index(ep_axis) * num_local
    key = jnp.where((local >= 0) & (local < num_local), local, num_local)
    perm, inverse, counts, valid = _local_order(key, num_local)
    return permute_rows(all_rows, perm, inverse), counts, (perm, inverse, valid)


def gather_combine(y: jax.Array, plan, ep_axis: str) -> jax.Array:
    """Inverse of ``gather_dispatch``: y (ep*R, D) -> this shard's rows (R, D) by ``psum_scatter``.

    NOTE: padding rows are zeroed first (the blocked kernel leaves them unspecified); every row is then
    non-zero on its expert's shard only, so the reduce-scatter adds exact zeros.
    """
    perm, inverse, valid = plan
    y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))
    y = permute_rows(y, inverse, perm)  # back to [source shard][row]
    return lax.psum_scatter(y, ep_axis, scatter_dimension=0, tiled=True)


def ragged_dispatch(routed: jax.Array, counts: jax.Array, ep_axis: str):
    """(6) Dropless dispatch by ``jax.lax.ragged_all_to_all`` (GPU/TPU; not implemented on XLA:CPU).

    NOTE: untested on this project's CPU CI (XLA:CPU lacks ragged-all-to-all). Same contract as
    ``gather_dispatch``: routed (R, D) expert-major, counts (E,) this shard's counts ->
    rows (ep*R, D) local-expert-major (then padding), local counts (E/ep,), plan.
    """
    ep, me = lax.axis_size(ep_axis), lax.axis_index(ep_axis)
    num_local = counts.shape[0] // ep
    counts = counts.astype(jnp.int32)
    blocks = lax.all_gather(counts, ep_axis).reshape(ep, ep, num_local)  # [source, dest, local expert]
    sizes = blocks.sum(-1)  # rows [source -> dest]
    send = sizes[me]
    send_offsets = jnp.cumsum(send) - send
    recv = sizes[:, me]
    out_offsets = (jnp.cumsum(sizes, axis=0) - sizes)[me]  # where my rows start in each dest's buffer
    buf = jnp.zeros((ep * routed.shape[0], routed.shape[1]), routed.dtype)
    received = lax.ragged_all_to_all(routed, buf, send_offsets, send, out_offsets, recv, axis_name=ep_axis)
    seg_len = blocks[:, me, :].reshape(-1)  # received rows: [source][local expert] segments
    seg = jnp.searchsorted(jnp.cumsum(seg_len), jnp.arange(buf.shape[0]), side="right")
    key = jnp.where(seg < ep * num_local, seg % num_local, num_local)
    perm, inverse, local_counts, valid = _local_order(key, num_local)
    in_offsets_back = (jnp.cumsum(sizes, axis=1) - sizes)[:, me]  # where each source sent my block from
    plan = (perm, inverse, valid, recv, send, in_offsets_back, routed.shape[0])
    return permute_rows(received, perm, inverse), local_counts, plan


def ragged_combine(y: jax.Array, plan, ep_axis: str) -> jax.Array:
    """Inverse of ``ragged_dispatch``: rows back to their source shard by ``ragged_all_to_all``."""
    perm, inverse, valid, recv, send, in_offsets_back, rows = plan
    y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))
    y = permute_rows(y, inverse, perm)
    out = jnp.zeros((rows, y.shape[1]), y.dtype)
    return lax.ragged_all_to_all(y, out, jnp.cumsum(recv) - recv, recv, in_offsets_back, send,
                                 axis_name=ep_axis)


# -------------------------------------------------------------------------- per-shard forward
def _token_axes(dp_axis, ep_axis) -> tuple[str, ...] | None:
    """The mesh axes whose shards hold different tokens: ``dp_axis`` (a name or a tuple) and ``ep_axis``."""
    dp = () if dp_axis is None else (dp_axis,) if isinstance(dp_axis, str) else tuple(dp_axis)
    axes = (*dp, *(() if ep_axis is None else (ep_axis,)))
    return axes or None


def _global_losses(moe: MoE, aux: dict, batch: int, ep_axis: str | tuple[str, ...] | None) -> None:
    """Add the enabled aux losses to ``aux``: whole-batch values over ``ep_axis`` (an axis name or the
    tuple of token axes, dp and ep; formulas of ``moe_jax.balancing``; "switch"/z-loss from summed
    statistics, "sequence" from per-shard losses weighted by their batch; each shard holds whole sequences)."""
    scores, idx = aux["scores"], aux["selected_experts"]
    n, k = idx.shape
    e = moe.num_experts
    ep = 1 if ep_axis is None else lax.psum(1, ep_axis)  # the number of token shards
    dt = jnp.promote_types(scores.dtype, jnp.float32)

    def total(v):
        return v if ep_axis is None else lax.psum(v, ep_axis)

    # (6a) with capacity_stats="kept" the loss counts the kept slots only (still over N*k)
    kept = aux.get("kept_slots") if dict(moe._capacity)["capacity_stats"] == "kept" else None
    if moe.load_balance_loss == "switch":
        onehot = jax.nn.one_hot(idx, e, dtype=dt)
        if kept is not None:
            onehot = jnp.where(kept[..., None], onehot, jnp.zeros((), dt))
        counts = lax.stop_gradient(total(onehot.sum((0, 1))))
        probs = total((scores / scores.sum(-1, keepdims=True)).astype(dt).sum(0))
        n_all = n * ep
        aux["load_balance_loss"] = jnp.asarray(moe.load_balance_coeff * e, dt) * (
            (counts / (n_all * k)) * (probs / n_all)).sum()
    elif moe.load_balance_loss == "sequence":
        local = load_balance_loss(scores, idx, e, moe.load_balance_coeff, "sequence", batch=batch, kept=kept)
        aux["load_balance_loss"] = total(local * batch) / (batch * ep)
    if moe.router_z_loss_coeff > 0:
        if ep_axis is None:
            aux["router_z_loss"] = router_z_loss(aux["router_logits"], moe.router_z_loss_coeff)
        else:
            z = jax.nn.logsumexp(aux["router_logits"].astype(dt), axis=-1)
            aux["router_z_loss"] = jnp.asarray(moe.router_z_loss_coeff, dt) * total((z**2).sum()) / (n * ep)


def parallel_call(moe: MoE, x: jax.Array, *, ep_axis: str | None = "ep", tp_axis: str | None = None,
                  return_aux: bool = False, selected_experts: jax.Array | None = None,
                  exchange: str = "auto", dp_axis: str | tuple[str, ...] | None = None):
    """``moe(x)`` on one shard, inside ``shard_map`` over ``dp_axis`` / ``ep_axis`` / ``tp_axis``.

    ``moe`` holds this shard's parameters (``E / ep`` experts, ``H / tp`` hidden units; the rest whole);
    ``x`` (b, S, D) this shard's sequences (different along ``dp`` and ``ep``, the same along ``tp``);
    ``selected_experts`` (b*S, k) or None. Returns out (b, S, D) and, with ``return_aux``, the aux dict
    of ``MoE.__call__`` for this shard's tokens (``tokens_per_expert`` its own counts) with the losses
    as whole-batch values (over dp x ep). A training-mode module adds its own counts to
    ``tokens_per_expert``; follow with ``moe_jax.update_expert_bias(moe, lr, group=(dp_axis, ep_axis))``.
    ``dp_axis`` (data parallel): shards holding other tokens and the same experts; the exchange stays
    within ``ep_axis``.
    """
    moe._check_input(x, selected_experts)
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    bias = moe.expert_bias[...] if moe.use_expert_bias else None
    # (1)-(5) router, replicated: every shard routes its own tokens over all E experts
    aux = moe.router.route(tokens, expert_bias=bias, selected_experts=selected_experts)._asdict()
    idx, w = aux["selected_experts"], aux["routing_weights"]
    # (6a) capacity over this shard's tokens: each shard holds whole sequences, so "sequence" groups
    # are those of one device; "batch" groups are this shard's batch (DESIGN.md, step 6a)
    kept = None
    if moe._capacity_on:
        kept, w, _ = drop_tokens(idx, w, moe.config, b)
        aux["routing_weights"], aux["kept_slots"] = w, kept
    routed_idx = idx if kept is None else jnp.where(kept, idx, moe.num_experts)  # dropped: no expert
    # (6) stable expert-major dispatch on this shard, then the exchange over ep
    order, inverse, counts = dispatch(routed_idx, moe.num_experts)
    aux["tokens_per_expert"] = counts.astype(jnp.float32)
    if kept is not None and dict(moe._capacity)["capacity_stats"] == "selected":
        aux["tokens_per_expert"] = jnp.bincount(idx.reshape(-1), length=moe.num_experts).astype(jnp.float32)
    routed = permute(moe.expert_tokens(tokens), w, order, inverse, moe.score_before_experts)  # (6) Gemma 4's norm
    if ep_axis is not None:
        if resolve_exchange(exchange) == "all_gather":
            rows, local_counts, plan = gather_dispatch(routed, routed_idx.reshape(-1)[order], moe.num_experts,
                                                       ep_axis)
        else:
            rows, local_counts, plan = ragged_dispatch(routed, counts, ep_axis)
    else:
        rows, local_counts = routed, counts
    # (7) this shard's experts (its slice of the hidden dim under tp)
    y = moe.experts(rows, local_counts)
    if ep_axis is not None:
        combine_back = gather_combine if resolve_exchange(exchange) == "all_gather" else ragged_combine
        y = combine_back(y, plan, ep_axis)
    if tp_axis is not None:
        y = lax.psum(y, tp_axis)  # partial sums over the hidden slices
    if kept is not None:  # (6a) the dropped rows (after every kept row) add exactly nothing
        y = jnp.where((jnp.arange(y.shape[0]) < counts.sum())[:, None], y, jnp.zeros((), y.dtype))
    # (8) combine in float32, back to the input dtype
    out = combine(y, w, order, inverse, moe.score_before_experts).astype(x.dtype)
    # (9) shared experts see every token
    if moe.shared_expert is not None:
        shared = moe.shared_expert(tokens)
        shared = shared if tp_axis is None else lax.psum(shared, tp_axis)
        if moe.shared_expert_gate is not None:  # its sigmoid gate (replicated, like the router gate)
            shared = jax.nn.sigmoid(tokens @ moe.shared_expert_gate[...]) * shared
        out = out + shared
    if not moe.deterministic:
        moe.tokens_per_expert[...] = moe.tokens_per_expert[...] + aux["tokens_per_expert"]
    _global_losses(moe, aux, b, _token_axes(dp_axis, ep_axis))
    out = out.reshape(b, s, d)
    return (out, aux) if return_aux else out


# ------------------------------------------------------------------------------ outside shard_map
@functools.lru_cache(maxsize=64)
def _sharded_fn(graphdef, mesh: Mesh, specs_leaves, specs_def, ep_axis, tp_axis, exchange, with_sel, aux_keys,
                dp_axis=None, top_k=1):
    """The jitted ``shard_map`` of ``parallel_call`` for one module structure and mesh (cached).

    Without ``with_sel`` the function takes (state, x) only (no host array to place: in a
    multi-process run every argument must be a global array)."""
    specs = jax.tree_util.tree_unflatten(specs_def, specs_leaves)
    axes = _token_axes(dp_axis, ep_axis)
    tok = P(axes)

    def body(state, x, sel):
        m = nnx.merge(graphdef, state)
        m.deterministic = True  # counts are added outside, as whole-batch counts
        out, aux = parallel_call(m, x, ep_axis=ep_axis, tp_axis=tp_axis, dp_axis=dp_axis, return_aux=True,
                                 selected_experts=sel if with_sel else None, exchange=exchange)
        if axes is not None:
            aux["tokens_per_expert"] = lax.psum(aux["tokens_per_expert"], axes)
        return out, aux

    aux_specs = {"router_logits": tok, "scores": tok, "selected_experts": tok, "routing_weights": tok,
                 "tokens_per_expert": P(), "load_balance_loss": P(), "router_z_loss": P(), "kept_slots": tok}
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(specs, tok, tok),
                           out_specs=(tok, {k: aux_specs[k] for k in aux_keys}), check_vma=False)
    if with_sel:
        return jax.jit(mapped)
    return jax.jit(lambda state, x: mapped(state, x, jnp.zeros((x.shape[0] * x.shape[1], top_k), jnp.int32)))


def sharded_call(moe: MoE, x: jax.Array, mesh: Mesh, *, ep_axis: str | None = "ep", tp_axis: str | None = None,
                 return_aux: bool = False, selected_experts: jax.Array | None = None, exchange: str = "auto",
                 dp_axis: str | tuple[str, ...] | None = None):
    """``moe(x)`` with data (``dp_axis``), expert (``ep_axis``) and/or tensor (``tp_axis``) parallelism over ``mesh``.

    ``x`` (B, S, D) global, split on B over ``dp_axis`` x ``ep_axis`` (``B % (dp * ep) == 0``);
    ``selected_experts`` (B*S, k) or None (locked routing). Returns global arrays as ``MoE.__call__``
    does: out (B, S, D) and, with ``return_aux``, the aux dict of the whole batch (``tokens_per_expert``
    summed over shards, losses whole-batch values). A training-mode ``moe`` adds the whole batch's counts
    to ``moe.tokens_per_expert``. Differentiable (``jax.grad`` / ``nnx.grad``): expert gradients are
    the full ones (never scaled by ``ep``; summed over ``dp`` by ``shard_map``'s transpose, as the
    experts are replicated there), replicated parameters get the whole batch's gradient. Works the
    same in a multi-process run (``jax.distributed.initialize``, ``mesh`` over ``jax.devices()``)
    with ``x`` and ``moe``'s variables global arrays (``shard_moe``, ``jax.make_array_from_callback``).
    Raises as ``check_parallel``, plus ValueError for a batch not divisible by ``dp * ep``.
    """
    ep, _ = check_parallel(moe, mesh, ep_axis, tp_axis, dp_axis)
    shards = math.prod(mesh.shape[a] for a in (_token_axes(dp_axis, ep_axis) or ()))
    resolve_exchange(exchange)
    moe._check_input(x, selected_experts)
    if x.shape[0] % shards:
        what = f"the {ep_axis!r} mesh size {ep}" if dp_axis is None else f"the {shards} token shards (dp x ep)"
        raise ValueError(f"x has batch {x.shape[0]}, not divisible by {what}: each shard takes whole sequences")
    graphdef, state = nnx.split(moe)
    leaves, treedef = jax.tree_util.tree_flatten(param_specs(state, ep_axis, tp_axis))
    aux_keys = ("router_logits", "scores", "selected_experts", "routing_weights", "tokens_per_expert")
    aux_keys += ("load_balance_loss",) * (moe.load_balance_loss is not None)
    aux_keys += ("router_z_loss",) * (moe.router_z_loss_coeff > 0)
    aux_keys += ("kept_slots",) * moe._capacity_on  # (6a)
    fn = _sharded_fn(graphdef, mesh, tuple(leaves), treedef, ep_axis, tp_axis, exchange,
                     selected_experts is not None, aux_keys, dp_axis, moe.top_k)
    if selected_experts is None:
        out, aux = fn(state, x)
    else:
        out, aux = fn(state, x, jnp.asarray(selected_experts, jnp.int32))
    if not moe.deterministic:
        moe.tokens_per_expert[...] = moe.tokens_per_expert[...] + aux["tokens_per_expert"]
    return (out, aux) if return_aux else out
