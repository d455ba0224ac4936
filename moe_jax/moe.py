"""The MoE layer (Flax NNX): router, dispatch, experts, combine, shared expert. DESIGN.md steps (1)-(9).

Shapes: ``B`` batch, ``S`` sequence, ``N = B*S`` tokens, ``D`` dim, ``E`` experts, ``k`` = top_k.
Dispatch (``dispatch`` / ``permute``), expert compute (``GroupedExperts``) and ``combine`` are separate
functions so that expert parallelism (``moe_jax.parallel``) can put an exchange between them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.balancing import load_balance_loss, router_z_loss
from moe_jax.capacity import drop_tokens, run_experts
from moe_jax.experts import GroupedExperts
from moe_jax.feed_forward import FeedForward, normal_init
from moe_jax.norm import rms_norm
from moe_jax.router import TokenChoiceTopKRouter
from parity.config import BALANCE_FROM_COEFF, CAPACITY_FIELDS, JAX_KERNELS, MoEConfig, layer_config


class Buffer(nnx.Variable):
    """Non-trainable state (``expert_bias``, ``tokens_per_expert``): not a ``nnx.Param``, so ``nnx.grad``
    and optimizers leave it alone; saved with the canonical weights."""


# ------------------------------------------------------------------------------ dispatch / combine
@jax.custom_vjp
def permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[perm]`` for a permutation ``perm`` (with ``inverse[perm] == arange``) along axis 0.

    NOTE: the gradient is the inverse gather ``g[inverse]`` instead of the scatter-add JAX derives
    for a gather; scatters are slow on CPU and a permutation needs none.
    """
    return x[perm]


def _permute_rows_fwd(x, perm, inverse):
    return x[perm], (perm, inverse)


def _permute_rows_bwd(res, g):
    perm, inverse = res
    return g[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_tokens(tokens: jax.Array, order: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    """``tokens[order // k]``: each sorted row's token, (N, D) -> (N*k, D), without a repeated copy.

    NOTE: gradient by the inverse gather and a sum over the k slots, not by a scatter-add.
    """
    return tokens[order // k]


def _gather_tokens_fwd(tokens, order, inverse, k):
    return tokens[order // k], (order, inverse)


def _gather_tokens_bwd(k, res, g):
    order, inverse = res
    return g[inverse].reshape(-1, k, g.shape[-1]).sum(1), None, None


gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


def dispatch(selected_experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(6) Expert-major order of the N*k routed slots, by a stable sort (slots of one expert keep
    token order).

    selected_experts (N, k) int -> ``order`` (N*k,) int32 (flat slot index ``token * k + slot`` of each
    sorted row), ``inverse`` (N*k,) int32 (sorted row of each flat slot), ``counts`` (E,) int32.
    """
    flat = selected_experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, inverse, counts


def permute(tokens: jax.Array, routing_weights: jax.Array, order: jax.Array, inverse: jax.Array,
            score_before_experts: bool) -> jax.Array:
    """(6)/(8) The expert-major routed input: tokens (N, D), routing_weights (N, k) f32 -> (N*k, D).

    With ``score_before_experts`` each row is scaled by its routing weight in the router's dtype
    (float32, float64 for float64 input) and cast back to the input dtype (the order of the original
    PyTorch module).
    """
    n, k = routing_weights.shape
    rows = gather_tokens(tokens, order, inverse, k)
    if score_before_experts:
        w = permute_rows(routing_weights.reshape(-1), order, inverse)
        rows = (rows.astype(w.dtype) * w[:, None]).astype(tokens.dtype)
    return rows


def combine(expert_out: jax.Array, routing_weights: jax.Array, order: jax.Array, inverse: jax.Array,
            score_before_experts: bool) -> jax.Array:
    """(8) Sum each token's k expert outputs in float32 (float64 for float64 outputs): expert_out
    (N*k, D) sorted -> (N, D).

    Without ``score_before_experts`` the outputs are multiplied by their routing weights (float32)
    here (Mixtral, DeepSeek, Qwen, OLMoE). The caller casts back to the input dtype.
    """
    n, k = routing_weights.shape
    acc = jnp.promote_types(expert_out.dtype, jnp.float32)
    y = permute_rows(expert_out, inverse, order).astype(acc).reshape(n, k, expert_out.shape[-1])
    if not score_before_experts:
        y = y * routing_weights[..., None]
    return y.sum(1)


def _check_expert_range(lo, hi, *, num_experts: int) -> None:
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"selected_experts holds values in [{lo}, {hi}]; expected expert indices in "
                         f"[0, num_experts={num_experts})")


# --------------------------------------------------------------------------------------------- MoE
class MoE(nnx.Module):
    """Mixture of Experts with token-choice top-k routing; every option of ``parity.config.MoEConfig``.

    Build: ``MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0), param_dtype=jnp.float32)``, or with the
    positional arguments of ``moe_torch.MoE`` (``dim, hidden_dim, num_experts, top_k=1,
    score_before_experts=True, load_balance_coeff=None``) and every other field as a keyword, with
    the same defaults (``parity.config.layer_config``: a field given explicitly wins; one not given
    gets the original PyTorch module's behaviour: ``use_expert_bias=True``,
    ``route_order="scale_first"``, the "switch" loss when ``load_balance_coeff`` is a number).
    ``router_kwargs`` as in torch; torch's ``shared_expert`` module and ``use_grouped_mm`` have no
    JAX counterpart (``num_shared_experts`` / ``expert_kernel``). Invalid options raise ValueError
    naming the field, the value and what is allowed (an ``expert_kernel`` of another backend lists
    the JAX kernels). ``config`` is the ``MoEConfig`` of the live attributes; ``load_balance_coeff``
    reads None when no balance loss is on.

    State: ``router.gate`` (D, E) (and ``router.bias`` (E,) with ``router_bias``), ``experts.w1/w2/w3``
    (and ``experts.b1/b3`` (E, H), ``b2`` (E, D) with ``expert_proj_bias``; the activation by
    ``expert_activation``, DESIGN.md step 7), ``shared_expert`` (a ``FeedForward`` or None),
    ``shared_expert_gate`` ((D, 1), with ``shared_expert_gate=True``, or None), Gemma 4's
    ``router.scale`` (D,), ``router.per_expert_scale`` (E,) and ``expert_input_norm`` (D,) (with
    ``router_input_norm`` / ``per_expert_scale`` / ``expert_input_norm``, else None) as ``nnx.Param`` in
    ``param_dtype``; buffers ``expert_bias`` (E,) and ``tokens_per_expert`` (E,),
    always float32. Canonical names and layouts: ``moe_jax.load_state_dict`` / ``moe_jax.state_dict``.

    Mode: ``deterministic=False`` (training, the default, like a fresh torch module) makes every
    forward add its counts to ``tokens_per_expert``; ``module.eval()`` / ``module.train()`` switch it.

    Call: ``moe(x)`` -> out; ``moe(x, return_aux=True)`` -> (out, aux). ``x`` (B, S, D) in the
    parameters' dtype; out (B, S, D) same dtype. ``aux`` (float64 instead of f32 for float64 x): ``router_logits`` (N, E) f32, ``scores``
    (N, E) f32, ``selected_experts`` (N, k) int32, ``routing_weights`` (N, k) f32,
    ``tokens_per_expert`` (E,) f32 (this call), plus ``load_balance_loss`` / ``router_z_loss`` (scalar
    f32) when enabled. ``selected_experts=`` (N, k) int replaces step (4) (locked routing).
    With a capacity (step 6a, ``moe_jax.capacity``) ``aux`` also holds ``kept_slots`` (N, k) bool,
    ``routing_weights`` are the weights the combine uses (0 at dropped slots), and ``kept_slots=``
    (N, k) bool replaces the drop decision (a ValueError on a dropless layer).
    Raises ValueError for a wrong rank or last dimension or a ``selected_experts`` value outside
    [0, E) (under ``jit``: a host callback, surfacing as a JaxRuntimeError with that message),
    TypeError for a dtype mismatch or an ``x`` that is not an array (e.g. a list).

    Degenerate inputs (DESIGN.md): zero tokens (B = 0 or S = 0) give an empty ``out``, zero
    ``tokens_per_expert`` and losses exactly 0 (zero gradient). A token holding NaN is not checked:
    its scores are NaN, so it goes to experts 0..k-1 (NaN ranks last, ties to the lower index), is
    counted in ``tokens_per_expert`` and gives a NaN output row; other tokens are unaffected.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 1,
        score_before_experts: bool = True,
        load_balance_coeff: float | None = None,
        *,
        router_kwargs: dict | None = None,
        expert_kernel: str = "auto",
        load_balance_loss=BALANCE_FROM_COEFF,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        **kwargs,
    ):
        cfg = layer_config(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k,
                           score_before_experts=score_before_experts, load_balance_coeff=load_balance_coeff,
                           load_balance_loss=load_balance_loss, router_kwargs=router_kwargs,
                           expert_kernel=expert_kernel, **kwargs)
        if cfg.expert_kernel not in JAX_KERNELS:
            raise ValueError(f"expert_kernel={cfg.expert_kernel!r} is not a JAX kernel; allowed: {JAX_KERNELS}")
        self.dim, self.hidden_dim, self.num_experts = cfg.dim, cfg.hidden_dim, cfg.num_experts
        self.num_shared_experts, self.shared_hidden_dim = cfg.num_shared_experts, cfg.shared_hidden_dim
        self.score_before_experts = cfg.score_before_experts
        self.use_expert_bias = cfg.use_expert_bias
        self.load_balance_loss = cfg.load_balance_loss
        self._balance_coeff = cfg.load_balance_coeff
        # (6a) capacity options, fixed at construction (a tuple: static, not state)
        self._capacity = tuple((f, getattr(cfg, f)) for f in CAPACITY_FIELDS)
        self._capacity_on = cfg.capacity_factor is not None or cfg.expert_capacity is not None
        self.router_z_loss_coeff = cfg.router_z_loss_coeff
        self.deterministic = False
        self.router = TokenChoiceTopKRouter(
            cfg.dim, cfg.num_experts, cfg.top_k, cfg.score_func, cfg.num_expert_groups, cfg.num_limited_groups,
            cfg.route_scale, route_norm=cfg.route_norm, group_score=cfg.group_score,
            route_order=cfg.route_order, route_norm_eps=cfg.route_norm_eps,
            route_norm_mode=cfg.route_norm_mode, route_norm_p=cfg.route_norm_p,
            router_input_norm=cfg.router_input_norm, per_expert_scale=cfg.per_expert_scale,
            input_norm_eps=cfg.input_norm_eps, router_bias=cfg.router_bias, rngs=rngs, param_dtype=param_dtype)
        self.experts = GroupedExperts(cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.expert_kernel, rngs=rngs,
                                      param_dtype=param_dtype, expert_activation=cfg.expert_activation,
                                      swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
                                      expert_proj_bias=cfg.expert_proj_bias)
        self.shared_expert = (FeedForward(cfg.dim, cfg.shared_dim, rngs=rngs, param_dtype=param_dtype)
                              if cfg.num_shared_experts else None)
        # (9) Qwen2-MoE's per-token sigmoid gate on the shared expert (x @ gate: D -> 1), or None
        self.shared_expert_gate = (nnx.Param(normal_init(rngs.params(), (cfg.dim, 1), cfg.dim, param_dtype))
                                   if cfg.shared_expert_gate else None)
        # (6) Gemma 4's RMSNorm weight (D,) of the routed experts' input (ones), or None
        self.expert_input_norm = (nnx.Param(jnp.ones((cfg.dim,), param_dtype)) if cfg.expert_input_norm
                                  else None)
        self.expert_bias = Buffer(jnp.zeros((cfg.num_experts,), jnp.float32))
        self.tokens_per_expert = Buffer(jnp.zeros((cfg.num_experts,), jnp.float32))

    @property
    def top_k(self) -> int:
        """The router's ``top_k``."""
        return self.router.top_k

    @property
    def load_balance_coeff(self) -> float | None:
        """The balance loss's coefficient, None when no balance loss is on (as ``moe_torch.MoE``)."""
        return None if self.load_balance_loss is None else self._balance_coeff

    @property
    def config(self) -> MoEConfig:
        """The ``MoEConfig`` of the live attributes (``MoE(**moe.config.to_kwargs(), rngs=...)`` builds the
        same layer)."""
        r = self.router
        return MoEConfig(
            dim=self.dim, hidden_dim=self.hidden_dim, num_experts=self.num_experts, top_k=r.top_k,
            score_func=r.score_func, route_norm=r.route_norm, route_scale=r.route_scale,
            num_expert_groups=r.num_expert_groups, num_limited_groups=r.num_limited_groups,
            group_score=r.group_score, route_order=r.route_order, route_norm_eps=r.route_norm_eps,
            route_norm_mode=r.route_norm_mode, route_norm_p=r.route_norm_p, input_norm_eps=r.input_norm_eps,
            router_input_norm=r.router_input_norm, per_expert_scale=r.per_expert_scale is not None,
            expert_input_norm=self.expert_input_norm is not None,
            router_bias=r.router_bias, expert_activation=self.experts.expert_activation,
            swiglu_alpha=self.experts.swiglu_alpha, swiglu_limit=self.experts.swiglu_limit,
            expert_proj_bias=self.experts.expert_proj_bias,
            score_before_experts=self.score_before_experts,
            num_shared_experts=self.num_shared_experts, shared_hidden_dim=self.shared_hidden_dim,
            shared_expert_gate=self.shared_expert_gate is not None,
            expert_kernel=self.experts.expert_kernel, use_expert_bias=self.use_expert_bias,
            load_balance_loss=self.load_balance_loss, load_balance_coeff=self._balance_coeff,
            router_z_loss_coeff=self.router_z_loss_coeff, **dict(self._capacity))

    def expert_tokens(self, tokens: jax.Array) -> jax.Array:
        """(6) What the routed experts see: ``tokens`` (N, D), or with ``expert_input_norm`` (Gemma 4)
        ``rms_norm(tokens) * expert_input_norm`` computed in float32 and cast to the tokens' dtype."""
        if self.expert_input_norm is None:
            return tokens
        return rms_norm(tokens, self.router.input_norm_eps, self.expert_input_norm[...]).astype(tokens.dtype)

    def _check_input(self, x: jax.Array, selected_experts: jax.Array | None) -> None:
        for name, value in (("x", x), ("selected_experts", selected_experts)):
            if value is not None and not isinstance(value, (jax.Array, np.ndarray)):
                raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got {type(value).__name__}; "
                                f"convert it first (jnp.asarray)")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [batch, seq_len, dim={self.dim}]")
        param_dtype = self.experts.w1.dtype
        if x.dtype != param_dtype:
            raise TypeError(f"x has dtype {x.dtype} but the expert weights are {param_dtype}; "
                            f"cast x (or build the MoE with param_dtype={x.dtype})")
        if selected_experts is None:
            return
        expected = (x.shape[0] * x.shape[1], self.top_k)
        if tuple(selected_experts.shape) != expected:
            raise ValueError(f"selected_experts has shape {tuple(selected_experts.shape)}; expected "
                             f"[num_tokens={expected[0]}, top_k={expected[1]}]")
        if not jnp.issubdtype(selected_experts.dtype, jnp.integer):
            raise TypeError(f"selected_experts has dtype {selected_experts.dtype}; expected an integer dtype")
        if selected_experts.size == 0:
            return
        check = functools.partial(_check_expert_range, num_experts=self.num_experts)
        lo, hi = jnp.min(selected_experts), jnp.max(selected_experts)
        if isinstance(selected_experts, jax.core.Tracer):
            # NOTE: under jit the values are known only on the device: a host callback raises there
            # (surfacing as a JaxRuntimeError whose message holds this ValueError's text)
            jax.debug.callback(check, lo, hi)
        else:
            check(lo, hi)

    def __call__(self, x: jax.Array, return_aux: bool = False, selected_experts: jax.Array | None = None,
                 kept_slots: jax.Array | None = None):
        self._check_input(x, selected_experts)
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        bias = self.expert_bias[...] if self.use_expert_bias else None
        # (1)-(5) router
        aux = self.router.route(tokens, expert_bias=bias, selected_experts=selected_experts)._asdict()
        idx, w = aux["selected_experts"], aux["routing_weights"]
        # (6a) capacity: each expert keeps its first C slots per group; dropped slots weigh 0
        kept, cap_cfg = None, self.config if self._capacity_on else None
        if cap_cfg is not None:
            kept, w, _ = drop_tokens(idx, w, cap_cfg, b, kept_slots)
            aux["routing_weights"], aux["kept_slots"] = w, kept
        elif kept_slots is not None:
            raise ValueError("kept_slots given but the layer is dropless (capacity_factor and expert_capacity "
                             "are None)")
        # (6) stable expert-major dispatch (dropped slots sort after every expert's: index E)
        order, inverse, counts = dispatch(idx if kept is None else jnp.where(kept, idx, self.num_experts),
                                          self.num_experts)
        aux["tokens_per_expert"] = counts.astype(jnp.float32)
        if kept is not None and cap_cfg.capacity_stats == "selected":
            aux["tokens_per_expert"] = jnp.bincount(idx.reshape(-1), length=self.num_experts).astype(jnp.float32)
        routed = permute(self.expert_tokens(tokens), w, order, inverse, self.score_before_experts)
        # (7) experts, in the input dtype
        if kept is None:
            expert_out = self.experts(routed, counts)
        else:
            expert_out = run_experts(self.experts, routed, counts, cap_cfg, b, s)
        # (8) combine in float32, back to the input dtype
        out = combine(expert_out, w, order, inverse, self.score_before_experts).astype(x.dtype)
        # (9) shared experts see every token (scaled by their sigmoid gate when there is one)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = jax.nn.sigmoid(tokens @ self.shared_expert_gate[...]) * shared
            out = out + shared
        if not self.deterministic:
            self.tokens_per_expert[...] = self.tokens_per_expert[...] + aux["tokens_per_expert"]
        if self.load_balance_loss is not None:
            aux["load_balance_loss"] = load_balance_loss(
                aux["scores"], idx, self.num_experts, self._balance_coeff, self.load_balance_loss,
                batch=b, kept=kept if cap_cfg is not None and cap_cfg.capacity_stats == "kept" else None)
        if self.router_z_loss_coeff > 0:
            aux["router_z_loss"] = router_z_loss(aux["router_logits"], self.router_z_loss_coeff)
        out = out.reshape(b, s, d)
        return (out, aux) if return_aux else out
