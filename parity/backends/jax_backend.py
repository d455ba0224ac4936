"""``moe_jax`` as a parity column: "jax:cpu", "jax:gpu", "jax:tpu".

jax and flax are imported inside the methods. float64 runs happen under ``jax.enable_x64(True)``
(scoped, so the rest of the process keeps JAX's float32 default).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Sequence

import numpy as np

from parity.backends.base import GRAD_INPUT, Runner, Tensors
from parity.config import MoEConfig

BUFFERS = ("expert_bias", "tokens_per_expert")


def _dtype_name(a) -> str:
    return str(np.dtype(a.dtype))


class JaxRunner(Runner):
    """One JAX platform. ``platform``: "cpu" | "gpu" | "tpu".

    ``jit=False`` (column "jax:<platform>+eager", ``moe-parity run --compile``): the same steps run op
    by op instead of under ``nnx.jit``, so the report shows what jit changed.
    """

    capabilities = frozenset({"forward", "aux", "lock", "grad", "bias"})

    def __init__(self, platform: str = "cpu", *, jit: bool = True, **hooks):
        super().__init__(**hooks)
        self.platform = platform
        self.jit = jit
        self.name = f"jax:{platform}" + ("" if jit else "+eager")

    def unavailable(self) -> str | None:
        for mod in ("jax", "flax", "moe_jax"):
            if importlib.util.find_spec(mod) is None:
                return f'{mod} is not installed (pip install "moe-parity[jax]")'
        try:
            import jax

            import moe_jax  # noqa: F401

            jax.devices(self.platform)
        except RuntimeError as exc:
            return f"no JAX {self.platform} device ({str(exc).splitlines()[0]})"
        except Exception as exc:
            return f"cannot import: {type(exc).__name__}: {exc}".splitlines()[0]
        return None

    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _scope(self, dtype: str):
        import jax

        with contextlib.ExitStack() as stack:
            if dtype == "float64":
                stack.enter_context(jax.enable_x64(True))
            stack.enter_context(jax.default_device(jax.devices(self.platform)[0]))
            yield

    def _build(self, cfg: MoEConfig, weights, dtype: str):
        """A ``moe_jax.MoE`` holding ``weights`` in ``dtype`` (buffers float32).

        The module is traced abstractly (``nnx.eval_shape``: no random initialisation is run, so
        nothing is compiled for it) and its variables are filled from NumPy arrays cast on the host.
        """
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import moe_jax

        cfg, weights = self.prepare(cfg, weights)
        moe = nnx.eval_shape(lambda: moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0),
                                                 param_dtype=jnp.dtype(dtype)))
        for _, var in nnx.to_flat_state(nnx.state(moe)):
            var.set_value(jax.device_put(np.zeros(var.shape, var.dtype)))
        moe_jax.load_state_dict(moe, {name: host_cast(value, "float32" if name in BUFFERS else dtype)
                                      for name, value in weights.items()})
        return moe

    @staticmethod
    def _x(x, dtype):
        import jax

        return jax.device_put(host_cast(x, dtype))

    @staticmethod
    def _np(a) -> np.ndarray:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.integer):
            return a.astype(np.int64)
        return np.asarray(a.astype(np.float64))

    @staticmethod
    def _selected(selected_experts, cfg: MoEConfig):
        """Locked routing as int32, range-checked here (inside ``jit`` the module cannot check values)."""
        import jax

        if selected_experts is None:
            return None
        idx = np.asarray(selected_experts)
        if idx.size and (idx.min() < 0 or idx.max() >= cfg.num_experts):
            raise ValueError(f"selected_experts holds values in [{idx.min()}, {idx.max()}]; expected expert "
                             f"indices in [0, num_experts={cfg.num_experts})")
        return jax.device_put(idx.astype(np.int32))

    def forward(self, cfg, weights, x, dtype, selected_experts=None, kept_slots=None) -> Tensors:
        with self._scope(dtype):
            moe = self._build(cfg, weights, dtype)
            moe.eval()
            out, aux = _jitted(self.jit)["forward"](moe, self._x(x, dtype), self._selected(selected_experts, cfg),
                                            _kept(kept_slots))
            t = Tensors()
            t.put("out", self._np(out), _dtype_name(out))
            for key, value in aux.items():
                t.put(key, self._np(value), _dtype_name(value))
        return t

    def grad(self, cfg, weights, x, dtype, cotangent, selected_experts=None, kept_slots=None) -> Tensors:
        import moe_jax

        with self._scope(dtype):
            moe = self._build(cfg, weights, dtype)
            moe.eval()
            acc = "float64" if dtype == "float64" else "float32"
            g_params, g_x = _jitted(self.jit)["grad"](moe, self._x(x, dtype), self._x(cotangent, acc),
                                              self._selected(selected_experts, cfg), _kept(kept_slots))
            t = Tensors()
            t.put(GRAD_INPUT, self._np(g_x), _dtype_name(g_x))
            for name, g in moe_jax.state_dict(g_params).items():
                if name in BUFFERS:
                    continue
                t.put(name, self._np(g), _dtype_name(g))
        return t

    def bias_steps(self, cfg, weights, xs: Sequence[np.ndarray], dtype, lr) -> list[Tensors]:
        import jax

        steps = []
        with self._scope(dtype):
            moe = self._build(cfg, weights, dtype)
            moe.train()
            step, update = _jitted(self.jit)["bias_step"], _jitted(self.jit)["bias_update"]
            lr32 = jax.device_put(np.float32(lr))
            for x in xs:
                counts, selected = step(moe, self._x(x, dtype))
                # NOTE: a program of its own: the update is a host callback (bit identity with the NumPy
                # rule), and JAX never keeps a program holding one in its persistent cache
                bias = update(moe, lr32)
                t = Tensors()
                t.put("tokens_per_expert", self._np(counts), _dtype_name(counts))
                t.put("selected_experts", self._np(selected), "int64")
                t.put("expert_bias", self._np(bias), _dtype_name(bias))
                steps.append(t)
        return steps


def host_cast(value, dtype: str) -> np.ndarray:
    """``value`` (float64 holding values exact in ``dtype``) as a NumPy array of ``dtype``, cast on the
    host (ml_dtypes for bfloat16), so that loading weights or an input compiles nothing."""
    import jax.numpy as jnp

    return np.asarray(value, np.float64).astype(jnp.dtype(dtype))


CACHE_ENV = "MOE_PARITY_JAX_CACHE"  #: a directory for JAX's compilation cache, or "0"/"off" for none


def default_cache_dir() -> str | None:
    """Where ``moe-parity run`` keeps JAX's persistent compilation cache, or ``None`` when it is off.

    ``$MOE_PARITY_JAX_CACHE`` when set ("0", "off", "no", "false" or "" turn the cache off), else
    ``$XDG_CACHE_HOME/moe-parity/jax``, else ``~/.cache/moe-parity/jax`` (the XDG base-directory rule).
    """
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "no", "false") else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moe-parity", "jax")


def enable_compile_cache(directory: str) -> None:
    """Keep compiled XLA programs in ``directory`` (created if missing) across processes.

    JAX's persistent compilation cache: a later run with the same config, shapes and versions loads
    the programs instead of compiling them (entries are keyed by the program, the jax/jaxlib version
    and the device, so a stale entry is never used). Every program is cached, however fast it compiled
    (JAX's default skips those under 1 s). Sets JAX's environment variables (so that worker processes,
    ``moe-parity run --mesh``, use the cache too) and, when jax is already imported, its config.
    """
    os.makedirs(directory, exist_ok=True)
    settings = {"jax_compilation_cache_dir": directory, "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    for key, value in settings.items():  # read by jax when imported, here or in a worker process
        os.environ[key.upper()] = str(value)
    if "jax" in sys.modules:
        import jax

        for key, value in settings.items():
            jax.config.update(key, value)


def _kept(kept_slots):
    """A locked drop decision of step (6a) as a bool device array, or None."""
    if kept_slots is None:
        return None
    import jax

    return jax.device_put(np.asarray(kept_slots, bool))


_JITTED: dict = {}
_EAGER: dict = {}  # the same four functions, not jitted (the "jax:<platform>+eager" column)


def _jitted(jit: bool = True) -> dict:
    """The three compiled steps, built once per process (``nnx.jit``; jax is imported on first use).

    Each is traced once per (module structure, shapes, dtype, locked or free routing): a default run
    compiles the forward, the gradient (run dtype; float64, routing locked to the reference's choice)
    and the bias step once each, where op-by-op dispatch compiled every operation separately (issue
    14: 261 compilations). Programs holding a host callback (the locked gradient: moe_jax checks the
    range of a traced ``selected_experts`` with one) are never kept in the persistent cache.
    ``forward(moe, x, selected)`` -> (out, aux); ``grad(moe, x, cotangent, selected)`` ->
    (parameter gradients as an ``nnx.State``, gradient w.r.t. ``x``) of ``sum(out * cotangent)`` plus
    the enabled aux losses, accumulated in the cotangent's dtype; ``bias_step(moe, x)`` -> (the
    counts a training-mode forward leaves in ``moe.tokens_per_expert``, its ``selected_experts``),
    updating ``moe`` in place; ``bias_update(moe, lr)`` -> ``expert_bias`` after ``update_expert_bias``
    (a program of its own: it holds a host callback, which the persistent cache never keeps).
    ``jit=False``: the same functions run op by op (eager JAX), for ``JaxRunner(jit=False)``.
    """
    if _JITTED:
        return _JITTED if jit else _EAGER
    from flax import nnx

    from moe_jax.balancing import update_expert_bias

    def forward(moe, x, selected, kept=None):
        return moe(x, return_aux=True, selected_experts=selected, **({} if kept is None else {"kept_slots": kept}))

    def grad(moe, x, cot, selected, kept=None):
        def objective(module, xt):
            out, aux = module(xt, return_aux=True, selected_experts=selected,
                              **({} if kept is None else {"kept_slots": kept}))
            loss = (out.astype(cot.dtype) * cot).sum()
            for key in ("load_balance_loss", "router_z_loss"):
                if key in aux:
                    loss = loss + aux[key].astype(cot.dtype)
            return loss

        return nnx.grad(objective, argnums=(0, 1))(moe, x)

    def bias_step(moe, x):
        _, aux = moe(x, return_aux=True)
        return moe.tokens_per_expert[...], aux["selected_experts"]

    def bias_update(moe, lr):
        update_expert_bias(moe, lr)
        return moe.expert_bias[...]

    _EAGER.update(forward=forward, grad=grad, bias_step=bias_step, bias_update=bias_update)
    _JITTED.update({name: nnx.jit(fn) for name, fn in _EAGER.items()})
    return _JITTED if jit else _EAGER
