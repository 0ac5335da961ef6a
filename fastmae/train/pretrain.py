"""``fastmae pretrain``: the reference ``main_pretrain.py`` flags, the paper's recipe as defaults.

Single process:   fastmae pretrain --data_path /data/imagenet --model mae_vit_base_patch16
Multi-GPU (DDP):  torchrun --nproc_per_node 8 -m fastmae pretrain --data_path ...
Slurm, a task per GPU (as submitit_pretrain.py):  srun ... fastmae pretrain --world_size N --dist_url file:///shared/f
Without --data_path it trains a small model on photographs embedded in scikit-image (the demo
settings of ``config.DEMO_SETTINGS`` replace every flag you did not set).
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastmae.compiling import COMPILE_MODES, COMPILE_SCOPES
from fastmae.data.loader import LOADER_CHOICES
from fastmae.train.config import DEMO_SETTINGS, PRECISIONS, REFERENCE_NUM_WORKERS, PretrainConfig
from fastmae.train.cuda_graph import CUDA_GRAPH_CHOICES
from fastmae.train.distributed import add_launch_arguments

# argparse records here which flags the user typed, so demo settings never override them
EXPLICIT_FLAGS_ATTR = "_explicit_flags"


def _recording(action_class: type[argparse.Action]) -> type[argparse.Action]:
    class Recording(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            explicit = set(getattr(namespace, EXPLICIT_FLAGS_ATTR, ()))
            setattr(namespace, EXPLICIT_FLAGS_ATTR, explicit | {self.dest})
            super().__call__(parser, namespace, values, option_string)

    return Recording


_STORE = _recording(argparse._StoreAction)
_STORE_TRUE = _recording(argparse._StoreTrueAction)
_STORE_FALSE = _recording(argparse._StoreFalseAction)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PretrainConfig(data_path="")  # the defaults
    parser.epilog = ("Without --data_path: a demo on photographs embedded in scikit-image; these settings replace the "
                     "defaults of flags you do not set: " + " ".join(f"--{k} {v}" for k, v in DEMO_SETTINGS.items()))
    ref = parser.add_argument_group("reference main_pretrain.py flags (paper recipe defaults)")
    ref.add_argument("--batch_size", type=int, default=d.batch_size, action=_STORE,
                     help="batch size per GPU; effective batch = batch_size x accum_iter x number of GPUs")
    ref.add_argument("--epochs", type=int, default=d.epochs, action=_STORE,
                     help="epochs of the schedule (the paper and PRETRAIN.md: 800 for ablations, 1600 for its best "
                          "results; main_pretrain.py's own default is 400)")
    ref.add_argument("--accum_iter", type=int, default=d.accum_iter, action=_STORE,
                     help="gradient accumulation steps per optimizer step")
    ref.add_argument("--model", default=d.model, action=_STORE, metavar="MODEL", help="fastmae.models.MODEL_ARCHS name")
    ref.add_argument("--input_size", type=int, default=d.input_size, action=_STORE, help="image size")
    ref.add_argument("--mask_ratio", type=float, default=d.mask_ratio, action=_STORE, help="fraction of patches removed")
    ref.add_argument("--norm_pix_loss", default=d.norm_pix_loss, action=_STORE_TRUE,
                     help="per-patch normalised pixels as the target (better representations)")
    ref.add_argument("--weight_decay", type=float, default=d.weight_decay, action=_STORE,
                     help="AdamW weight decay (not on biases or norms: the reference's groups)")
    ref.add_argument("--lr", type=float, default=d.lr, action=_STORE, help="absolute lr (default: blr x effective batch / 256)")
    ref.add_argument("--blr", type=float, default=d.blr, action=_STORE,
                     help="base lr: absolute lr = blr x effective batch / 256 (the paper's and PRETRAIN.md's; "
                          "main_pretrain.py's own default is 1e-3)")
    ref.add_argument("--min_lr", type=float, default=d.min_lr, action=_STORE, help="lower bound of the cosine schedule")
    ref.add_argument("--warmup_epochs", type=float, default=d.warmup_epochs, action=_STORE,
                     help="linear warm-up, per iteration, before the half-cycle cosine")
    ref.add_argument("--data_path", default=None, action=_STORE,
                     help="image folder (train/<class>/*, <class>/* or flat) or .tar shards; omitted: the embedded "
                          "photographs")
    ref.add_argument("--output_dir", default=d.output_dir, action=_STORE, help="checkpoints, metrics.jsonl, the reference's log.txt, reconstruction.png")
    ref.add_argument("--log_dir", default=d.log_dir, action=_STORE, help="TensorBoard folder (default: output_dir)")
    ref.add_argument("--device", default=d.device, action=_STORE, help="cuda or cpu (default: cuda when available)")
    ref.add_argument("--seed", type=int, default=d.seed, action=_STORE,
                     help="weights, masking and augmentation all follow from it")
    ref.add_argument("--resume", default=d.resume, action=_STORE,
                     help="checkpoint to resume from, or 'auto' for the newest in output_dir (default: none, a fresh "
                          "run, which an output_dir holding an earlier run's checkpoints refuses)")
    ref.add_argument("--start_epoch", type=int, default=d.start_epoch, action=_STORE,
                     help="epoch to start the schedule at (a resumed checkpoint sets its own)")
    ref.add_argument("--num_workers", type=int, default=d.num_workers, action=_STORE,
                     help=f"decoding worker processes per rank (default: the reference's {REFERENCE_NUM_WORKERS}, "
                          "at most this machine's CPU cores per rank less one)")
    ref.add_argument("--pin_mem", default=d.pin_mem, action=_STORE_TRUE, help="pin CPU memory for faster host-to-GPU copies")
    ref.add_argument("--no_pin_mem", dest="pin_mem", default=argparse.SUPPRESS, action=_STORE_FALSE,
                     help="do not pin CPU memory")
    add_launch_arguments(ref)

    ours = parser.add_argument_group("fastmae")
    ours.add_argument("--max_steps", type=int, default=None, action=_STORE,
                      help="stop after this many optimizer steps in total (tests, demos, benchmarks)")
    ours.add_argument("--precision", choices=PRECISIONS, default=None, action=_STORE,
                      help="autocast dtype (default: bf16 on CUDA, fp32 on CPU); fp16 uses a grad scaler")
    ours.add_argument("--compile", default=False, action=_STORE_TRUE, help="torch.compile the model")
    ours.add_argument("--compile_scope", choices=COMPILE_SCOPES, default=d.compile_scope, action=_STORE,
                      help="with --compile: the whole model as one graph, or each transformer block on its own "
                           "(fast to compile, any depth)")
    ours.add_argument("--compile_mode", choices=COMPILE_MODES, default=d.compile_mode, action=_STORE,
                      help="with --compile: torch.compile's mode; reduce-overhead replays CUDA graphs "
                           "(needs --accum_iter 1 and one process)")
    ours.add_argument("--cuda_graph", nargs="?", const="on", choices=CUDA_GRAPH_CHOICES, default=d.cuda_graph,
                      action=_STORE,
                      help="capture the eager training step once as a CUDA graph and replay it: one launch per step "
                           "instead of thousands (needs CUDA, bf16 or fp32, no --compile; under torchrun one all-reduce "
                           "a step averages the gradients in place of DDP). auto: on for one process on CUDA where "
                           "those hold and --attn is sdpa or math; --cuda_graph alone: on")
    ours.add_argument("--kernels", choices=("auto", "triton", "torch"), default=d.kernels, action=_STORE,
                      help="fused Triton kernels (auto: on CUDA) or their PyTorch references")
    ours.add_argument("--attn", choices=("sdpa", "xformers", "math"), default=d.attn, action=_STORE,
                      help="attention backend")
    ours.add_argument("--data_loader", choices=LOADER_CHOICES, default=d.data_loader, action=_STORE,
                      help="auto: DALI if installed and on CUDA, else hybrid on CUDA (PIL decode and crop in the "
                           "workers, resize, flip and normalisation on the GPU), else the CPU loader (PIL workers); "
                           "the embedded photographs take the CPU loader under auto, or hybrid (dali and torchvision "
                           "read files)")
    ours.add_argument("--save_every", type=int, default=d.save_every, action=_STORE,
                      help="optimizer steps between checkpoints (also at the end and on SIGTERM/SIGINT)")
    ours.add_argument("--log_every", type=int, default=d.log_every, action=_STORE,
                      help="optimizer steps between logging steps (the only host-device syncs)")
    ours.add_argument("--keep_checkpoints", type=int, default=d.keep_checkpoints, action=_STORE,
                      help="how many of the newest step checkpoints to keep")
    ours.add_argument("--save_epochs", type=int, default=d.save_epochs, action=_STORE,
                      help="also save the reference's checkpoint-{epoch}.pth after every this many epochs (from "
                           "epoch 0) and after the last, kept, as main_pretrain.py does every 20; 0: none")
    ours.add_argument("--samples_per_epoch", type=int, default=d.samples_per_epoch, action=_STORE,
                      help="embedded photographs only: random crops per epoch")
    ours.add_argument("--threads", type=int, default=d.threads, action=_STORE,
                      help="CPU threads for the model's math (default: torch's choice)")
    ours.add_argument("--no_progress", dest="progress_bar", default=argparse.SUPPRESS, action=_STORE_FALSE,
                      help="no progress bar (metrics.jsonl and messages still written)")


def run(args: argparse.Namespace) -> int:
    from fastmae.train.distributed import init_from_launch_flags, shutdown_distributed

    try:
        cfg, demo_settings = PretrainConfig.from_args(args, getattr(args, EXPLICIT_FLAGS_ATTR, set()))
        ctx = init_from_launch_flags(cfg.device, args)
    except ValueError as err:
        print(f"fastmae pretrain: error: {err}", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        if demo_settings and ctx.is_main:
            settings = " ".join(f"--{k} {v}" for k, v in demo_settings.items())
            print(f"no --data_path: pretraining on the photographs embedded in scikit-image with the demo settings "
                  f"{settings} (flags you set are kept; give --data_path for a real dataset)", flush=True)
        return train(cfg, ctx)
    finally:
        torch.set_num_threads(threads_before)
        shutdown_distributed(ctx)


def train(cfg: PretrainConfig, ctx) -> int:
    """The run's exit status. The trainer, whose DDP model holds the process group, is gone when this
    returns, so that ``shutdown_distributed`` tears the group down in full."""
    from fastmae.train.trainer import Pretrainer

    try:
        trainer = Pretrainer(cfg, ctx)
    except ValueError as err:  # bad data path, model name, checkpoint...: a message, not a traceback
        print(f"fastmae pretrain: error: {err}", file=sys.stderr)
        return 2
    return trainer.fit()  # which the processes leave together
