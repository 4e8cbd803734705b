"""Devices and multi-process training (torchrun → DDP): the process group from the environment, rank-0 helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import ConfigError

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """The processes training together: `size` 1 for a plain run, N under `torchrun --nproc-per-node N`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def lead(self) -> bool:
        """Rank 0: the one process that logs to MLflow and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"finetune.device: '{name}' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def init_distributed(device: str = "auto") -> World:
    """Join the process group that torchrun describes (WORLD_SIZE > 1), else a one-process world.

    Backend: nccl when the device is CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
    Calling it again in the same process reuses the group.

    Args:
        device: ``finetune.device`` ("auto", "cpu", "cuda").

    Raises:
        ConfigError: WORLD_SIZE > 1 without the other torchrun variables.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if size <= 1:
        return World(device=dev)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={size} but {', '.join(missing)} unset: start multi-process training with "
            "`torchrun --nproc-per-node N -m pipeline train CONFIG`, or unset WORLD_SIZE"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:  # a long timeout: rank 0 may ingest an archive while the others wait at a barrier
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def shutdown(world: World) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum over all ranks (float64)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DistributedDataParallel around `model` (already on `world.device`) when training with N > 1 processes.

    Build it again whenever the set of trainable parameters changes (DDP registers gradient
    hooks for the parameters that require grad at construction).
    """
    if not world.distributed:
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
