"""The optimizer mapping of ``moe-parity train``: torch.optim.SGD/AdamW and optax take the same steps.

Two steps of each on the same gradients (so that momentum, both Adam moments and the bias correction
at t = 2 are exercised), with weight decay, with clipping by global norm active and inactive: the
new parameters agree to float32 rounding (a few ULPs), and the updates to a relative 1e-5.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from parity.train.optim import OptimizerSpec, clip_like_torch, optax_transform, torch_clip, torch_optimizer  # noqa: E402

SHAPES = {"a": (5, 7), "b": (3, 4, 2), "c": (6,)}


def _data(seed, grad_scale):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (grad_scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(2)]
    return params, grads


def _torch_steps(spec, params, grads):
    ps = [torch.tensor(params[k], requires_grad=True) for k in SHAPES]
    opt = torch_optimizer(spec, ps)
    norms = []
    for g in grads:
        for p, k in zip(ps, SHAPES, strict=True):
            p.grad = torch.tensor(g[k])
        norms.append(float(torch_clip(spec, ps)))
        opt.step()
    return {k: p.detach().numpy().astype(np.float64) for k, p in zip(SHAPES, ps, strict=True)}, norms


def _optax_steps(spec, params, grads):
    tx = optax_transform(spec)
    p = {k: jax.numpy.asarray(v) for k, v in params.items()}
    state = jax.jit(tx.init)(p)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))  # one program, not one per operation
    for g in grads:
        updates, state = update({k: jax.numpy.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


@pytest.mark.parametrize("name, extra, grad_scale, clip", [
    ("sgd", {"momentum": 0.9, "weight_decay": 0.01}, 1.0, 0.5),
    ("sgd", {"momentum": 0.0, "weight_decay": 0.0}, 1e-3, 0.5),
    ("sgd", {"momentum": 0.5, "weight_decay": 0.1}, 1.0, None),
    ("adamw", {"weight_decay": 0.1}, 1.0, 0.5),
    ("adamw", {"weight_decay": 0.1}, 1e-3, 0.5),
    ("adamw", {"weight_decay": 0.0, "betas": (0.8, 0.95), "eps": 1e-6}, 1.0, None),
], ids=["sgd-momentum-wd-clipped", "sgd-not-clipped", "sgd-no-clip", "adamw-wd-clipped", "adamw-wd-not-clipped",
        "adamw-betas-eps-no-clip"])
def test_one_step_of_each_gives_the_same_update(name, extra, grad_scale, clip):
    spec = OptimizerSpec(name=name, lr=1e-2, clip_norm=clip, **extra)
    params, grads = _data(0, grad_scale)
    got_t, norms = _torch_steps(spec, params, grads)
    got_j = _optax_steps(spec, params, grads)
    if clip is not None and grad_scale == 1.0:
        assert min(norms) > clip  # the clipping was active
    for k in SHAPES:
        p0 = params[k].astype(np.float64)
        # the new weights: a few float32 ULPs of the weights
        np.testing.assert_allclose(got_j[k], got_t[k], rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(p0).max())
        dt, dj = got_t[k] - p0, got_j[k] - p0
        assert np.abs(dt).max() > 0
        # the updates: relative to their own size (float32 rounding of p + u bounds what can be seen)
        assert np.abs(dj - dt).max() <= 1e-5 * np.abs(dt).max() + 2 * np.finfo(np.float32).eps * np.abs(p0).max()


def test_epsilon_inside_the_square_root_is_a_different_optimizer():
    """eps_root (inside the root) is not eps (outside): with small gradients the steps differ by far
    more than rounding; the mapping keeps eps outside and eps_root = 0, as torch."""
    spec = OptimizerSpec(name="adamw", lr=1e-2, eps=1e-8, clip_norm=None)
    params, grads = _data(1, 1e-4)
    ref, _ = _torch_steps(spec, params, grads)
    tx = optax.adamw(1e-2, eps=0.0, eps_root=1e-8, weight_decay=0.0)
    p = {k: jax.numpy.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    for g in grads:
        u, state = tx.update({k: jax.numpy.asarray(v) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, u)
    worst = max(np.abs(np.asarray(p[k], np.float64) - ref[k]).max() for k in SHAPES)
    assert worst > 1e-4  # vs ~1e-9 for the matched mapping


def test_clip_like_torch_is_torchs_rule():
    g = {"a": jax.numpy.full((4,), 3.0)}  # norm 6
    u, _ = clip_like_torch(1.5).update(g, clip_like_torch(1.5).init(g))
    t = torch.full((4,), 3.0, requires_grad=True)
    t.grad = torch.full((4,), 3.0)
    torch.nn.utils.clip_grad_norm_([t], 1.5)
    np.testing.assert_array_equal(np.asarray(u["a"]), t.grad.numpy())


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "adam"}, "optimizer='adam' is not one of"),
    ({"lr": 0.0}, r"lr=0.0 must be a finite number > 0"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"momentum": 1.0}, "momentum=1.0 must be below 1"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\]=1.0 must be below 1"),
    ({"clip_norm": -1.0}, "clip_norm=-1.0"),
    ({"clip_rule": "keras"}, "clip_rule='keras'"),
])
def test_bad_spec_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSpec(**kwargs)
