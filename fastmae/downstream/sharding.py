"""How linprobe and finetune split their images among processes, and where each sample's randomness
comes from.

Train: every epoch a fresh permutation from (seed, epoch), padded to a multiple of the number of
processes by wrapping around, as the reference's DistributedSampler, rank r taking every W-th item
(``fastmae.data.sources.shard_indices``, pretraining's order). Each sample is keyed (item, epoch,
position in the epoch's global order) and its augmentation is drawn from that key alone: the same
whichever process or loader worker draws it, so a run on W processes of batch B sees what one
process of batch W x B sees, and a resumed run repeats the epochs of a run never stopped.

Eval: rank r takes items r, r + W, r + 2W, ... without padding, and the counts are summed across
the processes, so every val image is counted exactly once (the reference's --dist_eval pads with
repeats; without it every process evaluates the whole set).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastmae.data.sources import shard_indices


class TrainKeys(torch.utils.data.Sampler):
    """(item, epoch, position) keys of this rank's share of an epoch; ``set_epoch`` before each."""

    def __init__(self, num_items: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError("cannot sample from an empty image folder")
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_items // self.world_size)

    def __iter__(self):
        indices = shard_indices(self.num_items, self.epoch, self.seed, self.rank, self.world_size)
        for row, index in enumerate(indices.tolist()):
            yield index, self.epoch, row * self.world_size + self.rank


class InOrderShard(torch.utils.data.Sampler):
    """Items rank, rank + W, ...: every item on exactly one rank, in order. ``pad``: wrap around so that
    every rank has as many (what ``gather_shards`` needs)."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1, pad: bool = False):
        self.items = (shard_indices(num_items, 0, 0, rank, world_size, shuffle=False).tolist() if pad
                      else range(rank, num_items, world_size))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def several_processes() -> bool:
    """Whether this process is one of a process group of several (the collectives below have work to do)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the processes (itself when there is one); one collective, float64."""
    if not several_processes():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather_shards(shard: torch.Tensor, num_items: int) -> torch.Tensor:
    """[per_rank, ...] rows of ``InOrderShard(num_items, rank, W, pad=True)`` on every rank -> all
    [num_items, ...] rows in item order, on every rank (the wrap-around padding dropped)."""
    if not several_processes():
        return shard[:num_items]
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, shard.contiguous())
    # rank r held items r, r + W, ...: interleave the ranks' rows back into item order
    return torch.stack(parts, dim=1).flatten(0, 1)[:num_items]


def averaged_at_step_end(module: torch.nn.Module, ends_a_step: bool):
    """The context of a batch's forward and backward: under DistributedDataParallel, a batch that does
    not end an optimizer step keeps its gradients local (no_sync), so the replicas average them once
    per step, not once per batch of the accumulation."""
    if isinstance(module, DistributedDataParallel) and not ends_a_step:
        return module.no_sync()
    return contextlib.nullcontext()


def take_first_process_buffers(module: torch.nn.Module) -> None:
    """Every process's buffers (a BatchNorm's running statistics) made the first process's: DDP copies
    them at each forward, so after an epoch's last batch each process holds its own, and an evaluation
    split among the processes would score the saved (first) model with others' statistics."""
    if several_processes():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
