"""moe_jax: the Mixture-of-Experts layer in Flax NNX, mirroring moe_torch (DESIGN.md).

Never imports torch; of ``parity`` only ``parity.config``. Without JAX or Flax the import ends in an
``ImportError`` naming the extra to install.
"""

try:
    import flax  # noqa: F401
    import jax  # noqa: F401
except ModuleNotFoundError as _exc:
    if _exc.name not in ("jax", "flax", "jaxlib"):
        raise
    raise ImportError(f'moe_jax needs JAX and Flax ({_exc.name} is not installed): '
                      f'pip install "moe-parity[jax]"') from _exc

from moe_jax.balancing import aux_loss_auto_scaler, load_balance_loss, router_z_loss, update_expert_bias
from moe_jax.experts import GroupedExperts
from moe_jax.feed_forward import FeedForward
from moe_jax.moe import MoE
from moe_jax.router import RouterOutput, TokenChoiceTopKRouter
from moe_jax.weights import StateDictError, load_state_dict, state_dict

__all__ = [
    "FeedForward",
    "GroupedExperts",
    "TokenChoiceTopKRouter",
    "RouterOutput",
    "MoE",
    "update_expert_bias",
    "load_balance_loss",
    "router_z_loss",
    "aux_loss_auto_scaler",
    "load_state_dict",
    "state_dict",
    "StateDictError",
]
