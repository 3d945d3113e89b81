"""One process of a (possibly) multi-process run: which rank it is, how many there are, which device it uses.

`torchrun --nproc_per_node N -m train.dfqf ...` sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python -m` run is
rank 0 of 1. Multi-process runs use NCCL on CUDA and gloo on the CPU; rank 0 writes every output.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from core.errors import DFQFError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(requested: str) -> Dist:
    """This process's rank and device; `requested` is auto, cpu, cuda or cuda:N."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if requested == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            device_type = torch.device(requested).type
        except RuntimeError:
            raise DFQFError(f"unknown --device {requested!r} (auto, cpu, cuda, cuda:N)") from None
        if device_type == "cuda" and not torch.cuda.is_available():
            raise DFQFError("--device cuda: CUDA is not available on this machine")
    if world == 1:
        return Dist(0, 1, torch.device(device_type if requested == "auto" else requested))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    device = torch.device(f"cuda:{local}") if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(rank, world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
