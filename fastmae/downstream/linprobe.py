"""``fastmae linprobe``: linear probe of a frozen pretrained encoder (the reference's main_linprobe.py).

Protocol: the encoder is frozen; the feature is the cls token after ``norm`` (``--global_pool``:
mean of the patch tokens after ``fc_norm``, which is then loaded from nothing and stays at its
identity init, as in the reference); it goes through BatchNorm1d without affine parameters
(eps 1e-6), then the linear ``head`` (trunc-normal std 0.01). Only the head trains: LARS
(reference) or momentum SGD, no weight decay, linear warm-up then cosine, lr = blr * batch / 256.
Train images get the reference's RandomResizedCrop(0.08-1) of util/crop.py (one draw, clamped to the image) + flip.

``--cache_features`` computes each image's feature once (train images without augmentation) and
trains the head on those: the same model, far cheaper on a CPU, a little weaker than with
augmentation.

The saved classifier has the reference's linear-probe keys (``head.0`` BatchNorm, ``head.1`` Linear);
it is saved after every epoch, with the optimizer, and ``--resume`` continues after its epoch, with
the epochs an uninterrupted run would have had (order and augmentation drawn from the seed and the epoch).

Under torchrun (or Slurm with --world_size, or --dist_on_itp) each process trains the head as a
DistributedDataParallel replica on its share of every epoch; the BatchNorm normalises each process's
batch, and keeps the first process's running statistics, as the reference's. With
--cache_features every process computes the features of its share and gathers the others'.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from fastmae.checkpoint import load_weights, save_checkpoint
from fastmae.data.augment import sample_clamped_resized_crop
from fastmae.data.sources import shard_indices
from fastmae.downstream.classify import (
    EpochLogs, add_common_arguments, append_jsonl, build_classifier, check_start_epoch, datasets_and_loaders,
    describe_effective_batch, describe_pretrained, Resumed, evaluate, evaluate_saved, input_size_of,
    number_of_classes, peak_lr, progress, resume_and_refuse_earlier_outputs, say_if_not_saved, show_rate, speaker,
    run_in_processes, smallest_train_batch, val_images_said,
)
from fastmae.downstream.lars import LARS
from fastmae.downstream.sharding import (
    InOrderShard, averaged_at_step_end, gather_shards, sum_across_ranks, take_first_process_buffers,
)
from fastmae.downstream.vit_classifier import VisionTransformer, create_classifier, init_head
from fastmae.train.distributed import DistributedContext
from fastmae.train.schedule import lr_at, set_lr

CHECKPOINT_NAME = "checkpoint-linprobe.pth"  # in --output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, warmup_epochs=10, min_lr=0.0)
    parser.add_argument("--global_pool", action="store_true", help="average patch tokens instead of the cls token")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool", help="the cls token (default)")
    parser.add_argument("--optimizer", choices=["lars", "sgd"], default="lars",
                        help="lars as the reference; sgd = momentum SGD on the same schedule")
    parser.add_argument("--momentum", type=float, default=0.9, help="LARS / SGD momentum")
    parser.add_argument("--cache_features", action="store_true",
                        help="features computed once, train images not augmented (fast on CPU)")


def make_linear_probe(model: VisionTransformer, init: bool = True) -> VisionTransformer:
    """Freeze everything, replace the head by BatchNorm1d(affine=False) + the linear head, re-initialised
    (trunc-normal std 0.01) unless ``init`` is False: the reference does it for a loaded checkpoint only."""
    if init:
        init_head(model, std=0.01)
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    return model


@torch.no_grad()
def extract_features(model: VisionTransformer, loader, device: torch.device, desc: str, bar: bool = True):
    """-> features [N, D] (float32, on device), labels [N]."""
    model.eval()
    feats, labels = [], []
    for imgs, y in progress(loader, desc, bar):
        feats.append(model.forward_features(imgs.to(device)).float())
        labels.append(y.to(device))
    if not feats:  # a process whose share of a small val set is empty
        return torch.empty(0, model.embed_dim, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


@dataclass(frozen=True)
class ProbeRecipe:
    """How the head is trained (the reference's main_linprobe.py defaults)."""

    epochs: int = 90
    lr: float = 0.1 * 512 / 256
    warmup_epochs: float = 10
    min_lr: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "lars"
    momentum: float = 0.9
    accum_iter: int = 1  # batches per optimizer step

    def __post_init__(self):
        if self.optimizer not in ("lars", "sgd"):
            raise ValueError(f"optimizer must be lars or sgd, got {self.optimizer!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.accum_iter < 1:
            raise ValueError(f"accum_iter must be >= 1, got {self.accum_iter}")


def head_optimizer(model: VisionTransformer, recipe: ProbeRecipe) -> torch.optim.Optimizer:
    params = list(model.head.parameters())
    if recipe.optimizer == "lars":
        return LARS(params, lr=recipe.lr, weight_decay=recipe.weight_decay, momentum=recipe.momentum)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def fit_linear_probe(model: VisionTransformer, train_batches, steps_per_epoch: int, val_model: nn.Module, val_source,
                     recipe: ProbeRecipe, device: torch.device, log=None, verbose: bool = True,
                     resumed: Resumed | None = None, epoch_done=None, start_epoch: int = 0,
                     epoch_logs: EpochLogs | None = None, head: nn.Module | None = None,
                     ctx: DistributedContext | None = None) -> dict:
    """Train ``model.head`` on ``train_batches(epoch)`` (an iterable of (features [B, D], labels [B])) per
    epoch; evaluate ``val_model`` on ``val_source`` after each, then call ``epoch_done(epoch, stats,
    optimizer)`` (stats with 'max_top1'). The epochs run from ``start_epoch`` (check_start_epoch: a resumed
    run's next one). ``resumed``: the run continued, whose optimizer state and best top-1 carry on (its
    head is loaded already). ``epoch_logs``: also told each epoch. ``head``: what the steps run through
    (``model.head``, or its DistributedDataParallel wrapper; ``ctx``: then the processes). -> final stats
    with 'max_top1' and the optimizer."""
    head = head if head is not None else model.head
    ctx = ctx if ctx is not None else DistributedContext(device=device)
    verbose = verbose and ctx.is_main
    optimizer = head_optimizer(model, recipe)
    best = 0.0
    if resumed is not None:
        optimizer.load_state_dict(resumed.container["optimizer"])
        best = resumed.best_top1
    if start_epoch >= recipe.epochs:
        raise ValueError(f"nothing to train: the run has done {start_epoch} of {recipe.epochs} epochs")
    for epoch in range(start_epoch, recipe.epochs):
        model.head.train()
        bar = progress(train_batches(epoch), f"linprobe epoch {epoch + 1}/{recipe.epochs}", ctx.is_main)
        start, seen, loss_sum, lr_sum = time.perf_counter(), 0, torch.zeros((), device=device), 0.0
        optimizer.zero_grad(set_to_none=True)  # a partial accumulation left by the last epoch is dropped, as in the reference
        for step, (feats, labels) in enumerate(bar):
            if step % recipe.accum_iter == 0:  # the reference sets the lr at the first batch of each step
                set_lr(optimizer, lr_at(epoch + step / steps_per_epoch, recipe.lr, recipe.min_lr,
                                        recipe.warmup_epochs, recipe.epochs))
            steps_now = (step + 1) % recipe.accum_iter == 0
            with averaged_at_step_end(head, steps_now):
                loss = F.cross_entropy(head(feats), labels)
                (loss / recipe.accum_iter).backward()
            if steps_now:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            lr_sum += optimizer.param_groups[0]["lr"]
            seen += labels.shape[0]
            if step % 20 == 0:
                show_rate(bar, seen * ctx.world_size, start, loss.item(), optimizer.param_groups[0]["lr"])
        take_first_process_buffers(model.head)  # the statistics of the head that is saved
        stats = evaluate(val_model, val_source, device, bar=ctx.is_main)
        best = max(best, stats["top1"])
        # the reference's epoch loss: every process's batches
        train_loss = sum_across_ranks([loss_sum.item()], device)[0] / ctx.world_size / max(steps_per_epoch, 1)
        record = {"epoch": epoch + 1, "train_loss": train_loss,
                  "lr": optimizer.param_groups[0]["lr"], "val_top1": stats["top1"], "val_top5": stats["top5"],
                  "val_loss": stats["loss"], "max_top1": best}
        if epoch_done is not None:
            epoch_done(epoch, {**stats, "max_top1": best}, optimizer)
        # after the save: a run stopped between the two and resumed does not log the epoch twice
        append_jsonl(log, record)
        if epoch_logs is not None:
            epoch_logs.epoch(epoch, record["train_loss"], lr_sum / max(steps_per_epoch, 1), stats)
        if verbose and (epoch + 1 == recipe.epochs or (epoch + 1) % 10 == 0):
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val top-1 {stats['top1']:.2f}% "
                  f"top-5 {stats['top5']:.2f}% (max {best:.2f}%)")
    return {**stats, "max_top1": best, "optimizer": optimizer}


def run(args) -> int:
    return run_in_processes("linprobe", _run, args)


def _run(args, ctx: DistributedContext) -> int:
    torch.manual_seed(args.seed)  # the same head init in every process
    device, say = ctx.device, speaker(ctx)
    log = Path(args.output_dir) / "log.jsonl" if args.output_dir and ctx.is_main else None  # the first process writes
    if args.eval:
        return _evaluate_saved(args, ctx)
    resumed = resume_and_refuse_earlier_outputs(args.resume, args.output_dir, CHECKPOINT_NAME, (CHECKPOINT_NAME,), say,
                                                ctx.is_main)
    if resumed is not None and (done := resumed.all_done(args.epochs)):
        say(done)
        return 0

    # resuming, the architecture and the frozen encoder are the resumed run's
    pretrained = (describe_pretrained(str(resumed.path), args.model, False, resumed.container) if resumed
                  else describe_pretrained(args.checkpoint, args.model, args.random_init))
    size = input_size_of(args, pretrained)
    first_epoch = check_start_epoch(args, resumed)
    # the reference probe's crop (util/crop.py), not fine-tuning's torchvision one
    train_set, val_set, train_loader, val_loader = datasets_and_loaders(args, size, not args.cache_features, ctx=ctx,
                                                                        sample_crop=sample_clamped_resized_crop)
    if resumed is not None:
        resumed.check_classes(train_set.classes)
    num_classes = number_of_classes(args, train_set)
    smallest_batch = smallest_train_batch(train_loader)
    if smallest_batch < 2:
        raise ValueError(f"the probe's BatchNorm needs at least 2 images in a batch, and a batch here holds "
                         f"{smallest_batch} ({len(train_set)} train images over {ctx.world_size} process(es), "
                         f"--batch_size {args.batch_size}): raise --batch_size or add train images")
    say_if_not_saved(args.output_dir, say)
    model, report = build_classifier(pretrained, num_classes, size, global_pool=args.global_pool)
    if report is not None and resumed is None:
        say(f"loaded {args.checkpoint}:\n{report}")
    args.model = pretrained.model_name  # saved with the checkpoint, so --eval finds the architecture
    model = make_linear_probe(model, init=pretrained.state is not None).to(device)
    if resumed is not None:
        load_weights(model, resumed.container["model"], strict=True)
        say(resumed.describe(args))
    recipe = ProbeRecipe(args.epochs, peak_lr(args, ctx.world_size), args.warmup_epochs, args.min_lr,
                         args.weight_decay, args.optimizer, args.momentum, args.accum_iter)
    origin = f"resumed from {resumed.path}" if resumed else "random init" if args.random_init else args.checkpoint
    say(f"linear probe of {pretrained.model_name} ({origin}): "
        f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes, "
        f"{'global pool' if args.global_pool else 'cls token'}, {args.optimizer} lr {recipe.lr:.3g} "
        f"({describe_effective_batch(args, ctx)})")

    if args.cache_features:
        # every process computes its share of the train features and gathers the others'; the val
        # features stay where they were computed, and evaluate() sums the counts
        share = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                            sampler=InOrderShard(len(train_set), ctx.rank, ctx.world_size, pad=True))
        train_x, train_y = extract_features(model, share, device, "features train", ctx.is_main)
        train_x, train_y = gather_shards(train_x, len(train_set)), gather_shards(train_y, len(train_set))
        val_x, val_y = extract_features(model, val_loader, device, "features val", ctx.is_main)
        cached = FeatureBatches(train_x, train_y, args.batch_size, args.seed, ctx.rank, ctx.world_size)
        train_batches, steps = cached.for_epoch, len(cached)
        val_source, val_model = FeatureBatches(val_x, val_y, args.batch_size), model.head
    else:
        def train_batches(epoch: int):
            train_loader.sampler.set_epoch(epoch)
            return _encode(model, train_loader, device)

        steps, val_source, val_model = len(train_loader), val_loader, model

    def save(epoch: int, stats: dict, optimizer: torch.optim.Optimizer) -> None:
        # after every epoch, for --resume; "epoch": the index of the epoch done, as the reference saves it
        save_checkpoint(Path(args.output_dir) / CHECKPOINT_NAME, model, optimizer, epoch, args=args,
                        top1=stats["top1"], max_top1=stats["max_top1"], classes=train_set.classes)

    # the head's replicas' gradients averaged in the backward; the first process's head is broadcast first
    head = (DistributedDataParallel(model.head, device_ids=[device] if device.type == "cuda" else None)
            if ctx.enabled else model.head)
    epoch_logs = EpochLogs(args, model, main=ctx.is_main)
    try:
        stats = fit_linear_probe(model, train_batches, steps, val_model, val_source, recipe, device, log,
                                 resumed=resumed, epoch_done=save if args.output_dir and ctx.is_main else None,
                                 start_epoch=first_epoch, epoch_logs=epoch_logs, head=head, ctx=ctx)
    finally:
        epoch_logs.close()
    say(f"linear probe top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  {val_images_said(stats)}")
    append_jsonl(log, {"final": True, "val_top1": stats["top1"], "val_top5": stats["top5"], "n": stats["n"],
                       "unreadable": stats["unreadable"]})
    return 0


def _encode(model: VisionTransformer, loader, device: torch.device):
    """Batches of (frozen features [B, D], labels [B]) from augmented images."""
    # no mode switch here: the encoder has no dropout or drop path, and the head's BatchNorm must stay in train mode
    for imgs, labels in loader:
        with torch.no_grad():
            feats = model.forward_features(imgs.to(device, non_blocking=True))
        yield feats.float(), labels.to(device, non_blocking=True)


class FeatureBatches:
    """Batches of cached features [N, D] with their labels [N]. With a ``seed``: ``for_epoch(epoch)`` gives
    this process's share of the epoch, shuffled as the image loader's (``TrainKeys``: from the seed and
    the epoch), without the last partial batch when there are more; without one: every row, in order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None = None, rank: int = 0,
                 world_size: int = 1):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.rows = len(x) if seed is None else -(-len(x) // world_size)
        self.drop_last = seed is not None and self.rows > batch_size

    def __len__(self) -> int:
        n = self.rows / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def for_epoch(self, epoch: int):
        order = (torch.arange(len(self.x)) if self.seed is None else
                 torch.from_numpy(shard_indices(len(self.x), epoch, self.seed, self.rank, self.world_size)))
        order = order.to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]

    def __iter__(self):
        return self.for_epoch(0)


def _evaluate_saved(args, ctx: DistributedContext) -> int:
    def build(pretrained, size):
        if "head.1.weight" not in pretrained.state:
            raise ValueError(f"{args.checkpoint} is not a linear-probe classifier (no head.1.weight)")
        model = create_classifier(pretrained.model_name, pretrained.state["head.1.weight"].shape[0], img_size=size,
                                  global_pool="fc_norm.weight" in pretrained.state)
        return make_linear_probe(model)

    stats = evaluate_saved(args, ctx, build)
    speaker(ctx)(f"linear probe top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  {val_images_said(stats)}")
    return 0
