"""``moe_jax`` as a parity column: "jax:cpu", "jax:gpu", "jax:tpu".

jax and flax are imported inside the methods. float64 runs happen under ``jax.enable_x64(True)``
(scoped, so the rest of the process keeps JAX's float32 default).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence

import numpy as np

from parity.backends.base import GRAD_INPUT, Runner, Tensors
from parity.config import MoEConfig

BUFFERS = ("expert_bias", "tokens_per_expert")


def _dtype_name(a) -> str:
    return str(np.dtype(a.dtype))


class JaxRunner(Runner):
    """One JAX platform. ``platform``: "cpu" | "gpu" | "tpu"."""

    capabilities = frozenset({"forward", "aux", "lock", "grad", "bias"})

    def __init__(self, platform: str = "cpu", **hooks):
        super().__init__(**hooks)
        self.platform = platform
        self.name = f"jax:{platform}"

    def unavailable(self) -> str | None:
        for mod in ("jax", "flax", "moe_jax"):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed"
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
        import jax.numpy as jnp
        from flax import nnx

        import moe_jax

        cfg, weights = self.prepare(cfg, weights)
        moe = moe_jax.MoE(**cfg.to_kwargs(), rngs=nnx.Rngs(0), param_dtype=jnp.dtype(dtype))
        mapping = {name: jnp.asarray(np.asarray(value, np.float64).astype(
            np.float32 if name in BUFFERS or dtype != "float64" else np.float64)).astype(
            jnp.float32 if name in BUFFERS else jnp.dtype(dtype))
            for name, value in weights.items()}
        moe_jax.load_state_dict(moe, mapping)
        return moe

    @staticmethod
    def _x(x, dtype):
        import jax.numpy as jnp

        x = np.asarray(x, np.float64)
        return jnp.asarray(x if dtype == "float64" else x.astype(np.float32)).astype(jnp.dtype(dtype))

    @staticmethod
    def _np(a) -> np.ndarray:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.integer):
            return a.astype(np.int64)
        return np.asarray(a.astype(np.float64))

    def forward(self, cfg, weights, x, dtype, selected_experts=None) -> Tensors:
        import jax.numpy as jnp

        with self._scope(dtype):
            moe = self._build(cfg, weights, dtype)
            moe.eval()
            kwargs = {} if selected_experts is None else {
                "selected_experts": jnp.asarray(np.asarray(selected_experts, np.int32))}
            out, aux = moe(self._x(x, dtype), return_aux=True, **kwargs)
            t = Tensors()
            t.put("out", self._np(out), _dtype_name(out))
            for key, value in aux.items():
                t.put(key, self._np(value), _dtype_name(value))
        return t

    def grad(self, cfg, weights, x, dtype, cotangent, selected_experts=None) -> Tensors:
        import jax.numpy as jnp
        from flax import nnx

        import moe_jax

        with self._scope(dtype):
            moe = self._build(cfg, weights, dtype)
            moe.eval()
            acc = jnp.float64 if dtype == "float64" else jnp.float32
            cot = jnp.asarray(np.asarray(cotangent, np.float64).astype(np.dtype(acc)))
            kwargs = {} if selected_experts is None else {
                "selected_experts": jnp.asarray(np.asarray(selected_experts, np.int32))}

            def objective(module, xt):
                out, aux = module(xt, return_aux=True, **kwargs)
                loss = (out.astype(acc) * cot).sum()
                for key in ("load_balance_loss", "router_z_loss"):
                    if key in aux:
                        loss = loss + aux[key].astype(acc)
                return loss

            g_module, g_x = nnx.grad(objective, argnums=(0, 1))(moe, self._x(x, dtype))
            t = Tensors()
            t.put(GRAD_INPUT, self._np(g_x), _dtype_name(g_x))
            for name, g in moe_jax.state_dict(g_module).items():
                if name in BUFFERS:
                    continue
                t.put(name, self._np(g), _dtype_name(g))
        return t

    def bias_steps(self, cfg, weights, xs: Sequence[np.ndarray], dtype, lr) -> list[Tensors]:
        import moe_jax
        from moe_jax.balancing import update_expert_bias

        steps = []
        with self._scope(dtype):
            moe = self._build(cfg, weights, dtype)
            moe.train()
            for x in xs:
                _, aux = moe(self._x(x, dtype), return_aux=True)
                state = moe_jax.state_dict(moe)
                t = Tensors()
                t.put("tokens_per_expert", self._np(state["tokens_per_expert"]),
                      _dtype_name(state["tokens_per_expert"]))
                t.put("selected_experts", self._np(aux["selected_experts"]), "int64")
                update_expert_bias(moe, lr)
                bias = moe_jax.state_dict(moe)["expert_bias"]
                t.put("expert_bias", self._np(bias), _dtype_name(bias))
                steps.append(t)
        return steps
