"""Rank-side entry points of tests/torch/test_original_api.py's gloo tests
(``parity.mesh_torch.spawn("tests.torch.original_api_workers:...")``).

Each function runs in every rank of a 4-process gloo world and writes what it found to
``folder/<name>.rank{R}.json``; the test process reads and checks it.
"""

from __future__ import annotations

import json
import os

SEQ_LEN, BATCH, DIM = 8, 2, 8


def _counts(rank: int) -> list[float]:
    """Different counts per rank, so that a missing or doubled all-reduce shows."""
    return [[5.0, 0, 1, 2], [0, 0, 7, 1], [3, 3, 3, 3], [1, 9, 0, 0]][rank % 4]


def bias_over_groups(rank: int, world: int, folder: str) -> None:
    """``update_expert_bias(group=[...])`` over the groups of a (tp, cp, dp) = (1, 2, 2) mesh and of a
    (cp, dp) = (2, 2) mesh, and over the dp group alone."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moe_torch import MoE, update_expert_bias

    out = {"counts": _counts(rank)}
    mesh3 = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("tp", "cp", "dp"))
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "dp"))
    cases = {
        "tp_cp_dp": [mesh3.get_group("tp"), mesh3.get_group("cp"), mesh3.get_group("dp")],
        "cp_dp": (mesh2.get_group("cp"), mesh2.get_group("dp")),
        "dp_only": mesh2.get_group("dp"),
    }
    for name, group in cases.items():
        moe = MoE(DIM, 8, 4)
        moe.tokens_per_expert.copy_(torch.tensor(_counts(rank)))
        update_expert_bias(moe, 0.125, group=group)
        out[name] = moe.expert_bias.tolist()
        out[f"{name}_zeroed"] = not bool(moe.tokens_per_expert.any())
    out["dp_ranks"] = dist.get_process_group_ranks(cases["dp_only"])
    with open(os.path.join(folder, f"bias.rank{rank}.json"), "w") as f:
        json.dump(out, f)


def sequence_loss_over_cp(rank: int, world: int, folder: str) -> None:
    """The "sequence" loss of sequences split over the cp ranks of a (cp, dp) = (2, 2) mesh.

    Every rank builds the same layer and the same full batch (fixed seeds); a cp rank keeps its half
    of every sequence (dp ranks of a cp group hold the same batch here, which the check does not
    depend on). It reports the loss, the router gradient of its share, and the single-device loss
    and gradient of the whole sequences.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from moe_torch import MoE

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "dp"))
    cp_group, cp_rank = mesh.get_group("cp"), mesh.get_local_rank("cp")
    torch.manual_seed(0)
    full = MoE(DIM, 16, 8, 2, load_balance_loss="sequence", load_balance_coeff=0.01)
    split = MoE(DIM, 16, 8, 2, load_balance_loss="sequence", load_balance_coeff=0.01,
                sequence_partition_group=cp_group)
    split.load_state_dict(full.state_dict())
    x = torch.randn(BATCH, SEQ_LEN, DIM, generator=torch.Generator().manual_seed(1))
    half = SEQ_LEN // 2
    mine = x[:, cp_rank * half:(cp_rank + 1) * half]
    loss = split(mine)._load_balance_loss
    loss.backward()
    want = full(x)._load_balance_loss
    want.backward()
    out = {"cp_rank": cp_rank, "loss": float(loss), "want": float(want),
           "grad": split.router.gate.weight.grad.flatten().tolist(),
           "want_grad": full.router.gate.weight.grad.flatten().tolist()}
    local = MoE(DIM, 16, 8, 2, load_balance_loss="sequence", load_balance_coeff=0.01)
    local.load_state_dict(full.state_dict())
    out["local_loss"] = float(local(mine)._load_balance_loss)
    with open(os.path.join(folder, f"seq.rank{rank}.json"), "w") as f:
        json.dump(out, f)


def all_checks(rank: int, world: int, folder: str) -> None:
    bias_over_groups(rank, world, folder)
    sequence_loss_over_cp(rank, world, folder)
