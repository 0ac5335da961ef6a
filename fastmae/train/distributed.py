"""Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
or, as the reference's util/misc.py init_distributed_mode, from Slurm's (SLURM_PROCID, SLURM_LOCALID)
with --world_size and --dist_url (submitit_pretrain.py's launch: a task per GPU, a shared file to meet at).

NCCL on GPU, gloo on CPU. A second, gloo group carries host-side flags (stop requested, non-finite
loss) so that agreeing on them never makes the host wait for the GPU.
"""

from __future__ import annotations

import gc
import os
import re
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

    def ranks_on_this_machine(self) -> int:
        """Processes sharing this machine's cores: torchrun's LOCAL_WORLD_SIZE; under a Slurm launch (a
        task per GPU, no torchrun) this node's tasks (SLURM_NTASKS_PER_NODE, else the first count of
        SLURM_TASKS_PER_NODE: "4", "4(x2)"); else 1."""
        if "LOCAL_WORLD_SIZE" in os.environ:
            return int(os.environ["LOCAL_WORLD_SIZE"])
        if self.enabled and "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
            for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
                count = re.match(r"\d+", os.environ.get(name, ""))
                if count:
                    return int(count.group())
        return 1

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (a host-side all-reduce)."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def from_first_rank(self, value):
        """The first rank's ``value`` (any picklable object) on every rank: a decision only it can make,
        such as which file in a folder only it may see, taken once for all."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

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


def _environment_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"the environment variable {name} is {os.environ[name]!r}, not an integer") from None


def launched_ranks(world_size: int = 1, init_method: str = "env://") -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process. torchrun's variables first; else, when Slurm
    started it (SLURM_PROCID) and ``world_size`` (--world_size) is above 1, Slurm's task numbers, as
    the reference reads them; else one process. ValueError for a launch that cannot meet."""
    if world_size < 1:
        raise ValueError(f"--world_size must be >= 1, got {world_size}")
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:  # torchrun's word wins, as in the reference
        return tuple(_environment_int(name) if name in os.environ else default
                     for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if "SLURM_PROCID" not in os.environ or world_size <= 1:
        step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
        if "SLURM_PROCID" in os.environ and step_tasks.isdigit() and int(step_tasks) > 1:
            # srun started several tasks of this command: each would train alone, as a copy of the others
            raise ValueError(f"this is Slurm task {os.environ['SLURM_PROCID']} of the {step_tasks} that srun started "
                             f"(SLURM_STEP_NUM_TASKS), but --world_size is {world_size}: give --world_size {step_tasks} "
                             "and a --dist_url every task can reach (file:///a/shared/path), or start one task "
                             "per node running torchrun")
        # a Slurm job of one task per node running torchrun, or one process: as without Slurm
        return 0, 1, 0
    rank = _environment_int("SLURM_PROCID")
    if rank >= world_size:
        raise ValueError(f"Slurm task SLURM_PROCID {rank} is not below --world_size {world_size}: give --world_size "
                         "the job's number of tasks (nodes x tasks per node)")
    tasks = os.environ.get("SLURM_NTASKS")
    if tasks is not None and tasks.isdigit() and int(tasks) != world_size:
        # the ranks would wait for each other forever
        raise ValueError(f"--world_size {world_size}, but this Slurm job has {tasks} tasks (SLURM_NTASKS): the "
                         "process group needs one task per rank")
    if init_method == "env://" and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        raise ValueError("--dist_url env:// under Slurm needs MASTER_ADDR and MASTER_PORT in the environment, and "
                         "they are not set: give --dist_url file:///a/shared/path (a file every task can reach, "
                         "as submitit_pretrain.py does) or tcp://FIRST_NODE:PORT")
    if "SLURM_LOCALID" in os.environ:
        local_rank = _environment_int("SLURM_LOCALID")
    else:  # the reference's rank % device count
        local_rank = rank % max(torch.cuda.device_count(), 1)
    return rank, world_size, local_rank


def add_launch_arguments(parser) -> None:
    """The reference's distributed flags (a parser or an argument group). torchrun's environment decides
    where it is set; Slurm launches (the reference's submitit scripts) take the world size and meeting
    point from these flags."""
    parser.add_argument("--world_size", type=int, default=1,
                        help="number of processes when Slurm starts one per GPU without torchrun (SLURM_PROCID set): "
                             "each takes its rank from SLURM_PROCID and its GPU from SLURM_LOCALID; under torchrun "
                             "its WORLD_SIZE decides")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="ignored: torchrun sets LOCAL_RANK")
    parser.add_argument("--dist_on_itp", action="store_true", help="take ranks from OpenMPI's OMPI_COMM_WORLD_* variables")
    parser.add_argument("--dist_url", default="env://",
                        help="process-group init method: env:// (MASTER_ADDR/MASTER_PORT, as torchrun sets them), "
                             "or under Slurm a shared file:///path or tcp://FIRST_NODE:PORT")


def ranks_from_openmpi() -> None:
    """--dist_on_itp: the reference's OpenMPI launch; map its variables to torchrun's."""
    for ours, theirs in (("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
                         ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")):
        if theirs not in os.environ:
            raise ValueError(f"--dist_on_itp needs the OpenMPI variable {theirs}")
        os.environ[ours] = os.environ[theirs]


def init_from_launch_flags(requested_device: str | None, args) -> DistributedContext:
    """``init_distributed`` with the flags of ``add_launch_arguments`` (--dist_on_itp first maps OpenMPI's
    variables to torchrun's)."""
    if args.dist_on_itp:
        ranks_from_openmpi()
    ctx = init_distributed(requested_device, args.dist_url, world_size=args.world_size)
    if args.world_size not in (1, ctx.world_size) and ctx.is_main:  # said, not silently dropped
        launcher = ("torchrun's WORLD_SIZE decides" if "WORLD_SIZE" in os.environ
                    else "neither torchrun nor Slurm (SLURM_PROCID) started this process")
        print(f"--world_size {args.world_size}: {launcher}; training with {ctx.world_size} process(es)", flush=True)
    return ctx


def init_distributed(requested_device: str | None, init_method: str = "env://",
                     world_size: int = 1) -> DistributedContext:
    """The context of this process; joins the process group when launched by torchrun, or by Slurm
    with ``world_size`` (--world_size) above 1 (see launched_ranks)."""
    rank, world_size, local_rank = launched_ranks(world_size, init_method)
    named_gpu = (requested_device or "").startswith("cuda:")
    if world_size > 1 and named_gpu and torch.cuda.device_count() > 1:
        # every process on one GPU: NCCL refuses two ranks on a device
        raise ValueError(f"--device {requested_device} names one GPU for all {world_size} processes, and each takes "
                         "its own (the local rank: LOCAL_RANK or SLURM_LOCALID): give --device cuda, or leave it out")
    device = resolve_device(requested_device, local_rank)
    if world_size == 1:
        return DistributedContext(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        join_process_group(backend, init_method, rank, world_size, device_id=device if device.type == "cuda" else None)
    host_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DistributedContext(rank, world_size, local_rank, device, host_group)


def join_process_group(backend: str, init_method: str, rank: int, world_size: int,
                       device_id: torch.device | None = None) -> None:
    """``dist.init_process_group``, with torch._dynamo imported first.

    Importing torch._dynamo while a process group exists (DistributedDataParallel's constructor does)
    keeps references to the default group that nothing releases (torch 2.13). ``destroy_process_group``
    then leaves gloo's threads running until the interpreter exits, and a gloo thread that needs the GIL
    while the interpreter finalizes aborts the process ("terminate called without an active
    exception"): a run that ended well exits with SIGABRT, and torchrun reports the rank as failed.
    Imported before the group exists, it holds nothing of it and the group is torn down in full."""
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                            device_id=device_id)


def shutdown_distributed(ctx: DistributedContext) -> None:
    """Destroys the process group, once the DDP models holding it are gone (a model in a reference cycle
    goes with the collection), so that gloo's threads end here, not while the interpreter exits (see
    ``join_process_group``)."""
    if ctx.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
