"""Helpers shared by the compat modules."""
from __future__ import annotations

import torch


def world_size(group=None) -> int:
    """The number of processes of an initialized torch.distributed run, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group)
    return 1


def check_rank_world(what: str, rank: int, world: int) -> None:
    """open_clip passes rank / world_size explicitly: they must match torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"{what}(world_size={world}) needs an initialized torch.distributed process group "
                           "(call torch.distributed.init_process_group first)")
    real_rank, real_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if (rank, world) != (real_rank, real_world):
        raise ValueError(f"{what}: rank={rank}, world_size={world} do not match torch.distributed "
                         f"(rank {real_rank} of {real_world})")
