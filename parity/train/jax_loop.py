"""The JAX training loop of ``moe-parity train``: ``moe_jax.MoE`` + optax, one compiled step.

The step (forward in training mode, objective, gradient, optax update of the master weights) is one
``nnx.jit`` program and ``moe_jax.update_expert_bias`` a second (it holds a host callback, which
JAX's persistent cache never keeps; the step is kept), each traced once per (config, optimizer,
dtypes, shapes) and reused by every step, every trainer of the process and every rerun
(``TRACES`` counts the traces, for the tests). Master weights and optimizer state are plain pytrees
(``nnx.to_pure_dict``) in ``master_dtype``; the module holds them cast to ``compute_dtype``
(bfloat16 compute with float32 masters, as mixed-precision training does; the same dtype otherwise).

``remat=True`` runs the layer under ``nnx.remat`` (``jax.checkpoint``): its forward is recomputed in
the backward pass, but as a pure function; the ``tokens_per_expert`` update is an output of the
forward, applied once, so the counts are *not* doubled (unlike ``torch.utils.checkpoint``, whose
second forward runs the module's side effects again) and ``update_expert_bias`` keeps
``num_recomputations=1``.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np

from parity.train.metrics import StepRecord
from parity.train.optim import optax_transform
from parity.train.task import BUFFERS, TrainSettings

AUX_LOSSES = ("load_balance_loss", "router_z_loss")
TRACES: Counter = Counter()  #: program label -> times its Python function was traced
_PROGRAMS: dict = {}


@contextlib.contextmanager
def _scope(dtype: str):
    import jax

    with contextlib.ExitStack() as stack:
        if dtype == "float64":
            stack.enter_context(jax.enable_x64(True))
        yield


def _objective(module, x, y, acc, remat: bool):
    import jax.numpy as jnp
    from flax import nnx

    def call(m, t):
        return m(t, return_aux=True)

    out, aux = (nnx.remat(call) if remat else call)(module, x)
    mse = jnp.mean((out.astype(acc) - y) ** 2)
    losses = {k: aux[k].astype(acc) for k in AUX_LOSSES if k in aux}
    loss = mse + sum(losses.values()) if losses else mse
    return loss, (mse, losses, aux["selected_experts"], aux["tokens_per_expert"])


def _programs(key, tx, compute: str, master: str, use_bias: bool, remat: bool, custom: bool = False) -> dict:
    """The compiled ``step``, ``grad`` and ``bias_update`` of one configuration (built once per key)."""
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from moe_jax.balancing import update_expert_bias

    cdt, mdt = jnp.dtype(compute), jnp.dtype(master)
    acc = jnp.float64 if compute == "float64" else jnp.float32
    label = f"step[{compute}/{master}{', remat' if remat else ''}{', custom tx' if custom else ''}]"

    def set_params(moe, pure):
        state = nnx.state(moe, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda p: p.astype(cdt), pure))
        nnx.update(moe, state)

    def step(moe, params, opt_state, x, y):
        TRACES[label] += 1
        (loss, (mse, losses, sel, counts)), grads = nnx.value_and_grad(
            lambda m: _objective(m, x, y, acc, remat), has_aux=True)(moe)
        grads = jax.tree.map(lambda g: g.astype(mdt), nnx.to_pure_dict(grads))
        norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        set_params(moe, params)
        if not use_bias:  # no bias to update: the counts start again from zero
            moe.tokens_per_expert[...] = jnp.zeros_like(moe.tokens_per_expert[...])
        return (loss, mse, losses, norm, sel, counts), params, opt_state

    def grad(moe, x, y, scale):
        TRACES[f"grad[{compute}{', remat' if remat else ''}]"] += 1
        (_, (_, losses, _, _)), grads = nnx.value_and_grad(
            lambda m: _objective(m, x, y, acc, remat), has_aux=True)(moe)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), nnx.to_pure_dict(grads)), losses

    if "bias_update" not in _PROGRAMS:  # one for every configuration (traced per module structure)
        def bias_update(moe, lr):
            TRACES["bias_update"] += 1
            counts = moe.tokens_per_expert[...]
            update_expert_bias(moe, lr)
            return counts, moe.expert_bias[...]

        _PROGRAMS["bias_update"] = nnx.jit(bias_update)
    init_key = ("init", key[1], master)
    if init_key not in _PROGRAMS:
        _PROGRAMS[init_key] = jax.jit(tx.init)  # one program, not one per optimizer-state leaf
    _PROGRAMS[key] = {"step": nnx.jit(step), "grad": nnx.jit(grad), "bias_update": _PROGRAMS["bias_update"],
                      "init": _PROGRAMS[init_key], "set_params": set_params, "label": label}
    return _PROGRAMS[key]


class JaxTrainer:
    """A ``moe_jax.MoE`` in ``compute_dtype`` trained by optax with masters in ``master_dtype``.

    ``initial``: canonical weights (float64 arrays); ``remat``: the layer under ``nnx.remat``;
    ``tx``: an optax ``GradientTransformation`` replacing ``parity.train.optim.optax_transform(spec)``
    (to plant a bug; its program is keyed by the object, so reuse the same one across trainers).
    float64 trainers build and step under ``jax.enable_x64(True)`` (scoped to their calls).
    """

    backend = "jax"

    def __init__(self, settings: TrainSettings, initial, compute_dtype: str, master_dtype: str | None = None, *,
                 remat: bool = False, tx=None):
        self.s, self.cfg = settings, settings.cfg
        self.compute, self.master_dtype = compute_dtype, master_dtype or compute_dtype
        with _scope(compute_dtype):
            import jax
            import jax.numpy as jnp
            from flax import nnx

            import moe_jax

            spec = settings.optimizer
            key = (self.cfg, spec if tx is None else id(tx), compute_dtype, self.master_dtype, remat)
            custom = tx is not None
            tx = optax_transform(spec) if tx is None else tx
            self.progs = _programs(key, tx, compute_dtype, self.master_dtype, self.cfg.use_expert_bias, remat, custom)
            _PROGRAMS[key].setdefault("tx", tx)  # keeps an id()-keyed tx alive while its program is cached
            moe = nnx.eval_shape(lambda: moe_jax.MoE(**self.cfg.to_kwargs(), rngs=nnx.Rngs(0),
                                                     param_dtype=jnp.dtype(compute_dtype)))
            for _, var in nnx.to_flat_state(nnx.state(moe)):
                var.set_value(jax.device_put(np.zeros(var.shape, var.dtype)))
            moe_jax.load_state_dict(moe, {k: np.asarray(v, np.float64).astype(
                np.float32 if k in BUFFERS else jnp.dtype(compute_dtype)) for k, v in initial.items()})
            self.moe = moe
            self.moe.train()
            full = moe
            if self.master_dtype != compute_dtype:  # the masters: the initial weights in their own dtype
                full = nnx.eval_shape(lambda: moe_jax.MoE(**self.cfg.to_kwargs(), rngs=nnx.Rngs(0),
                                                          param_dtype=jnp.dtype(self.master_dtype)))
                for _, var in nnx.to_flat_state(nnx.state(full)):
                    var.set_value(jax.device_put(np.zeros(var.shape, var.dtype)))
                moe_jax.load_state_dict(full, {k: np.asarray(v, np.float64).astype(jnp.dtype(self.master_dtype))
                                               for k, v in initial.items() if k not in BUFFERS}, strict=False)
            self.params_ = nnx.to_pure_dict(nnx.state(full, nnx.Param))
            self._template = nnx.state(full, nnx.Param)  # a detached State (filled by ``_canonical``)
            self.opt_state = self.progs["init"](self.params_)
            self.acc = np.float64 if compute_dtype == "float64" else np.float32

    def _xy(self, x, y):
        import jax
        import jax.numpy as jnp

        return (jax.device_put(np.asarray(x, np.float64).astype(jnp.dtype(self.compute))),
                jax.device_put(np.asarray(y, np.float64).astype(self.acc)))

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        """One optimizer step on ``(x, y)`` (``[B, S, D]`` arrays): one call of the compiled program."""
        with _scope(self.compute):
            xj, yj = self._xy(x, y)
            out, self.params_, self.opt_state = self.progs["step"](self.moe, self.params_, self.opt_state, xj, yj)
            loss, mse, losses, norm, sel, counts = out
            # NOTE: a program of its own: the bias update is a host callback (bit identity with the NumPy
            # rule), and JAX never keeps a program holding one in its persistent cache; the step is kept
            bias = (self.progs["bias_update"](self.moe, np.float32(self.s.bias_lr))[1] if self.cfg.use_expert_bias
                    else self.moe.expert_bias[...])
            return StepRecord(loss=float(loss), mse=float(mse), aux={k: float(v) for k, v in losses.items()},
                              grad_norm=float(norm), selected=np.asarray(sel).astype(np.int64),
                              tokens_per_expert=np.asarray(counts, np.float64),
                              expert_bias=np.asarray(bias, np.float64))

    def accumulate(self, x: np.ndarray, y: np.ndarray, micro_batches: int = 1) -> dict:
        """As ``TorchTrainer.accumulate``: gradients of the objective over ``micro_batches`` equal
        micro-batches (each scaled by 1/n, summed), no optimizer step, then the bias update."""
        import jax

        with _scope(self.compute):
            total, aux_sum = None, {}
            scale = np.asarray(1.0 / micro_batches, self.acc)
            for xm, ym in zip(np.split(np.asarray(x), micro_batches), np.split(np.asarray(y), micro_batches),
                              strict=True):
                g, losses = self.progs["grad"](self.moe, *self._xy(xm, ym), scale)
                total = g if total is None else jax.tree.map(lambda a, b: a + b, total, g)
                for k, v in losses.items():
                    aux_sum[k] = aux_sum.get(k, 0.0) + float(v) / micro_batches
            grads = self._canonical(total)
            if self.cfg.use_expert_bias:
                counts, bias = self.progs["bias_update"](self.moe, np.float32(self.s.bias_lr))
            else:
                counts, bias = self.moe.tokens_per_expert[...], self.moe.expert_bias[...]
            return {"grads": grads, "aux": aux_sum, "counts": np.asarray(counts, np.float64),
                    "expert_bias": np.asarray(bias, np.float64)}

    def _canonical(self, pure) -> dict[str, np.ndarray]:
        """A pytree of the parameters' structure (``nnx.to_pure_dict``) by canonical name, float64."""
        from flax import nnx

        import moe_jax

        nnx.replace_by_pure_dict(self._template, pure)  # a detached State of its own, not the module's
        return {k: np.asarray(v, np.float64) for k, v in moe_jax.state_dict(self._template).items()}

    def params(self) -> dict[str, np.ndarray]:
        """The master weights, canonical names (PyTorch layout), float64."""
        with _scope(self.compute):
            return self._canonical(self.params_)
