"""What the downstream commands share: the run settings a checkpoint carries, building the classifier
from a pretrained checkpoint, data loaders, top-k evaluation, the jsonl log and the flags that
linprobe and finetune both take.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from fastmae.checkpoint import LoadReport, check_resume_file, load_weights, read_checkpoint, saved_args, state_dict_of
from fastmae.data.augment import sample_resized_crop
from fastmae.data.sources import refuse_empty_data_path
from fastmae.downstream.labeled_data import UNREADABLE, ClassificationTransform, LabeledImageFolder, build_datasets
from fastmae.downstream.rand_augment import RandAugment
from fastmae.downstream.random_erasing import RandomErasing
from fastmae.downstream.sharding import InOrderShard, TrainKeys, sum_across_ranks
from fastmae.downstream.vit_classifier import VisionTransformer, create_classifier, init_from_scratch
from fastmae.train.config import seed_flag
from fastmae.train.distributed import (
    DistributedContext, add_launch_arguments, init_from_launch_flags, shutdown_distributed,
)
from fastmae.train.checkpoints import changed_settings
from fastmae.train.metrics import set_aside_earlier_outputs
from fastmae.train.schedule import base_batch_lr


def add_common_arguments(parser: argparse.ArgumentParser, *, batch_size: int, epochs: int, blr: float,
                         weight_decay: float, warmup_epochs: float, min_lr: float) -> None:
    """Flags of the reference main_linprobe.py / main_finetune.py that both commands take."""
    parser.add_argument("--checkpoint", "--finetune", dest="checkpoint", default=None,
                        help="pretrained MAE checkpoint (.pth reference container or .safetensors)")
    parser.add_argument("--random_init", action="store_true",
                        help="no checkpoint: start from a random encoder (the baseline pretraining must beat)")
    parser.add_argument("--model", default=None,
                        help="architecture, e.g. vit_base_patch16 (default: the one named in the checkpoint's args)")
    parser.add_argument("--data_path", required=True, help="folder with train/ and val/ ImageFolders")
    parser.add_argument("--nb_classes", type=int, default=None, help="default: number of class folders in train/")
    parser.add_argument("--input_size", type=int, default=None, help="default: the checkpoint's image size")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="batch size per process")
    parser.add_argument("--accum_iter", type=int, default=1,
                        help="batches whose gradients make one optimizer step (effective batch = batch_size x accum_iter "
                             "x processes)")
    parser.add_argument("--epochs", type=int, default=epochs, help="epochs of the schedule")
    parser.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr x effective batch / 256)")
    parser.add_argument("--blr", type=float, default=blr, help="base lr: absolute lr = blr x effective batch / 256")
    parser.add_argument("--min_lr", type=float, default=min_lr, help="lower bound of the cosine schedule")
    parser.add_argument("--warmup_epochs", type=float, default=warmup_epochs, help="linear warm-up before the cosine")
    parser.add_argument("--weight_decay", type=float, default=weight_decay, help="weight decay")
    parser.add_argument("--output_dir", default=None, help="checkpoints, log.jsonl and the reference's log.txt go here")
    parser.add_argument("--log_dir", default=None,
                        help="TensorBoard folder: per epoch the train loss and lr, the val top-1, top-5 and loss "
                             "(default: --output_dir, when the tensorboard package is installed)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--num_workers", type=int, default=2, help="data loader worker processes")
    parser.add_argument("--pin_mem", action="store_true", default=True,
                        help="pin the batches' CPU memory for faster copies to the GPU (default; no effect on CPU)")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin CPU memory")
    parser.add_argument("--dist_eval", action="store_true",
                        help="accepted for the reference's command lines: under torchrun or Slurm the evaluation is "
                             "always split among the processes, each val image counted once")
    add_launch_arguments(parser)
    parser.add_argument("--seed", type=seed_flag, default=0, help="seed of the initialisation, data order and augmentation")
    parser.add_argument("--eval", action="store_true",
                        help="only evaluate --checkpoint (a classifier saved by this command) on val/")
    parser.add_argument("--resume", default=None,
                        help="continue a run after its last epoch saved: 'auto' (its checkpoint in --output_dir) "
                             "or that checkpoint's path")
    parser.add_argument("--start_epoch", type=int, default=0,
                        help="epoch the schedule and the epoch loop start at, when not resuming (a resumed run "
                             "continues after its checkpoint's epoch)")


@dataclass
class Pretrained:
    """Where the encoder weights come from: a checkpoint's state_dict and the architecture it implies."""

    state: dict | None  # None: random init
    model_name: str
    img_size: int | None  # None: random init


def describe_pretrained(checkpoint: str | None, model_name: str | None, random_init: bool,
                        container: dict | None = None) -> Pretrained:
    """``container``: the checkpoint already read, if it was."""
    if checkpoint is None and not random_init:
        raise ValueError("give --checkpoint PATH (a pretrained MAE), or --random_init for the random-encoder baseline")
    if checkpoint is not None and random_init:
        raise ValueError("--checkpoint and --random_init exclude each other")
    if checkpoint is None:
        if model_name is None:
            raise ValueError("--random_init needs --model (e.g. vit_base_patch16)")
        return Pretrained(None, model_name.removeprefix("mae_"), None)
    container = container if container is not None else read_checkpoint(checkpoint)
    state = state_dict_of(container)
    if model_name is None:
        model_name = saved_args(container).get("model")
        if not model_name:
            raise ValueError(f"{checkpoint} does not say its architecture: pass --model (e.g. vit_base_patch16)")
    weight = state.get("patch_embed.proj.weight")  # [D, C, p, p]
    pos = state.get("pos_embed")  # [1, 1+L, D]
    if weight is None or pos is None:
        raise ValueError(f"{checkpoint} holds no ViT encoder (no patch_embed.proj.weight / pos_embed)")
    if weight.shape[1] != 3:
        raise ValueError(f"{checkpoint} has a {weight.shape[1]}-channel patch embedding; images are read as RGB")
    return Pretrained(state, model_name.removeprefix("mae_"), math.isqrt(pos.shape[1] - 1) * weight.shape[-1])


def build_classifier(pretrained: Pretrained, num_classes: int, input_size: int,
                     **kwargs) -> tuple[VisionTransformer, LoadReport | None]:
    """The classifier with the pretrained encoder loaded (position embeddings resized to input_size), or,
    for --random_init, initialised as the reference's is without --finetune. A fine-tuned file's head
    for another number of classes is not loaded, as main_finetune.py does."""
    model = create_classifier(pretrained.model_name, num_classes, img_size=input_size, **kwargs)
    if pretrained.state is None:
        init_from_scratch(model)
        return model, None
    return model, load_weights(model, pretrained.state, replaceable=("head.weight", "head.bias"))


def input_size_of(args, pretrained: Pretrained) -> int:
    size = args.input_size or pretrained.img_size
    if size is None:
        raise ValueError("--random_init needs --input_size")
    return size


def datasets_and_loaders(args, input_size: int, train_augment: bool, rand_augment: RandAugment | None = None,
                         random_erasing: RandomErasing | None = None, ctx: DistributedContext | None = None,
                         sample_crop: Callable = sample_resized_crop):
    """This process's loaders (``ctx``: its rank and device; one process on the CPU by default). The train
    loader's sampler is a ``TrainKeys``: ``train_loader.sampler.set_epoch(epoch)`` before each epoch.
    --pin_mem pins the batches only on their way to a GPU (a CPU run has no copy to speed up, and torch
    warns about pinning without one)."""
    ctx = ctx if ctx is not None else DistributedContext()
    train_set, val_set = build_datasets(args.data_path, input_size, train_augment,
                                        rand_augment=rand_augment, random_erasing=random_erasing, seed=args.seed,
                                        sample_crop=sample_crop)
    common = loader_settings(args, ctx)
    keys = TrainKeys(len(train_set), args.seed, ctx.rank, ctx.world_size)
    train_loader = torch.utils.data.DataLoader(train_set, sampler=keys, drop_last=len(keys) > args.batch_size, **common)
    return train_set, val_set, train_loader, val_loader_of(val_set, common, ctx)


def smallest_train_batch(train_loader) -> int:
    """The fewest images a training batch of ``datasets_and_loaders``' loader holds: drop_last leaves no batch
    smaller than --batch_size unless this process's share is smaller still, and then it is one batch."""
    return min(train_loader.batch_size, len(train_loader.sampler))


def loader_settings(args, ctx: DistributedContext) -> dict:
    """The DataLoader settings both splits share."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.accum_iter < 1:
        raise ValueError(f"--accum_iter must be >= 1, got {args.accum_iter}")
    pin = args.pin_mem and ctx.device.type == "cuda"
    # the workers' seeds from a generator of their own: the global one, which drop path draws from, is
    # left as a resumed run finds it (the augmentation is keyed by the sampler, not by the worker)
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                pin_memory=pin, generator=torch.Generator().manual_seed(args.seed))


def val_loader_of(val_set, common: dict, ctx: DistributedContext):
    """This process's in-order share of the val images, each counted once over the processes."""
    return torch.utils.data.DataLoader(val_set, sampler=InOrderShard(len(val_set), ctx.rank, ctx.world_size),
                                       **common)


def effective_batch(args, world_size: int = 1) -> int:
    """The images of one optimizer step: batch_size x accum_iter x processes."""
    return args.batch_size * args.accum_iter * world_size


def describe_effective_batch(args, ctx: DistributedContext) -> str:
    over = f" over {ctx.world_size} processes" if ctx.enabled else ""
    return f"effective batch {effective_batch(args, ctx.world_size)}{over}"


def peak_lr(args, world_size: int = 1) -> float:
    """--lr, or the reference's blr x effective batch / 256."""
    return args.lr if args.lr is not None else base_batch_lr(args.blr, effective_batch(args, world_size))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """logits [N, K], labels [N] -> number of samples whose label is among the top k, per k (k capped at K)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top == labels.view(-1, 1)
    return [int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, desc: str = "eval", bar: bool = True) -> dict:
    """-> {'top1', 'top5' (percent, per image), 'loss' (cross-entropy, the mean of the batches' means, as
    the reference's MetricLogger averages it), 'n', 'unreadable'}, over the batches of every process (each
    process gives its own share of the val set). Images that could not be read (label ``UNREADABLE``)
    are left out of every figure and counted in 'unreadable'."""
    was_training = model.training
    model.eval()
    n = correct1 = correct5 = batches = unreadable = 0
    batch_losses = 0.0
    for imgs, labels in progress(loader, desc, bar):
        readable = labels != UNREADABLE
        if not bool(readable.all()):
            unreadable += int((~readable).sum())
            imgs, labels = imgs[readable], labels[readable]
            if labels.numel() == 0:
                continue
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(imgs).float()
        batch_losses += F.cross_entropy(logits, labels).item()
        c1, c5 = topk_correct(logits, labels)
        correct1, correct5, n, batches = correct1 + c1, correct5 + c5, n + labels.shape[0], batches + 1
    model.train(was_training)
    n, correct1, correct5, batch_losses, batches, unreadable = sum_across_ranks(
        [n, correct1, correct5, batch_losses, batches, unreadable], device)
    n, unreadable = int(n), int(unreadable)
    if n == 0:
        raise ValueError(f"none of the {unreadable} val images could be read")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": batch_losses / batches, "n": n,
            "unreadable": unreadable}


def val_images_said(stats: dict) -> str:
    """"on N val images", and how many could not be read and were left out."""
    left_out = f" ({stats['unreadable']} unreadable, left out)" if stats.get("unreadable") else ""
    return f"on {stats['n']} val images{left_out}"


# the flags of a linear probe's or fine-tuning's recipe (those a resumed run takes from its checkpoint,
# --model, --input_size, --nb_classes, are not among them)
RECIPE_SETTINGS = ("data_path", "batch_size", "accum_iter", "epochs", "lr", "blr", "min_lr", "warmup_epochs",
                   "weight_decay", "seed", "global_pool", "optimizer", "momentum", "cache_features", "layer_decay",
                   "drop_path", "smoothing", "aa", "reprob", "remode", "recount", "mixup", "cutmix", "mixup_prob",
                   "mixup_switch_prob", "clip_grad")


@dataclass
class Resumed:
    """A downstream run to continue: its checkpoint (the reference container with the optimizer)."""

    path: Path
    container: dict

    @property
    def next_epoch(self) -> int:
        return int(self.container["epoch"]) + 1  # "epoch": the index of the last epoch done

    @property
    def best_top1(self) -> float:
        return float(self.container.get("max_top1", self.container.get("top1", 0.0)))

    def all_done(self, epochs: int) -> str | None:
        """Why there is nothing to train for a run of ``epochs`` epochs, or None."""
        if self.next_epoch < epochs:
            return None
        return f"{self.path} has done all {epochs} epochs: nothing to train (raise --epochs to go on)"

    def check_classes(self, classes: list[str]) -> None:
        """The class folders the resumed run trained on, in its order: another set (a folder renamed,
        added, removed) gives the head's rows other meanings, which no error would show."""
        refuse_other_classes(f"--resume {self.path}", self.container, "train/ now", classes,
                             "its head's rows would mean other classes; resume with the same class folders, or "
                             "start a new run in another --output_dir")

    def describe(self, args) -> str:
        """What is continued, and the recipe flags given differently from the checkpoint's run (a longer
        --epochs is meant; a dropped --mixup after a requeue most often is not)."""
        changed = changed_settings(saved_args(self.container), vars(args), RECIPE_SETTINGS)
        return (f"resumed from {self.path} after epoch {self.next_epoch} of {args.epochs} "
                f"(best top-1 so far {self.best_top1:.2f}%)"
                + (f"; these settings differ from the checkpoint's run: {', '.join(changed)}" if changed else ""))


def resume_and_refuse_earlier_outputs(resume: str | None, output_dir: str | None, checkpoint_name: str,
                                      checkpoint_names: tuple[str, ...], say=print, main: bool = True) -> Resumed | None:
    """``--resume``: None, "auto" (``output_dir/checkpoint_name`` if it is there) or a file -> the run to
    continue, or None. Unless the run continues from its own ``output_dir``, an earlier run's checkpoints
    there are not overwritten (ValueError); --resume auto with nothing to continue (a run stopped before
    its first ``checkpoint_name``: the same command, requeued) starts afresh and sets the earlier files
    aside. ``say``: where messages go (``speaker``); ``main``: the process that moves files."""
    out = Path(output_dir) if output_dir else None
    path = None
    if resume == "auto":
        if out is None:
            raise ValueError("--resume auto looks in --output_dir: give --output_dir")
        path = out / checkpoint_name
        if not path.is_file():
            say(f"--resume auto: no {checkpoint_name} in {out}, starting from scratch")
            if main:
                for moved in set_aside_earlier_outputs(out, ("log.jsonl", "log.txt", *checkpoint_names)):
                    say(moved)
            return None
    elif resume:
        path = Path(resume)
        check_resume_file(path)
    if path is None or out is None or path.resolve().parent != out.resolve():
        refuse_earlier_outputs(output_dir, checkpoint_names)
    if path is None:
        return None
    container = read_checkpoint(path)
    if "decoder_embed.weight" in state_dict_of(container):  # an MAE's decoder: pretraining's, not a classifier's
        raise ValueError(f"--resume {path} is a pretraining (MAE) checkpoint: fine-tune or probe from it with "
                         f"--checkpoint {path} (the reference's --finetune); --resume continues an earlier run of "
                         f"this command from its {checkpoint_name}")
    if "optimizer" not in container or "epoch" not in container:
        raise ValueError(f"--resume {path} holds no optimizer state: give the {checkpoint_name} of an earlier run "
                         "of this command (a pretrained MAE or a best-only checkpoint starts a run: --checkpoint)")
    return Resumed(path, container)


# the logs a run appends to: another run's there (this command's, or pretraining's log.txt) would mix with it
RUN_LOGS = ("log.jsonl", "log.txt")


def refuse_earlier_outputs(output_dir: str | None, checkpoint_names: tuple[str, ...]) -> None:
    """A new run does not overwrite the checkpoints an earlier one saved in ``output_dir``, nor append to
    its logs."""
    if not output_dir:
        return
    found = [name for name in (*checkpoint_names, *RUN_LOGS) if (Path(output_dir) / name).exists()]
    if found:
        raise ValueError(f"--output_dir {output_dir} holds an earlier run's {', '.join(found)}, which this run "
                         "would overwrite or append to: give another --output_dir (or, to continue this command's "
                         "run there, --resume auto)")


def append_jsonl(path: str | os.PathLike | None, record: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), **record}) + "\n")


def check_start_epoch(args, resumed: "Resumed | None") -> int:
    """The first epoch to train: the resumed run's next one, else --start_epoch (ValueError when it leaves
    nothing to train)."""
    if args.start_epoch < 0:
        raise ValueError(f"--start_epoch must be >= 0, got {args.start_epoch}")
    if resumed is not None:
        return resumed.next_epoch
    if args.start_epoch >= args.epochs:
        raise ValueError(f"--start_epoch {args.start_epoch} leaves nothing to train: --epochs is {args.epochs} "
                         "(epochs are counted from 0)")
    return args.start_epoch


class EpochLogs:
    """What a run writes once an epoch is evaluated, besides log.jsonl: the reference's log.txt in
    --output_dir, and TensorBoard scalars in --log_dir (default --output_dir, when tensorboard is
    installed), with the reference's tags for the evaluation."""

    def __init__(self, args, model: nn.Module, main: bool = True):
        """``main``: False in all processes but the first, which alone writes."""
        from fastmae.train.metrics import EpochLog, no_tensorboard_message, open_tensorboard

        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log_txt = EpochLog(args.output_dir) if args.output_dir and main else None
        folder = (args.log_dir or args.output_dir) if main else None
        self.writer = open_tensorboard(folder) if folder else None
        if self.writer is None and args.log_dir and main:
            jsonl = Path(args.output_dir) / "log.jsonl" if args.output_dir else None
            print(no_tensorboard_message(args.log_dir, jsonl))

    def epoch(self, epoch: int, train_loss: float, train_lr: float, stats: dict) -> None:
        """``epoch``: counted from 0, the reference's step; ``train_*``: the epoch's averages over its
        batches; ``stats``: the evaluation after it (evaluate())."""
        if self.log_txt is not None:  # main_finetune.py's / main_linprobe.py's keys, in their order
            self.log_txt.append({"train_lr": train_lr, "train_loss": train_loss, "test_loss": stats["loss"],
                                 "test_acc1": stats["top1"], "test_acc5": stats["top5"], "epoch": epoch,
                                 "n_parameters": self.n_parameters})
        if self.writer is None:
            return
        scalars = {"train/loss": train_loss, "train/lr": train_lr, "perf/test_acc1": stats["top1"],
                   "perf/test_acc5": stats["top5"], "perf/test_loss": stats["loss"]}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()  # a run stopped later keeps the epochs done

    def close(self) -> None:
        if self.log_txt is not None:
            self.log_txt.close()
        if self.writer is not None:
            self.writer.close()


def progress(loader, desc: str, shown: bool = True):
    """``shown``: False in all processes but the first, which alone draws the bar."""
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not shown)


def show_rate(bar, seen: int, start: float, loss: float, lr: float) -> None:
    """img/s, loss and lr on the tqdm bar (reads the loss back only on these logging calls)."""
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{seen / max(time.perf_counter() - start, 1e-9):.0f}")


def evaluate_saved(args, ctx: DistributedContext, build_model) -> dict:
    """--eval: a classifier checkpoint saved by linprobe/finetune, on val/. ``build_model(pretrained,
    input_size)`` returns the empty classifier matching the state (or raises ValueError); loading is strict.
    The checkpoint is --checkpoint, or --resume FILE as the reference's ``--eval --resume`` gives it."""
    if args.checkpoint is None and args.resume not in (None, "auto"):
        args.checkpoint = args.resume
    if args.checkpoint is None:
        raise ValueError("--eval needs --checkpoint or --resume FILE (a classifier saved by this command)")
    container = read_checkpoint(args.checkpoint)
    pretrained = describe_pretrained(args.checkpoint, args.model, False, container)
    size = input_size_of(args, pretrained)
    # val/ alone: the classes are the checkpoint's, and a folder of val images needs no train/ beside it
    val_set = LabeledImageFolder(eval_folder(args.data_path), ClassificationTransform(size, False),
                                 replace_unreadable=False)
    val_loader = val_loader_of(val_set, loader_settings(args, ctx), ctx)
    model = build_model(pretrained, size)
    load_weights(model, pretrained.state, strict=True)
    refuse_other_classes(args.checkpoint, container, "val/", val_set.classes, "its labels would not be these")
    head_size = next(v.shape[0] for k, v in pretrained.state.items() if k in ("head.weight", "head.1.weight"))
    if head_size < len(val_set.classes):
        raise ValueError(f"{args.checkpoint} classifies {head_size} classes, val/ has {len(val_set.classes)} class folders")
    return evaluate(model.to(ctx.device), val_loader, ctx.device, bar=ctx.is_main)


def eval_folder(data_path) -> Path:
    """--eval's images: ``data_path/val``, or ``data_path`` itself when it is a folder of class folders
    (the val split given directly)."""
    refuse_empty_data_path(data_path)
    root = Path(data_path)
    if (root / "val").is_dir():
        return root / "val"
    if root.is_dir() and not (root / "train").is_dir():
        return root
    raise ValueError(f"expected {root / 'val'}: --eval reads --data_path/val, or --data_path as the val folder")


def refuse_other_classes(checkpoint: str, container: dict, folder: str, classes: list[str], consequence: str) -> None:
    """A ValueError when the classifier in ``container`` was trained on other class folders than
    ``classes`` (what ``folder`` holds); a checkpoint that does not record them is taken as it is."""
    saved = container.get("classes")
    if saved is not None and list(saved) != list(classes):
        raise ValueError(f"{checkpoint} was trained on the classes {_few(saved)}, {folder} holds {_few(classes)}: "
                         f"{consequence}")


def _few(names: list[str]) -> str:
    return str(list(names[:5]))[:-1] + (f", ... ({len(names)} in all)]" if len(names) > 5 else "]")


def number_of_classes(args, train_set) -> int:
    """--nb_classes, or the class folders of train/; fewer than the folders would give labels past the head."""
    folders = len(train_set.classes)
    if args.nb_classes is not None and args.nb_classes < folders:
        raise ValueError(f"--nb_classes {args.nb_classes}: train/ has {folders} class folders, so labels up to "
                         f"{folders - 1}; give at least {folders} (or leave it out)")
    return args.nb_classes or folders


def run_in_processes(command: str, body, args) -> int:
    """``body(args, ctx)`` in this process's place of the launch: under torchrun, a Slurm launch with
    --world_size or OpenMPI's --dist_on_itp, as pretraining reads them (``fastmae.train.distributed``);
    else one process. Bad input is a message and exit status 2."""
    try:
        ctx = init_from_launch_flags(args.device, args)
    except ValueError as err:
        print(f"fastmae {command}: error: {err}", file=sys.stderr)
        return 2
    try:
        status = body(args, ctx)
        # the processes leave together: none tears down its end of the group while the first still uses it
        ctx.barrier()
        return status
    except (ValueError, FileNotFoundError) as err:
        print(f"fastmae {command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed(ctx)


def say_if_not_saved(output_dir: str | None, say=print) -> None:
    if not output_dir:
        say("no --output_dir: the trained classifier is not saved (give --output_dir to keep it)")


def speaker(ctx: DistributedContext):
    """print in the first process, nothing in the others: a run's messages are said once."""
    return print if ctx.is_main else _silent


def _silent(*args, **kwargs) -> None:
    pass
