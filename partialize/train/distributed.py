"""Process-group helpers shared by the data loaders, the trainer and the CLI (one place, one answer)."""

from __future__ import annotations

import os

import torch


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) when no process group is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (
            torch.distributed.get_rank(),
            torch.distributed.get_world_size(),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    return 0, 1, 0


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU).

    True when this process is part of a group of more than one, whether this call created the group
    or it was already initialised (by the CLI before it built the sharded loaders, or by the caller).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return True
