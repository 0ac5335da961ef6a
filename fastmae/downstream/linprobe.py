"""``fastmae linprobe``: linear probe of a frozen pretrained encoder (the reference's main_linprobe.py).

Protocol: the encoder is frozen; the feature is the cls token after ``norm`` (``--global_pool``:
mean of the patch tokens after ``fc_norm``, which is then loaded from nothing and stays at its
identity init, as in the reference); it goes through BatchNorm1d without affine parameters
(eps 1e-6), then the linear ``head`` (trunc-normal std 0.01). Only the head trains: LARS
(reference) or momentum SGD, no weight decay, linear warm-up then cosine, lr = blr * batch / 256.
Train images get RandomResizedCrop(0.08-1) + flip, as the reference.

``--cache_features`` computes each image's feature once (train images without augmentation) and
trains the head on those: the same model, far cheaper on a CPU, a little weaker than with
augmentation.

The saved classifier has the reference's linear-probe keys (``head.0`` BatchNorm, ``head.1`` Linear);
it is saved after every epoch, with the optimizer, and ``--resume`` continues after its epoch.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmae.checkpoint import load_weights, save_checkpoint
from fastmae.device import device_from_flag
from fastmae.downstream.classify import (
    EpochLogs, add_common_arguments, append_jsonl, build_classifier, check_start_epoch, datasets_and_loaders,
    describe_pretrained, Resumed, evaluate, evaluate_saved, input_size_of, number_of_classes, peak_lr, progress, refuse_torchrun,
    resume_and_refuse_earlier_outputs, say_if_not_saved, show_rate,
)
from fastmae.downstream.lars import LARS
from fastmae.downstream.vit_classifier import VisionTransformer, create_classifier, init_head
from fastmae.train.schedule import lr_at, set_lr

CHECKPOINT_NAME = "checkpoint-linprobe.pth"  # in --output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, warmup_epochs=10, min_lr=0.0)
    parser.add_argument("--global_pool", action="store_true", help="average patch tokens instead of the cls token")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool", help="the cls token (default)")
    parser.add_argument("--optimizer", choices=["lars", "sgd"], default="lars",
                        help="lars as the reference; sgd = momentum SGD on the same schedule")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--cache_features", action="store_true",
                        help="features computed once, train images not augmented (fast on CPU)")


def make_linear_probe(model: VisionTransformer) -> VisionTransformer:
    """Freeze everything, replace the head by BatchNorm1d(affine=False) + the linear head."""
    init_head(model, std=0.01)
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    return model


@torch.no_grad()
def extract_features(model: VisionTransformer, loader, device: torch.device, desc: str):
    """-> features [N, D] (float32, on device), labels [N]."""
    model.eval()
    feats, labels = [], []
    for imgs, y in progress(loader, desc):
        feats.append(model.forward_features(imgs.to(device)).float())
        labels.append(y.to(device))
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
                     epoch_logs: EpochLogs | None = None) -> dict:
    """Train ``model.head`` on ``train_batches()`` (an iterator of (features [B, D], labels [B])) per epoch;
    evaluate ``val_model`` on ``val_source`` after each, then call ``epoch_done(epoch, stats, optimizer)``
    (stats with 'max_top1'). The epochs run from ``start_epoch`` (check_start_epoch: a resumed run's next
    one). ``resumed``: the run continued, whose optimizer state and best top-1 carry on (its head is
    loaded already). ``epoch_logs``: also told each epoch. -> final stats with 'max_top1' and the optimizer."""
    optimizer = head_optimizer(model, recipe)
    best = 0.0
    if resumed is not None:
        optimizer.load_state_dict(resumed.container["optimizer"])
        best = resumed.best_top1
    if start_epoch >= recipe.epochs:
        raise ValueError(f"nothing to train: the run has done {start_epoch} of {recipe.epochs} epochs")
    for epoch in range(start_epoch, recipe.epochs):
        model.head.train()
        bar = progress(train_batches(), f"linprobe epoch {epoch + 1}/{recipe.epochs}")
        start, seen, loss_sum, lr_sum = time.perf_counter(), 0, torch.zeros((), device=device), 0.0
        optimizer.zero_grad(set_to_none=True)  # a partial accumulation left by the last epoch is dropped, as in the reference
        for step, (feats, labels) in enumerate(bar):
            if step % recipe.accum_iter == 0:  # the reference sets the lr at the first batch of each step
                set_lr(optimizer, lr_at(epoch + step / steps_per_epoch, recipe.lr, recipe.min_lr,
                                        recipe.warmup_epochs, recipe.epochs))
            loss = F.cross_entropy(model.head(feats), labels)
            (loss / recipe.accum_iter).backward()
            if (step + 1) % recipe.accum_iter == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            lr_sum += optimizer.param_groups[0]["lr"]
            seen += labels.shape[0]
            if step % 20 == 0:
                show_rate(bar, seen, start, loss.item(), optimizer.param_groups[0]["lr"])
        stats = evaluate(val_model, val_source, device)
        best = max(best, stats["top1"])
        record = {"epoch": epoch + 1, "train_loss": (loss_sum / max(steps_per_epoch, 1)).item(),
                  "lr": optimizer.param_groups[0]["lr"], "val_top1": stats["top1"], "val_top5": stats["top5"],
                  "val_loss": stats["loss"], "max_top1": best}
        append_jsonl(log, record)
        if epoch_done is not None:
            epoch_done(epoch, {**stats, "max_top1": best}, optimizer)
        if epoch_logs is not None:  # after the save, as the reference: a resumed run does not log an epoch twice
            epoch_logs.epoch(epoch, record["train_loss"], lr_sum / max(steps_per_epoch, 1), stats)
        if verbose and (epoch + 1 == recipe.epochs or (epoch + 1) % 10 == 0):
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val top-1 {stats['top1']:.2f}% "
                  f"top-5 {stats['top5']:.2f}% (max {best:.2f}%)")
    return {**stats, "max_top1": best, "optimizer": optimizer}


def run(args) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"fastmae linprobe: error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    refuse_torchrun("linprobe")
    torch.manual_seed(args.seed)
    device = device_from_flag(args.device)
    log = Path(args.output_dir) / "log.jsonl" if args.output_dir else None
    if args.eval:
        return _evaluate_saved(args, device)
    resumed = resume_and_refuse_earlier_outputs(args.resume, args.output_dir, CHECKPOINT_NAME, (CHECKPOINT_NAME,))
    if resumed is not None and (done := resumed.all_done(args.epochs)):
        print(done)
        return 0

    # resuming, the architecture and the frozen encoder are the resumed run's
    pretrained = (describe_pretrained(str(resumed.path), args.model, False, resumed.container) if resumed
                  else describe_pretrained(args.checkpoint, args.model, args.random_init))
    size = input_size_of(args, pretrained)
    first_epoch = check_start_epoch(args, resumed)
    train_set, val_set, train_loader, val_loader = datasets_and_loaders(args, size, not args.cache_features,
                                                                        device=device)
    num_classes = number_of_classes(args, train_set)
    say_if_not_saved(args.output_dir)
    model, report = build_classifier(pretrained, num_classes, size, global_pool=args.global_pool)
    if report is not None and resumed is None:
        print(f"loaded {args.checkpoint}:\n{report}")
    args.model = pretrained.model_name  # saved with the checkpoint, so --eval finds the architecture
    model = make_linear_probe(model).to(device)
    if resumed is not None:
        load_weights(model, resumed.container["model"], strict=True)
        print(resumed.describe(args.epochs))
    recipe = ProbeRecipe(args.epochs, peak_lr(args), args.warmup_epochs, args.min_lr, args.weight_decay,
                         args.optimizer, args.momentum, args.accum_iter)
    origin = f"resumed from {resumed.path}" if resumed else "random init" if args.random_init else args.checkpoint
    print(f"linear probe of {pretrained.model_name} ({origin}): "
          f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes, "
          f"{'global pool' if args.global_pool else 'cls token'}, {args.optimizer} lr {recipe.lr:.3g} "
          f"(effective batch {args.batch_size * args.accum_iter})")

    if args.cache_features:
        train_x, train_y = extract_features(model, train_loader, device, "features train")
        val_x, val_y = extract_features(model, val_loader, device, "features val")
        cached = FeatureBatches(train_x, train_y, args.batch_size, args.seed)
        train_batches, steps = cached.__iter__, len(cached)
        val_source, val_model = FeatureBatches(val_x, val_y, args.batch_size, None), model.head
    else:
        train_batches, steps = (lambda: _encode(model, train_loader, device)), len(train_loader)
        val_source, val_model = val_loader, model

    def save(epoch: int, stats: dict, optimizer: torch.optim.Optimizer) -> None:
        # after every epoch, for --resume; "epoch": the index of the epoch done, as the reference saves it
        save_checkpoint(Path(args.output_dir) / CHECKPOINT_NAME, model, optimizer, epoch, args=args,
                        top1=stats["top1"], max_top1=stats["max_top1"], classes=train_set.classes)

    epoch_logs = EpochLogs(args, model)
    try:
        stats = fit_linear_probe(model, train_batches, steps, val_model, val_source, recipe, device, log,
                                 resumed=resumed, epoch_done=save if args.output_dir else None,
                                 start_epoch=first_epoch, epoch_logs=epoch_logs)
    finally:
        epoch_logs.close()
    print(f"linear probe top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  on {stats['n']} val images")
    append_jsonl(log, {"final": True, "val_top1": stats["top1"], "val_top5": stats["top5"], "n": stats["n"]})
    return 0


def _encode(model: VisionTransformer, loader, device: torch.device):
    """Batches of (frozen features [B, D], labels [B]) from augmented images."""
    # no mode switch here: the encoder has no dropout or drop path, and the head's BatchNorm must stay in train mode
    for imgs, labels in loader:
        with torch.no_grad():
            feats = model.forward_features(imgs.to(device, non_blocking=True))
        yield feats.float(), labels.to(device, non_blocking=True)


class FeatureBatches:
    """Shuffled (drop_last) or ordered batches of cached features; a re-iterable with a length."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.drop_last = seed is not None and len(x) > batch_size

    def __len__(self) -> int:
        n = len(self.x) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        order = (torch.randperm(len(self.x), generator=self.generator) if self.generator is not None
                 else torch.arange(len(self.x))).to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def _evaluate_saved(args, device: torch.device) -> int:
    def build(pretrained, size):
        if "head.1.weight" not in pretrained.state:
            raise ValueError(f"{args.checkpoint} is not a linear-probe classifier (no head.1.weight)")
        model = create_classifier(pretrained.model_name, pretrained.state["head.1.weight"].shape[0], img_size=size,
                                  global_pool="fc_norm.weight" in pretrained.state)
        return make_linear_probe(model)

    stats = evaluate_saved(args, device, build)
    print(f"linear probe top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  on {stats['n']} val images")
    return 0
