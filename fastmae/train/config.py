"""The pretraining configuration: the reference ``main_pretrain.py`` flags (same names, same
meanings, the paper's recipe as defaults) plus fastmae's own, and the embedded-default demo settings."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from fastmae.compiling import CompileConfig
from fastmae.models import model_arch
from fastmae.train.cuda_graph import cuda_graph_choice

PRECISIONS = ("bf16", "fp16", "fp32")
SEEDS = range(2**63)  # they key numpy's SeedSequence (non-negative) and torch's generators (64-bit)
EMBEDDED_DEFAULT = "skimage.data photographs (embedded)"

# What `fastmae pretrain` without --data_path changes, for each flag the user did not set: a small
# model that learns visibly within minutes on a 2-core CPU (measured; see the README).
DEMO_SETTINGS = dict(
    model="mae_vit_demo_patch8",
    input_size=64,
    batch_size=32,
    epochs=20,
    warmup_epochs=1,
    blr=4e-3,
    samples_per_epoch=1024,
    # one core computes, one decodes: two busy threads on two cores, never more (an oversubscribed
    # OpenMP pool makes each step several times slower)
    threads=1,
    num_workers=1,
    save_every=128,
    log_every=8,
)


REFERENCE_NUM_WORKERS = 10  # main_pretrain.py's --num_workers


def default_num_workers(local_world_size: int = 1) -> int:
    """Loader workers per rank without --num_workers: the reference's 10, at most this machine's CPU
    cores per rank less one for the main process (more workers than cores only take turns, and torch
    warns about them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(REFERENCE_NUM_WORKERS, cores // max(1, local_world_size) - 1))


def seed_flag(text: str) -> int:
    """argparse type of the commands' --seed: an integer in SEEDS."""
    value = int(text)
    if value not in SEEDS:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {value}")
    return value


@dataclass
class PretrainConfig:
    # --- the reference main_pretrain.py flags ---
    batch_size: int = 64  # per GPU; effective batch = batch_size x accum_iter x world size
    epochs: int = 800  # the paper's ablation length (1600 for its best results)
    accum_iter: int = 1
    model: str = "mae_vit_large_patch16"
    input_size: int = 224
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    weight_decay: float = 0.05
    lr: float | None = None  # absolute lr; None = blr x effective batch / 256
    blr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_epochs: float = 40
    data_path: str | None = None  # None = the embedded photographs with the demo settings
    output_dir: str = "./output_dir"
    log_dir: str | None = None  # TensorBoard; None = output_dir
    device: str | None = None  # None = cuda when available, else cpu
    seed: int = 0
    resume: str = ""  # a checkpoint file, or "auto" for the newest in output_dir
    start_epoch: int = 0
    num_workers: int | None = None  # None: default_num_workers()
    pin_mem: bool = True
    # --- fastmae's own ---
    max_steps: int | None = None  # stop after this many optimizer steps in total
    precision: str | None = None  # bf16 | fp16 | fp32; None = bf16 on CUDA, fp32 on CPU
    compile: bool = False
    compile_scope: str = "model"  # model | blocks (see fastmae.compiling)
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead = CUDA graphs
    # the eager step captured and replayed as one CUDA graph: auto | on | off (or a bool), fastmae.train.cuda_graph
    cuda_graph: str | bool = "auto"
    kernels: str = "auto"
    attn: str = "sdpa"
    data_loader: str = "auto"
    save_every: int = 1000  # optimizer steps between checkpoints (also saved at the end and on SIGTERM)
    log_every: int = 20  # optimizer steps between logging steps (the only host-device syncs)
    keep_checkpoints: int = 2  # newest step checkpoints kept in output_dir
    save_epochs: int = 20  # the reference's checkpoint-{epoch}.pth every this many epochs and at the last; 0: none
    samples_per_epoch: int | None = None  # embedded photographs only: random crops per epoch
    threads: int | None = None  # CPU threads for the model's math (torch.set_num_threads); None = torch's choice
    progress_bar: bool = True

    def __post_init__(self):
        positive = dict(batch_size=self.batch_size, epochs=self.epochs, accum_iter=self.accum_iter,
                        input_size=self.input_size, save_every=self.save_every, log_every=self.log_every,
                        keep_checkpoints=self.keep_checkpoints, blr=self.blr)
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")
        cuda_graph_choice(self.cuda_graph)  # a ValueError naming a value that is none of them
        try:
            patch_size = model_arch(self.model)["patch_size"]
        except ValueError as err:
            raise ValueError(f"--model {self.model}: {err}") from None
        if self.input_size % patch_size:
            raise ValueError(f"--input_size {self.input_size} is not a multiple of {self.model}'s patch size "
                             f"{patch_size}")
        non_negative = dict(warmup_epochs=self.warmup_epochs, weight_decay=self.weight_decay, min_lr=self.min_lr,
                            start_epoch=self.start_epoch, num_workers=self.num_workers, save_epochs=self.save_epochs)
        for name, value in non_negative.items():
            if value is not None and value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value}")
        if not 0.0 < self.mask_ratio < 1.0:
            # the loss averages over the removed patches: with none removed it is 0/0
            raise ValueError(f"--mask_ratio must be in (0, 1), got {self.mask_ratio}"
                             + (": 0 removes no patch, leaving the loss nothing to average" if self.mask_ratio == 0 else ""))
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"--max_steps must be positive, got {self.max_steps}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be positive, got {self.threads}")
        if not str(self.output_dir).strip():
            # main_pretrain.py's "empty for no saving"; read as a path it would be the current folder
            raise ValueError(f"--output_dir is empty ({self.output_dir!r}): main_pretrain.py then saves nothing, and "
                             "a fastmae run always keeps checkpoints to resume from: give a folder")
        if self.seed not in SEEDS:
            raise ValueError(f"--seed must be an integer in [0, 2**63), got {self.seed}")
        if (self.compile_scope, self.compile_mode) != ("model", "default") and not self.compile:
            raise ValueError(f"--compile_scope {self.compile_scope} --compile_mode {self.compile_mode} set how --compile "
                             f"compiles: add --compile")
        compiled = self.compile_config()
        if compiled is not None and compiled.uses_cuda_graphs and self.accum_iter > 1:
            # CUDA graphs hand their static output memory to .grad, and a second backward into that
            # .grad is overwritten by the next replay (pytorch/pytorch#169545: wrong gradients)
            raise ValueError(f"--compile_mode {self.compile_mode} (CUDA graphs) needs --accum_iter 1, got "
                             f"{self.accum_iter}; use --compile_mode max-autotune-no-cudagraphs or default")

    def compile_config(self) -> CompileConfig | None:
        """How --compile compiles the model; None without --compile."""
        if not self.compile:
            return None
        try:
            return CompileConfig(scope=self.compile_scope, mode=self.compile_mode)
        except ValueError as err:
            raise ValueError(f"--compile_scope/--compile_mode: {err}") from None

    @property
    def uses_embedded_data(self) -> bool:
        return self.data_path is None

    @classmethod
    def from_args(cls, args, explicit: set[str] = frozenset()) -> tuple["PretrainConfig", dict]:
        """The config of parsed flags; without --data_path the demo settings replace every flag not in
        ``explicit``. Returns (config, the demo settings applied)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        applied = {}
        if values.get("data_path") is None:
            applied = {k: v for k, v in DEMO_SETTINGS.items() if k not in explicit}
            values.update(applied)
        return cls(**values), applied
