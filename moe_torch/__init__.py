"""moe_torch: the PyTorch half of moe-parity (see DESIGN.md).

torch_npu is never imported here: the "npu" kernel imports it when it runs. Without PyTorch the import
ends in an ``ImportError`` naming the extra to install.
"""

try:
    import torch  # noqa: F401
except ModuleNotFoundError as _exc:
    if _exc.name != "torch":
        raise
    raise ImportError('moe_torch needs PyTorch, which is not installed: pip install "moe-parity[torch]" '
                      "(a machine without a GPU: pip install torch --index-url "
                      "https://download.pytorch.org/whl/cpu first, for the CPU-only wheel)") from _exc

from moe_torch.balancing import MoEAuxLossAutoScaler, load_balance_loss, router_z_loss, update_expert_bias
from moe_torch.experts import GroupedExperts
from moe_torch.feed_forward import FeedForward
from moe_torch.moe import MoE
from moe_torch.router import RouterOutput, TokenChoiceTopKRouter

__all__ = [
    "FeedForward",
    "GroupedExperts",
    "TokenChoiceTopKRouter",
    "RouterOutput",
    "MoE",
    "update_expert_bias",
    "load_balance_loss",
    "router_z_loss",
    "MoEAuxLossAutoScaler",
]
