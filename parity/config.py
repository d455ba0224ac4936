"""One configuration for the MoE layer, shared by ``moe_torch``, ``moe_jax`` and the harness.

Pure Python on purpose: both backends import this module (and nothing else of ``parity``), so the
rules for valid options are written once. See DESIGN.md, "Configuration".
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
ROUTE_ORDERS = ("bias_first", "scale_first")
ROUTE_NORM_MODES = ("add", "clamp")  # step 5: w / (sum + eps) | w / max(sum, eps)
# step 7: the gated activation of every routed expert, act(x W1^T + b1, x W3^T + b3)
EXPERT_ACTIVATIONS = ("silu", "gelu_tanh", "clamped_swiglu")
LOAD_BALANCE_LOSSES = (None, "switch", "sequence")
# step 6a, capacity and token dropping (DESIGN.md): who is kept, how C is rounded, over which tokens
CAPACITY_POLICIES = ("probs", "position", "slot_major")
CAPACITY_ROUNDINGS = ("megatron", "maxtext", "gshard")
CAPACITY_GROUPS = ("sequence", "batch")
CAPACITY_STATS = ("kept", "selected")
TORCH_KERNELS = ("auto", "loop", "grouped_mm", "npu")
JAX_KERNELS = ("auto", "ragged_dot", "blocked", "dense", "static")  # "static": [E, C] buffers (step 6a)
EXPERT_KERNELS = tuple(dict.fromkeys(TORCH_KERNELS + JAX_KERNELS))


def _is_int(value: Any) -> bool:
    """An integer (Python or NumPy, any ``numbers.Integral``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number (Python or NumPy, any ``numbers.Real``), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _non_negative_float(name: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def validate_routing(
    *,
    num_experts: int,
    top_k: int,
    score_func: str = "sigmoid",
    route_scale: float = 1.0,
    num_expert_groups: int | None = None,
    num_limited_groups: int | None = None,
    group_score: str = "max",
    route_order: str = "bias_first",
    route_norm_eps: float = 1e-20,
    route_norm_mode: str = "add",
    route_norm_p: float | None = None,
    input_norm_eps: float = 1e-6,
) -> None:
    """Check the router options; raise ``ValueError`` naming the field, its value and what is allowed.

    ``route_norm_p`` (step 5, DBRX's ``moe_normalize_expert_weights``): None or a finite number > 0;
    ``input_norm_eps`` (steps 1 and 6, Gemma 4's ``rms_norm_eps``): a finite number >= 0.

    Used by ``MoEConfig`` and by both backends' ``TokenChoiceTopKRouter`` so the rules live in one place.
    """
    _positive_int("num_experts", num_experts)
    _positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
    _one_of("score_func", score_func, SCORE_FUNCS)
    _one_of("group_score", group_score, GROUP_SCORES)
    _one_of("route_order", route_order, ROUTE_ORDERS)
    _non_negative_float("route_norm_eps", route_norm_eps)
    _one_of("route_norm_mode", route_norm_mode, ROUTE_NORM_MODES)
    if route_norm_p is not None and (not _is_real(route_norm_p) or not math.isfinite(route_norm_p)
                                     or route_norm_p <= 0):
        raise ValueError(f"route_norm_p={route_norm_p!r} must be None or a finite number > 0")
    _non_negative_float("input_norm_eps", input_norm_eps)
    if not _is_real(route_scale) or not math.isfinite(route_scale) or route_scale <= 0:
        raise ValueError(f"route_scale={route_scale!r} must be a finite number > 0")
    if num_expert_groups is None:
        if num_limited_groups is not None:
            raise ValueError(
                f"num_limited_groups={num_limited_groups} needs num_expert_groups to be set (got None)"
            )
        return
    _positive_int("num_expert_groups", num_expert_groups)
    if num_experts % num_expert_groups:
        raise ValueError(
            f"num_expert_groups={num_expert_groups} does not divide num_experts={num_experts}"
        )
    if num_limited_groups is None:
        raise ValueError(
            f"num_limited_groups must be set when num_expert_groups={num_expert_groups} (got None)"
        )
    _positive_int("num_limited_groups", num_limited_groups)
    if num_limited_groups > num_expert_groups:
        raise ValueError(
            f"num_limited_groups={num_limited_groups} exceeds num_expert_groups={num_expert_groups}"
        )
    per_group = num_experts // num_expert_groups
    if group_score == "top2_sum" and per_group < 2:
        raise ValueError(
            f"group_score='top2_sum' needs at least 2 experts per group, got "
            f"num_experts={num_experts} / num_expert_groups={num_expert_groups} = {per_group}"
        )
    if top_k > num_limited_groups * per_group:
        raise ValueError(
            f"top_k={top_k} exceeds the {num_limited_groups * per_group} experts held by the "
            f"num_limited_groups={num_limited_groups} kept groups of {per_group} experts each"
        )


def _positive_finite(name: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def validate_experts(*, expert_activation: str = "silu", swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                     expert_proj_bias: bool = False) -> None:
    """Check the routed experts' options (DESIGN.md step 7); raise ``ValueError`` naming the field.

    ``expert_activation`` one of ``EXPERT_ACTIVATIONS``; ``swiglu_alpha`` and ``swiglu_limit`` (used by
    "clamped_swiglu" only, checked always) finite and > 0; ``expert_proj_bias`` a bool. Used by
    ``MoEConfig`` and by both backends' ``GroupedExperts``.
    """
    _one_of("expert_activation", expert_activation, EXPERT_ACTIVATIONS)
    _positive_finite("swiglu_alpha", swiglu_alpha)
    _positive_finite("swiglu_limit", swiglu_limit)
    if not isinstance(expert_proj_bias, bool):
        raise ValueError(f"expert_proj_bias={expert_proj_bias!r} must be True or False")


_CAPACITY_DEFAULTS = {"capacity_group": "sequence", "capacity_rounding": "megatron", "capacity_min": 0,
                      "capacity_policy": "probs", "capacity_pad": False, "capacity_renorm": False,
                      "capacity_stats": "kept"}
# every MoEConfig field of step 6a, in declaration order
CAPACITY_FIELDS = ("capacity_factor", "expert_capacity", *_CAPACITY_DEFAULTS)


def validate_capacity(*, capacity_factor: float | None = None, expert_capacity: int | None = None,
                      **options: Any) -> None:
    """Check the options of step 6a (capacity and token dropping; DESIGN.md); ``ValueError`` naming the field.

    ``capacity_factor`` (None or a finite number > 0) and ``expert_capacity`` (None or an integer
    > 0) are exclusive; with both None the layer is dropless and every other ``capacity_*`` option
    must keep its default (``_CAPACITY_DEFAULTS``), so that none is silently without effect.
    """
    unknown = sorted(set(options) - set(_CAPACITY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown capacity option(s) {unknown}; allowed: {sorted(_CAPACITY_DEFAULTS)}")
    opts = {**_CAPACITY_DEFAULTS, **options}
    if capacity_factor is not None:
        _positive_finite("capacity_factor", capacity_factor)
    if expert_capacity is not None:
        _positive_int("expert_capacity", expert_capacity)
        if capacity_factor is not None:
            raise ValueError(f"capacity_factor={capacity_factor!r} and expert_capacity={expert_capacity!r} "
                             f"both given; set one (a factor of the fair share, or a fixed capacity)")
    _one_of("capacity_group", opts["capacity_group"], CAPACITY_GROUPS)
    _one_of("capacity_rounding", opts["capacity_rounding"], CAPACITY_ROUNDINGS)
    _one_of("capacity_policy", opts["capacity_policy"], CAPACITY_POLICIES)
    _one_of("capacity_stats", opts["capacity_stats"], CAPACITY_STATS)
    if not _is_int(opts["capacity_min"]) or opts["capacity_min"] < 0:
        raise ValueError(f"capacity_min={opts['capacity_min']!r} must be an integer >= 0")
    for name in ("capacity_pad", "capacity_renorm"):
        if not isinstance(opts[name], bool):
            raise ValueError(f"{name}={opts[name]!r} must be True or False")
    if capacity_factor is None and expert_capacity is None:
        changed = [f"{k}={v!r}" for k, v in opts.items() if v != _CAPACITY_DEFAULTS[k]]
        if changed:
            raise ValueError(f"{', '.join(changed)} given but the layer is dropless (capacity_factor=None and "
                             f"expert_capacity=None); set one of them")


def capacity_groups(capacity_group: str, batch: int, seq_len: int) -> tuple[int, int]:
    """(6a) ``(number of groups, tokens per group)`` for ``B = batch`` sequences of ``S = seq_len``.

    "sequence" (MaxText): each sequence is a group, ``(B, S)``; "batch" (Megatron-Core: the tokens of
    one rank's micro-batch): one group of all ``B*S`` tokens, ``(1, B*S)`` (``(0, 0)`` for no tokens).
    """
    _one_of("capacity_group", capacity_group, CAPACITY_GROUPS)
    if capacity_group == "sequence":
        return batch, seq_len
    return (1, batch * seq_len) if batch * seq_len else (0, 0)


def capacity_per_expert(cfg: MoEConfig, group_tokens: int) -> int | None:
    """(6a) ``C``, the slots each expert keeps per group of ``T = group_tokens`` tokens; None: dropless.

    With ``k = top_k``, ``E = num_experts``, ``cf = capacity_factor``, evaluated in Python floats in
    exactly this order (so all three implementations get the same integer; it is a static shape):

    - ``expert_capacity`` set: that number (Switch Transformer in transformers: a fixed capacity);
    - "megatron" (Megatron-Core ``get_capacity``): ``ceil((T * k) / E * cf)``;
    - "maxtext" (MaxText's ``layers/moe.py``, per sequence): ``int(max(ceil(T * k / E) * cf, cf))``,
      i.e. ceil, then multiply, then floor;
    - "gshard" (GShard top-2, arXiv:2006.16668, Algorithm 1, with its 2 written as k):
      ``ceil(T / E * k * cf)``;

    then ``max(C, capacity_min)`` (Megatron's and GShard's ``min_capacity``).
    """
    if cfg.expert_capacity is not None:
        cap = cfg.expert_capacity
    elif cfg.capacity_factor is None:
        return None
    else:
        t, k, e, cf = group_tokens, cfg.top_k, cfg.num_experts, cfg.capacity_factor
        if cfg.capacity_rounding == "megatron":
            cap = math.ceil(t * k / e * cf)
        elif cfg.capacity_rounding == "maxtext":
            cap = int(max(math.ceil(t * k / e) * cf, cf))
        else:  # "gshard"
            cap = math.ceil(t / e * k * cf)
    return max(int(cap), cfg.capacity_min)


_INT_FIELDS = ("dim", "hidden_dim", "num_experts", "top_k", "num_expert_groups", "num_limited_groups",
               "num_shared_experts", "shared_hidden_dim", "expert_capacity", "capacity_min")
_FLOAT_FIELDS = ("capacity_factor", "route_scale", "route_norm_eps", "load_balance_coeff", "router_z_loss_coeff",
                 "swiglu_alpha", "swiglu_limit", "input_norm_eps", "route_norm_p")


@dataclass(frozen=True)
class MoEConfig:
    """Every option of the MoE layer; the same keyword names in ``moe_torch.MoE`` and ``moe_jax.MoE``.

    Defaults follow the PyTorch module this kit grew from (sigmoid scores, top-1, routing weights
    applied before the experts, no balance loss) except in two fields that only matter with an expert
    bias: ``use_expert_bias=False`` and ``route_order="bias_first"`` (DeepSeek-V3 / torchtitan). That
    module's own constructor (``moe_torch.MoE(dim, hidden_dim, num_experts)``, fields not given) gets
    ``use_expert_bias=True`` and ``route_order="scale_first"``, as does the "default" preset.

    ``route_order`` (DESIGN.md steps 2-3): "bias_first" adds ``expert_bias`` before the group step
    and scales the routing weights after selection; "scale_first" (the original module) selects on
    ``scores * route_scale + expert_bias`` with the groups chosen from ``scores * route_scale``.

    ``router_bias`` (step 1): the router's logits get a bias ``router.gate.bias [E]`` (GPT-OSS).
    ``expert_activation`` (step 7): "silu" (SwiGLU), "gelu_tanh" (GeGLU with tanh GELU, Gemma 4) or
    "clamped_swiglu" (GPT-OSS: ``swiglu_alpha``, ``swiglu_limit``, finite and > 0);
    ``expert_proj_bias`` (step 7): biases ``experts.b1``, ``experts.b3 [E, H]``, ``experts.b2 [E, D]``
    on the gate, up and down projections (GPT-OSS).

    Raises ``ValueError`` naming the field, the value given and what is allowed.
    """

    # sizes
    dim: int = 64
    hidden_dim: int = 128
    num_experts: int = 8
    # router
    top_k: int = 1
    score_func: str = "sigmoid"
    route_norm: bool = False
    route_scale: float = 1.0
    num_expert_groups: int | None = None
    num_limited_groups: int | None = None
    group_score: str = "max"
    route_order: str = "bias_first"
    route_norm_eps: float = 1e-20
    route_norm_mode: str = "add"
    router_bias: bool = False  # step 1: logits = x @ gate.T + router.gate.bias (GPT-OSS)
    # step 1: the router sees rms_norm(x) * router.scale [D] * dim**-0.5 (Gemma 4's router)
    router_input_norm: bool = False
    input_norm_eps: float = 1e-6  # steps 1 and 6: rms_norm(x) = x * (mean(x**2) + eps) ** -0.5
    route_norm_p: float | None = None  # step 5: divide by the p-norm of the k weights (DBRX), not the sum
    per_expert_scale: bool = False  # step 5: w *= router.per_expert_scale[idx] [E] (Gemma 4)
    # step 6: the routed experts see rms_norm(x) * expert_input_norm.weight [D] (Gemma 4's
    # pre_feedforward_layernorm_2); the router does not
    expert_input_norm: bool = False
    # experts
    expert_activation: str = "silu"  # step 7: "silu" | "gelu_tanh" (Gemma 4) | "clamped_swiglu" (GPT-OSS)
    swiglu_alpha: float = 1.702  # clamped_swiglu: sigmoid gain
    swiglu_limit: float = 7.0  # clamped_swiglu: gate clamped above, up to +-limit
    expert_proj_bias: bool = False  # step 7: experts.b1, b3 [E, H], b2 [E, D] (GPT-OSS)
    score_before_experts: bool = True
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    shared_expert_gate: bool = False
    expert_kernel: str = "auto"
    # balancing
    use_expert_bias: bool = False
    load_balance_loss: str | None = None
    load_balance_coeff: float = 0.01
    router_z_loss_coeff: float = 0.0
    # capacity and token dropping, step 6a (both None: dropless); ``capacity_per_expert`` gives C
    capacity_factor: float | None = None  # C from the fair share T*k/E times this factor
    expert_capacity: int | None = None  # a fixed C (Switch Transformer in transformers)
    capacity_group: str = "sequence"  # the tokens C is counted over: "sequence" | "batch"
    capacity_rounding: str = "megatron"  # "megatron" | "maxtext" | "gshard"
    capacity_min: int = 0  # C = max(C, capacity_min)
    capacity_policy: str = "probs"  # who is kept: "probs" | "position" | "slot_major"
    capacity_pad: bool = False  # experts run on exactly C rows per group (zero rows padded)
    capacity_renorm: bool = False  # survivors' weights divided by their sum (GShard)
    capacity_stats: str = "kept"  # counts and balance loss from "kept" slots or all "selected" ones

    def __post_init__(self) -> None:
        # NumPy scalars (np.int64(4), np.float32(2.5)) are valid values, stored as Python int / float
        # so that a config stays hashable, comparable and JSON-serialisable
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _INT_FIELDS and _is_int(value) and type(value) is not int:
                object.__setattr__(self, f.name, int(value))
            elif f.name in _FLOAT_FIELDS and _is_real(value) and type(value) not in (int, float):
                object.__setattr__(self, f.name, float(value))
        _positive_int("dim", self.dim)
        _positive_int("hidden_dim", self.hidden_dim)
        validate_routing(
            num_experts=self.num_experts,
            top_k=self.top_k,
            score_func=self.score_func,
            route_scale=self.route_scale,
            num_expert_groups=self.num_expert_groups,
            num_limited_groups=self.num_limited_groups,
            group_score=self.group_score,
            route_order=self.route_order,
            route_norm_eps=self.route_norm_eps,
            route_norm_mode=self.route_norm_mode,
            route_norm_p=self.route_norm_p,
            input_norm_eps=self.input_norm_eps,
        )
        for name in ("route_norm", "score_before_experts", "use_expert_bias", "shared_expert_gate", "router_bias",
                     "router_input_norm", "per_expert_scale", "expert_input_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.route_norm_p is not None and not self.route_norm:
            raise ValueError(f"route_norm_p={self.route_norm_p} needs route_norm=True (it says how step 5 "
                             f"renormalises)")
        validate_experts(expert_activation=self.expert_activation, swiglu_alpha=self.swiglu_alpha,
                         swiglu_limit=self.swiglu_limit, expert_proj_bias=self.expert_proj_bias)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs a shared expert to scale (got num_shared_experts=0)")
        if not _is_int(self.num_shared_experts) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts!r} must be an integer >= 0")
        if self.shared_hidden_dim is not None:
            _positive_int("shared_hidden_dim", self.shared_hidden_dim)
            if self.num_shared_experts == 0:
                raise ValueError(
                    f"shared_hidden_dim={self.shared_hidden_dim} given but num_shared_experts=0"
                )
        _one_of("expert_kernel", self.expert_kernel, EXPERT_KERNELS)
        validate_capacity(**{f.name: getattr(self, f.name) for f in fields(self)
                             if f.name.startswith("capacity_") or f.name == "expert_capacity"})
        _one_of("load_balance_loss", self.load_balance_loss, LOAD_BALANCE_LOSSES)
        _non_negative_float("load_balance_coeff", self.load_balance_coeff)
        _non_negative_float("router_z_loss_coeff", self.router_z_loss_coeff)

    @property
    def shared_dim(self) -> int:
        """Hidden size of the shared-expert FeedForward (0 when there is none).

        ``num_shared_experts`` experts of ``hidden_dim`` are fused into one SwiGLU of
        ``num_shared_experts * hidden_dim`` unless ``shared_hidden_dim`` says otherwise (DeepSeek-V3).
        """
        if self.num_shared_experts == 0:
            return 0
        return self.shared_hidden_dim or self.num_shared_experts * self.hidden_dim

    def to_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of ``moe_torch.MoE`` / ``moe_jax.MoE`` (``rngs`` aside)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(overrides) - set(kwargs)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {sorted(unknown)}; allowed: {sorted(kwargs)}")
        kwargs.update(overrides)
        return kwargs

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        """Build from a mapping (a parsed TOML/JSON file); unknown keys are an error that lists them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return self.to_kwargs()


# ------------------------------------------------------------------ the layers' constructor arguments
class _NotGiven:
    """A keyword left at its default, told apart from an explicit ``None`` (``load_balance_loss``)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


BALANCE_FROM_COEFF = _NotGiven("<'switch' when load_balance_coeff is a number, else None>")

# keys a ``router_kwargs`` dict may hold (the original module forwarded it to its router)
ROUTER_KWARGS = ("top_k", "score_func", "route_norm", "route_scale", "num_expert_groups", "num_limited_groups",
                 "group_score", "route_order", "route_norm_eps", "route_norm_mode",
                 "use_expert_bias", "router_bias", "route_norm_p", "input_norm_eps", "router_input_norm",
                 "per_expert_scale")


def layer_config(*, load_balance_coeff: float | None = None, load_balance_loss: Any = BALANCE_FROM_COEFF,
                 use_expert_bias: bool | None = None, route_order: str | None = None,
                 router_kwargs: dict[str, Any] | None = None, **fields_: Any) -> MoEConfig:
    """The ``MoEConfig`` that ``moe_torch.MoE`` / ``moe_jax.MoE`` build from their arguments.

    A field passed explicitly always wins (so ``MoE(**cfg.to_kwargs())`` builds ``cfg``); a field not
    given gets the behaviour of the original PyTorch module:

    - ``use_expert_bias`` None -> True (the original always adds ``expert_bias``, a zero buffer until
      ``update_expert_bias`` changes it, to the selection scores);
    - ``route_order`` None -> "scale_first" (the original's order, DESIGN.md steps 2-3);
    - ``load_balance_loss`` not given -> "switch" when ``load_balance_coeff`` is a number, else None
      (the original: ``load_balance_coeff=None`` means no loss);
    - ``load_balance_coeff`` None -> no loss unless ``load_balance_loss`` names one, which then gets
      ``MoEConfig``'s default coefficient.

    ``router_kwargs`` (keys ``ROUTER_KWARGS``) is merged over the keywords (the dict wins).
    Raises ``ValueError`` naming an unknown argument or key, or an invalid value (``MoEConfig``).
    """
    names = {f.name for f in fields(MoEConfig)}
    unknown = sorted(set(fields_) - names)
    if unknown:
        raise ValueError(f"unknown MoE argument(s) {unknown}; allowed: {sorted(names)} and "
                         f"router_kwargs, shared_expert")
    options = dict(fields_, use_expert_bias=use_expert_bias, route_order=route_order)
    if router_kwargs:
        if not isinstance(router_kwargs, dict):
            raise ValueError(f"router_kwargs must be a dict or None, got {type(router_kwargs).__name__}")
        bad = sorted(set(router_kwargs) - set(ROUTER_KWARGS))
        if bad:
            raise ValueError(f"router_kwargs has unknown key(s) {bad}; allowed: {list(ROUTER_KWARGS)}")
        options.update(router_kwargs)
    if options["use_expert_bias"] is None:
        options["use_expert_bias"] = True
    if options["route_order"] is None:
        options["route_order"] = "scale_first"
    if load_balance_loss is BALANCE_FROM_COEFF:
        load_balance_loss = None if load_balance_coeff is None else "switch"
    options["load_balance_loss"] = load_balance_loss
    if load_balance_coeff is not None:
        options["load_balance_coeff"] = load_balance_coeff
    return MoEConfig(**options)


# ------------------------------------------------------------------------------ canonical weights
class StateDictError(ValueError):
    """Canonical weights that do not fit a module (DESIGN.md, "Canonical weights"): one error listing
    every missing, unexpected, mis-shaped or non-float key with the expected and the given shape,
    and every finite value that a cast to the module's dtype would turn into an infinity.

    The same class and message in ``moe_torch`` (``MoE.load_state_dict``) and ``moe_jax``
    (``moe_jax.load_state_dict``): both build it with ``check_state_dict``.
    """


def check_state_dict(owner: str, expected: dict[str, tuple[int, ...]], given: dict[str, tuple[tuple[int, ...], str, bool]],
                     *, strict: bool = True, overflows: dict[str, tuple[int, str, str]] | None = None) -> None:
    """Raise one ``StateDictError`` for everything wrong with ``given`` (nothing when all fits).

    expected: canonical name -> shape the module holds; given: name -> (shape, dtype name, is a
    floating-point dtype); overflows: name -> (count of finite values that become +-inf, source
    dtype name, target dtype name). ``strict=False`` tolerates missing keys only.
    """
    problems = []
    # NOTE: by name, so the message does not depend on either backend's parameter order
    for name, shape in sorted(expected.items()):
        if name not in given:
            if strict:
                problems.append(f"missing {name!r} (expected shape {list(shape)})")
            continue
        got, dtype, is_float = given[name]
        if tuple(got) != tuple(shape):
            problems.append(f"{name!r} has shape {list(got)}, expected {list(shape)}")
        if not is_float:
            problems.append(f"{name!r} has dtype {dtype}, expected a floating-point array")
    for name, (got, _, _) in sorted(given.items()):
        if name not in expected:
            problems.append(f"unexpected {name!r} (shape {list(got)}); expected keys: {sorted(expected)}")
    for name, (count, src, dst) in (overflows or {}).items():
        if count:
            problems.append(f"{name!r}: {count} finite value(s) overflow to infinity when cast from {src} to {dst}")
    if problems:
        raise StateDictError(f"canonical weights do not fit {owner}:\n  " + "\n  ".join(problems))
