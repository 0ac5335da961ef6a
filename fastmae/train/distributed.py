"""Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

NCCL on GPU, gloo on CPU. A second, gloo group carries host-side flags (stop requested, non-finite
loss) so that agreeing on them never makes the host wait for the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastmae.device import device_from_flag


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    host_group: object | None = None  # gloo group for CPU flags; None when single-process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (a host-side all-reduce)."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.host_group)


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """``--device``: None = cuda when available, else cpu; a bare 'cuda' means this rank's GPU."""
    device = device_from_flag(requested)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(requested_device: str | None, init_method: str = "env://") -> DistributedContext:
    """The context of this process; joins the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size == 1:
        return DistributedContext(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    host_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DistributedContext(rank, world_size, local_rank, device, host_group)


def shutdown_distributed(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
