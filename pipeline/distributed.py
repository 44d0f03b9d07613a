"""torchrun support: read the environment torchrun sets and start the process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.device import resolve_device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). NCCL on GPUs, gloo on CPU; one process per GPU (LOCAL_RANK)."""
    if not launched_by_torchrun():
        return 0, 1, resolve_device(device_choice)
    device = resolve_device(device_choice)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
