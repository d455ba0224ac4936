"""The optimizer mapping: one ``OptimizerSpec``, built as ``torch.optim.SGD/AdamW`` and as optax.

What has to line up for the two frameworks to take the same step (checked one step at a time by
``tests/parity/test_train_optim.py``):

- **AdamW** (Loshchilov & Hutter 2019, decoupled weight decay). ``torch.optim.AdamW``:
  ``p <- p * (1 - lr * wd)``, then ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
  ``optax.adamw``: ``u = m_hat / (sqrt(v_hat + eps_root) + eps) + wd * p``, ``p <- p - lr * u``. The
  same step in exact arithmetic when ``eps_root = 0``: epsilon *outside* the square root, added to
  the bias-corrected ``sqrt(v_hat)`` in both, and the decay scaled by ``lr`` in both. Defaults differ
  (torch ``weight_decay=0.01``, optax ``1e-4``), so every field is passed explicitly.
- **SGD**: ``torch.optim.SGD(momentum, weight_decay)`` adds ``wd * p`` to the gradient (coupled L2,
  not decoupled) and keeps ``buf = momentum * buf + g`` (the first step ``buf = g``, dampening 0);
  optax: ``add_decayed_weights(wd)`` then ``sgd(lr, momentum)`` (``optax.trace``: ``t = g + momentum * t``
  from ``t = 0``, the same buffer).
- **Clipping by global norm**: ``torch.nn.utils.clip_grad_norm_(params, c)`` multiplies every
  gradient by ``min(1, c / (norm + 1e-6))``; ``optax.clip_by_global_norm(c)`` by ``c / norm`` when
  ``norm > c``, without the 1e-6 (a relative difference of ``1e-6 / norm`` in the update: 8 float32
  ULPs at norm 1). ``clip_like_torch`` is torch's rule as an optax transformation, so the mapping is
  exact; ``OptimizerSpec.clip_rule="optax"`` keeps optax's own (and the difference shows in the drift).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

OPTIMIZERS = ("sgd", "adamw")
CLIP_RULES = ("torch", "optax")
TORCH_CLIP_EPS = 1e-6  #: torch.nn.utils.clip_grad_norm_'s ``max_norm / (total_norm + 1e-6)``


def _finite(name: str, value, low: float = 0.0, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (strict and value == low):
        raise ValueError(f"{name}={value!r} must be a finite number {'>' if strict else '>='} {low:g}")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer, every hyper-parameter explicit.

    ``name``: "sgd" | "adamw"; ``lr`` > 0; ``weight_decay`` >= 0 (AdamW: decoupled, times lr; SGD:
    coupled L2 added to the gradient, torch's meaning); ``momentum`` in [0, 1) (SGD only);
    ``betas`` each in [0, 1), ``eps`` >= 0 (AdamW only); ``clip_norm``: max global gradient norm
    (> 0) or None for no clipping; ``clip_rule``: "torch" (``clip_like_torch``) or "optax"
    (``optax.clip_by_global_norm``, for the JAX side only). Raises ``ValueError`` naming the field.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    clip_rule: str = "torch"

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.name!r} is not one of {OPTIMIZERS}")
        _finite("lr", self.lr, strict=True)
        _finite("weight_decay", self.weight_decay)
        _finite("momentum", self.momentum)
        if self.momentum >= 1:
            raise ValueError(f"momentum={self.momentum!r} must be below 1")
        if len(self.betas) != 2:
            raise ValueError(f"betas={self.betas!r} must be two numbers")
        for i, b in enumerate(self.betas):
            _finite(f"betas[{i}]", b)
            if b >= 1:
                raise ValueError(f"betas[{i}]={b!r} must be below 1")
        _finite("eps", self.eps)
        if self.clip_norm is not None:
            _finite("clip_norm", self.clip_norm, strict=True)
        if self.clip_rule not in CLIP_RULES:
            raise ValueError(f"clip_rule={self.clip_rule!r} is not one of {CLIP_RULES}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ torch
def torch_optimizer(spec: OptimizerSpec, params):
    """``torch.optim.SGD`` / ``torch.optim.AdamW`` for ``params`` (an iterable of tensors), from ``spec``.

    The single-tensor implementation (``foreach=False``): the foreach kernels reorder the float32
    operations per step, which changes the last bits (either is correct; one is fixed here).
    """
    import torch

    params = list(params)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                               foreach=False)
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay,
                             foreach=False)


def torch_clip(spec: OptimizerSpec, params):
    """Clip the gradients of ``params`` in place (``torch.nn.utils.clip_grad_norm_``) when ``spec``
    clips; returns the global gradient norm before clipping (a 0-d tensor)."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if spec.clip_norm is None:
        return torch.nn.utils.get_total_norm(grads, foreach=False)
    return torch.nn.utils.clip_grad_norm_(params, spec.clip_norm, foreach=False)


# ------------------------------------------------------------------------------------------- optax
def clip_like_torch(max_norm: float):
    """An optax transformation scaling the updates by ``min(1, max_norm / (global_norm + 1e-6))``,
    the rule of ``torch.nn.utils.clip_grad_norm_`` (every leaf multiplied, by 1.0 when not clipped)."""
    import jax
    import jax.numpy as jnp
    import optax

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(jnp.asarray(max_norm, norm.dtype) / (norm + jnp.asarray(TORCH_CLIP_EPS, norm.dtype)), 1.0)
        return jax.tree.map(lambda u: (u * coef.astype(u.dtype)).astype(u.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def optax_transform(spec: OptimizerSpec):
    """The optax ``GradientTransformation`` of ``spec``: clipping (when set), then ``optax.sgd`` (with
    ``add_decayed_weights`` before it for weight decay) or ``optax.adamw`` (``eps_root=0``)."""
    import optax

    parts = []
    if spec.clip_norm is not None:
        parts.append(clip_like_torch(spec.clip_norm) if spec.clip_rule == "torch"
                     else optax.clip_by_global_norm(spec.clip_norm))
    if spec.name == "sgd":
        if spec.weight_decay:
            parts.append(optax.add_decayed_weights(spec.weight_decay))
        parts.append(optax.sgd(spec.lr, momentum=spec.momentum or None))
    else:
        parts.append(optax.adamw(spec.lr, b1=spec.betas[0], b2=spec.betas[1], eps=spec.eps, eps_root=0.0,
                                 weight_decay=spec.weight_decay))
    return optax.chain(*parts)
