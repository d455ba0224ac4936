"""moe_torch: the PyTorch half of moe-parity (see DESIGN.md).

torch_npu is never imported here: the "npu" kernel imports it when it runs.
"""

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
