"""Helpers shared by the compat modules."""
from __future__ import annotations

import torch


def world_size(group=None) -> int:
    """The number of processes of an initialized torch.distributed run, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group)
    return 1


def distributed_pending(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{what} in a multi-process run is not available in this version of contrastive_kernels; "
        "use it in a single process, or the nn modules' distributed= option when it lands")
