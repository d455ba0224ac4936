"""A Flax NNX or Linen MoE module as a column of the parity report (docs/columns.md).

``NNXModuleColumn(factory, mapping)``: ``factory(cfg) -> nnx.Module`` (or ``factory()``); its
variables (named by their path joined with ".", e.g. ``"router.kernel"``) are filled from the
canonical weights through ``mapping`` (``parity.backends.mapping``; a Linear kernel is ``[in, out]``:
``"router.gate.weight.T"``), in the run's dtype (the balancing buffers float32). Forward:
``module(x)`` after ``module.eval()``; gradients by ``nnx.grad`` w.r.t. ``x`` and every
``nnx.Param``; bias steps (when the mapping names both buffers) after ``module.train()``: each call
must add its counts to the counts variable, then ``update_bias(module, lr)`` (default: DESIGN.md's
rule on the two variables). float64 runs happen under ``jax.enable_x64`` (scoped).

``LinenModuleColumn(module, mapping)``: a ``linen.Module``; its ``params`` collection is filled the
same way (paths such as ``"Dense_0.kernel"``), ``module.apply({"params": ...}, x)`` is the forward
and ``jax.grad`` the gradients. No bias steps (Linen keeps state in mutable collections a column
cannot know the update of): a SKIP row says so.

jax and flax are imported inside the methods. The module runs op by op (no ``jit``): sizes here are tiny.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from parity.backends import columns_common as cc
from parity.backends.base import GRAD_INPUT, Runner, Tensors
from parity.backends.mapping import BUFFERS, WeightMap, check_shapes
from parity.config import MoEConfig


def _path(path) -> str:
    return ".".join(str(p) for p in path)


def _dtype_name(a) -> str:
    return str(np.dtype(a.dtype))


def _np(a) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64)


@contextlib.contextmanager
def _scope(dtype: str):
    import jax

    with contextlib.ExitStack() as stack:
        if dtype == "float64":
            stack.enter_context(jax.enable_x64(True))
        yield


def _cast(value, dtype: str):
    import jax.numpy as jnp

    return jnp.asarray(np.asarray(value, np.float64).astype(jnp.dtype(dtype)))


def _value(v):
    """The array of a state leaf (a Variable or an array)."""
    return v.get_value() if hasattr(v, "get_value") else v


def _objective(out, aux, cot):
    """``sum(out * cotangent)`` plus the aux losses the module returns, in the cotangent's dtype."""
    loss = (out.reshape(cot.shape).astype(cot.dtype) * cot).sum()
    for key in cc.LOSS_KEYS:
        if key in aux:
            loss = loss + aux[key].astype(cot.dtype)
    return loss


_JITTED: dict = {}


def _nnx_jitted() -> dict:
    """``call(module, x, kwargs)`` -> the module's result (its variable updates kept) and
    ``grad(module, x, cot, kwargs)`` -> (gradients of the ``nnx.Param`` state, gradient of ``x``),
    compiled by ``nnx.jit`` (one program per module structure and shapes instead of op-by-op dispatch)."""
    if _JITTED:
        return _JITTED
    from flax import nnx

    def call(m, x, kwargs):
        return m(x, **kwargs)

    def grad(m, x, cot, kwargs):
        def objective(mm, xt):
            out, aux = cc.split_result(mm(xt, **kwargs))
            return _objective(out, aux, cot)

        return nnx.grad(objective, argnums=(0, 1))(m, x)

    _JITTED.update(call=nnx.jit(call), grad=nnx.jit(grad))
    return _JITTED


class _FlaxColumn(Runner):
    framework = "flax"

    def __init__(self, mapping, *, name, has_aux, aux_names, lock_kwarg, grads, ignore, bias, **hooks):
        super().__init__(**hooks)
        self.map = WeightMap(mapping)
        self.name, self.has_aux, self.aux_names = name, bool(has_aux), dict(aux_names or {})
        self.lock_kwarg, self.ignore = lock_kwarg, tuple(ignore)
        caps = {"forward"} | ({"aux"} if self.has_aux else set()) | ({"grad"} if grads else set()) \
            | ({"lock"} if lock_kwarg else set()) | ({"bias"} if bias else set())
        self.capabilities = frozenset(caps)

    def unavailable(self) -> str | None:
        for mod in ("jax", "flax"):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed"
        return None

    def _kwargs(self, selected_experts):
        import jax.numpy as jnp

        if selected_experts is None:
            return {}
        return {self.lock_kwarg: jnp.asarray(np.asarray(selected_experts, np.int32))}

    def _tensors(self, cfg, x, out, aux) -> Tensors:
        t = Tensors()
        t.put("out", _np(out).reshape(np.shape(x)), _dtype_name(out))
        for key, value in cc.rename_aux(aux, self.aux_names).items() if self.has_aux else ():
            t.put(key, cc.as_rows(key, _np(value), cfg), _dtype_name(value))
        return t


class NNXModuleColumn(_FlaxColumn):
    """A Flax NNX module as a column. Arguments as ``TorchModuleColumn``'s (no ``capture``, ``device``):
    ``factory(cfg) -> nnx.Module``, ``mapping``, ``name``, ``has_aux``, ``aux_names``, ``lock_kwarg``,
    ``update_bias(module, lr)``, ``ignore``, ``grads``."""

    def __init__(self, factory: Callable, mapping: Mapping[str, object], *, name: str | None = None,
                 has_aux: bool = True, aux_names: Mapping[str, str] | None = None, lock_kwarg: str | None = None,
                 update_bias: Callable | None = None, ignore: Sequence[str] = (), grads: bool = True, **hooks):
        wmap = WeightMap(mapping)
        bias = all(wmap.buffer_target(b) for b in BUFFERS) and bool(has_aux)
        super().__init__(mapping, name=name or f"nnx-module:{getattr(factory, '__name__', '?')}", has_aux=has_aux,
                         aux_names=aux_names, lock_kwarg=lock_kwarg, grads=grads, ignore=ignore, bias=bias, **hooks)
        self.factory, self.update_bias = factory, update_bias
        self.skip_reasons = cc.skip_reasons(has_aux=self.has_aux, grads=grads, lock=bool(lock_kwarg), bias=bias,
                                            framework="flax")

    def build(self, cfg: MoEConfig, weights, dtype: str):
        """The module (``factory(cfg)``) with its variables set from ``weights`` in ``dtype``."""
        from flax import nnx

        cfg, weights = self.prepare(cfg, weights)
        # traced abstractly (nnx.eval_shape: no initialiser runs) unless some parameter keeps its own value
        make = lambda: cc.call_factory(self.factory, cfg)  # noqa: E731
        module = make() if self.ignore else nnx.eval_shape(make)
        if not isinstance(module, nnx.Module):
            raise TypeError(f"{self.name}: the factory returned {type(module).__name__}; expected an nnx.Module")
        arrays = self.map.module_arrays(weights)
        variables = {_path(p): v for p, v in nnx.to_flat_state(nnx.state(module))}
        params = tuple(_path(p) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)))
        check_shapes(arrays, {n: tuple(v.shape) for n, v in variables.items()}, params, self.ignore)
        buffers = {self.map.buffer_target(b) for b in BUFFERS}
        for name, var in variables.items():
            if name in arrays:
                var.set_value(_cast(arrays[name], "float32" if name in buffers else dtype))
            elif not self.ignore:  # an unmapped non-parameter variable (a counter, a flag array): zeros
                var.set_value(_cast(np.zeros(var.shape), str(np.dtype(var.dtype))))
        return module

    def forward(self, cfg, weights, x, dtype, selected_experts=None) -> Tensors:
        with _scope(dtype):
            module = self.build(cfg, weights, dtype)
            module.eval()
            out, aux = cc.split_result(_nnx_jitted()["call"](module, _cast(x, dtype), self._kwargs(selected_experts)))
            return self._tensors(cfg, x, out, aux)

    def grad(self, cfg, weights, x, dtype, cotangent, selected_experts=None) -> Tensors:
        from flax import nnx

        with _scope(dtype):
            module = self.build(cfg, weights, dtype)
            module.eval()
            cot = _cast(cotangent, "float64" if dtype == "float64" else "float32")
            g_params, g_x = _nnx_jitted()["grad"](module, _cast(x, dtype), cot, self._kwargs(selected_experts))
            flat = {_path(p): _value(v) for p, v in nnx.to_flat_state(g_params)}
            g_mod = {k: _np(v) for k, v in flat.items()}
            dtypes = {k: _dtype_name(v) for k, v in flat.items()}
            _, w = self.prepare(cfg, weights)
            t = Tensors()
            t.put(GRAD_INPUT, _np(g_x), _dtype_name(g_x))
            for canon, g in self.map.canonical_grads(g_mod, w).items():
                t.put(canon, g, dtypes.get(self.map.by_source[canon], dtype))
            return t

    def bias_steps(self, cfg, weights, xs, dtype, lr) -> list[Tensors]:
        from flax import nnx

        bias_name, counts_name = (self.map.buffer_target(b) for b in BUFFERS)
        steps = []
        with _scope(dtype):
            module = self.build(cfg, weights, dtype)
            module.train()

            def var(name):
                return {_path(p): v for p, v in nnx.to_flat_state(nnx.state(module))}[name]

            for x in xs:
                _, aux = cc.split_result(_nnx_jitted()["call"](module, _cast(x, dtype), {}))
                aux = cc.rename_aux(aux, self.aux_names)
                if "selected_experts" not in aux:
                    raise KeyError(f"{self.name}: bias steps need 'selected_experts' among the module's aux tensors")
                counts = var(counts_name)[...]
                t = Tensors()
                t.put("tokens_per_expert", _np(counts), _dtype_name(counts))
                t.put("selected_experts", cc.as_rows("selected_experts", _np(aux["selected_experts"]), cfg), "int64")
                if self.update_bias is not None:
                    self.update_bias(module, lr)
                else:
                    new = cc.default_update(_np(var(bias_name)[...]), _np(counts), lr)
                    var(bias_name).set_value(_cast(new, "float32"))
                    var(counts_name).set_value(_cast(np.zeros(np.shape(counts)), "float32"))
                bias = var(bias_name)[...]
                t.put("expert_bias", _np(bias), _dtype_name(bias))
                steps.append(t)
        return steps


class LinenModuleColumn(_FlaxColumn):
    """A Flax Linen module as a column: ``module`` (a ``linen.Module``, or ``factory(cfg)`` returning
    one), ``mapping`` onto its ``params`` collection; forward and gradients, no bias steps."""

    def __init__(self, module, mapping: Mapping[str, object], *, name: str | None = None, has_aux: bool = True,
                 aux_names: Mapping[str, str] | None = None, lock_kwarg: str | None = None,
                 ignore: Sequence[str] = (), grads: bool = True, **hooks):
        super().__init__(mapping, name=name or f"linen-module:{type(module).__name__}", has_aux=has_aux,
                         aux_names=aux_names, lock_kwarg=lock_kwarg, grads=grads, ignore=ignore, bias=False, **hooks)
        self.module = module
        self.skip_reasons = cc.skip_reasons(has_aux=self.has_aux, grads=grads, lock=bool(lock_kwarg), bias=False,
                                            framework="flax", bias_why="the Linen adapter gives no bias steps "
                                            "(use NNXModuleColumn or a Runner of your own)")

    def _module(self, cfg):
        from flax import linen

        return self.module if isinstance(self.module, linen.Module) else cc.call_factory(self.module, cfg)

    def build(self, cfg, weights, dtype, x):
        """(module, params) with the params collection set from ``weights`` in ``dtype``."""
        import jax
        from flax import traverse_util

        cfg, weights = self.prepare(cfg, weights)
        module = self._module(cfg)
        shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
        flat = {".".join(k): v for k, v in traverse_util.flatten_dict(shapes).items()}
        arrays = self.map.module_arrays(weights, buffers=False)
        check_shapes(arrays, {n: tuple(v.shape) for n, v in flat.items()}, tuple(flat), self.ignore)
        params = traverse_util.unflatten_dict({tuple(n.split(".")): _cast(a, dtype) for n, a in arrays.items()})
        return module, params

    def forward(self, cfg, weights, x, dtype, selected_experts=None) -> Tensors:
        with _scope(dtype):
            xt = _cast(x, dtype)
            module, params = self.build(cfg, weights, dtype, xt)
            import jax

            apply = jax.jit(lambda p, xx, kw: module.apply({"params": p}, xx, **kw))  # one program, not op by op
            out, aux = cc.split_result(apply(params, xt, self._kwargs(selected_experts)))
            return self._tensors(cfg, x, out, aux)

    def grad(self, cfg, weights, x, dtype, cotangent, selected_experts=None) -> Tensors:
        import jax
        from flax import traverse_util

        with _scope(dtype):
            xt = _cast(x, dtype)
            module, params = self.build(cfg, weights, dtype, xt)
            cot = _cast(cotangent, "float64" if dtype == "float64" else "float32")
            kwargs = self._kwargs(selected_experts)

            def objective(p, xx):
                out, aux = cc.split_result(module.apply({"params": p}, xx, **kwargs))
                return _objective(out, aux, cot)

            g_p, g_x = jax.jit(jax.grad(objective, argnums=(0, 1)))(params, xt)
            flat = {".".join(k): v for k, v in traverse_util.flatten_dict(g_p).items()}
            _, w = self.prepare(cfg, weights)
            t = Tensors()
            t.put(GRAD_INPUT, _np(g_x), _dtype_name(g_x))
            for canon, g in self.map.canonical_grads({k: _np(v) for k, v in flat.items()}, w).items():
                t.put(canon, g, _dtype_name(flat[self.map.by_source[canon]]))
            return t
