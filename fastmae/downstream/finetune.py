"""``fastmae finetune``: end-to-end fine-tuning of a pretrained encoder (the reference's main_finetune.py).

Protocol: global average pooling of the patch tokens + ``fc_norm`` (``--cls_token`` for the cls
token after ``norm``), head trunc-normal std 2e-5, drop path (stochastic depth, linearly growing
to ``--drop_path`` over the blocks), AdamW on layer-wise-lr-decayed parameter groups (no weight
decay on biases, norms, cls_token and pos_embed), linear warm-up then cosine, label smoothing,
mixup/cutmix when asked for. Train images: RandomResizedCrop(0.08-1) + flip, then RandAugment
(``--aa``, default rand-m9-mstd0.5-inc1) and random erasing (``--reprob 0.25``, pixel noise), the
reference's defaults.

Checkpoints (``checkpoint-best.pth``, ``checkpoint-last.pth``) hold the reference models_vit
state_dict in the reference container ("epoch" is the index of the last epoch done, as the reference
saves it), so its code loads them; top-1 per epoch goes to log.jsonl, and the reference's lines
to log.txt. ``--resume`` continues from ``checkpoint-last.pth`` after its epoch: weights, optimizer,
the best top-1 so far, and the epochs of an uninterrupted run (each epoch's order, augmentation, drop
path and mixup are drawn from the run's seed and the epoch alone).

Under torchrun (or Slurm with --world_size, or --dist_on_itp) each process trains a
DistributedDataParallel replica on its share of every epoch (``fastmae.downstream.sharding``); the
effective batch is batch_size x accum_iter x processes, and the first process alone writes.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from fastmae.checkpoint import load_weights, save_checkpoint
from fastmae.downstream.classify import (
    EpochLogs, add_common_arguments, append_jsonl, build_classifier, check_start_epoch, datasets_and_loaders,
    describe_effective_batch, describe_pretrained, evaluate, evaluate_saved, input_size_of, number_of_classes,
    peak_lr, progress, resume_and_refuse_earlier_outputs, say_if_not_saved, show_rate, speaker, run_in_processes,
    smallest_train_batch, val_images_said,
)
from fastmae.downstream.lr_decay import optimizer_state_in_group_order, param_groups_lrd
from fastmae.downstream.mixup import Mixup, soft_target_cross_entropy
from fastmae.downstream.rand_augment import REFERENCE_CONFIG, parse_rand_augment
from fastmae.downstream.random_erasing import MODES as ERASE_MODES, RandomErasing
from fastmae.downstream.sharding import averaged_at_step_end, sum_across_ranks
from fastmae.downstream.vit_classifier import create_classifier, init_head
from fastmae.train.distributed import DistributedContext
from fastmae.train.schedule import lr_at, set_lr

CHECKPOINT_NAMES = ("checkpoint-last.pth", "checkpoint-best.pth")  # in --output_dir
# a 4th key number: mixup's stream apart from the samples' augmentation, keyed (seed, epoch, position)
MIXUP_STREAM = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, batch_size=64, epochs=50, blr=1e-3, weight_decay=0.05, warmup_epochs=5, min_lr=1e-6)
    parser.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay")
    parser.add_argument("--drop_path", type=float, default=0.1, help="drop path rate of the last block")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--aa", default=REFERENCE_CONFIG,
                        help="RandAugment config, timm's syntax (rand-m<magnitude>-n<ops>-mstd<std>-inc<0|1>), "
                             "or none")
    parser.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (0: off)")
    parser.add_argument("--remode", default="pixel", choices=ERASE_MODES, help="random erasing fill")
    parser.add_argument("--recount", type=int, default=1, help="random erasing rectangles per image")
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (reference recipe: 0.8)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (reference recipe: 1.0)")
    parser.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    parser.add_argument("--mixup_switch_prob", type=float, default=0.5,
                        help="probability of cutmix rather than mixup when both are on")
    parser.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this (default: off)")
    parser.add_argument("--global_pool", action="store_true", default=True, help="mean of patch tokens (default)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool", help="the cls token instead")


def run(args) -> int:
    return run_in_processes("finetune", _run, args)


def _run(args, ctx: DistributedContext) -> int:
    torch.manual_seed(args.seed)  # the same head init in every process
    device, say = ctx.device, speaker(ctx)
    out = Path(args.output_dir) if args.output_dir and ctx.is_main else None  # the first process writes
    log = out / "log.jsonl" if out else None
    if args.eval:
        return _evaluate_saved(args, ctx)
    resumed = resume_and_refuse_earlier_outputs(args.resume, args.output_dir, CHECKPOINT_NAMES[0], CHECKPOINT_NAMES,
                                                say, ctx.is_main)
    if resumed is not None and (done := resumed.all_done(args.epochs)):
        say(done)
        return 0

    rand_augment = parse_rand_augment(args.aa)
    random_erasing = RandomErasing(args.reprob, args.remode, args.recount)  # checks the flags
    random_erasing = random_erasing if random_erasing.prob > 0 else None
    # resuming, the architecture is the resumed run's (its --checkpoint need not be given again)
    pretrained = (describe_pretrained(str(resumed.path), args.model, False, resumed.container) if resumed
                  else describe_pretrained(args.checkpoint, args.model, args.random_init))
    size = input_size_of(args, pretrained)
    first_epoch = check_start_epoch(args, resumed)
    train_set, val_set, train_loader, val_loader = datasets_and_loaders(args, size, True, rand_augment,
                                                                        random_erasing, ctx)
    if resumed is not None:
        resumed.check_classes(train_set.classes)
    num_classes = number_of_classes(args, train_set)
    say_if_not_saved(args.output_dir, say)
    model, report = build_classifier(pretrained, num_classes, size, global_pool=args.global_pool,
                                     drop_path_rate=args.drop_path)
    if report is not None and resumed is None:
        say(f"loaded {args.checkpoint}:\n{report}")
    args.model = pretrained.model_name  # saved with the checkpoints, so --eval finds the architecture
    if pretrained.state is not None:  # the reference re-inits the head of a loaded checkpoint only
        init_head(model, std=2e-5)
    model.to(device)

    lr = peak_lr(args, ctx.world_size)
    groups = param_groups_lrd(model, args.weight_decay, model.no_weight_decay(), args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    best = -1.0
    if resumed is not None:
        load_weights(model, resumed.container["model"], strict=True)
        saved = optimizer_state_in_group_order(resumed.container["optimizer"], groups)
        try:
            optimizer.load_state_dict(saved)
        except ValueError as err:
            raise ValueError(f"--resume {resumed.path}: its optimizer state does not fit this model's parameter "
                             f"groups (sizes {[len(g['params']) for g in saved['param_groups']]}, here "
                             f"{[len(g['params']) for g in groups]}): was it saved with another --global_pool / "
                             f"--cls_token or model? ({err})") from err
        best = resumed.best_top1
        say(resumed.describe(args))
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        smallest_batch = smallest_train_batch(train_loader)
        if smallest_batch % 2:  # said now, not after the model is built and the first batch is loaded
            raise ValueError(f"mixup / cutmix pair image i with image N-1-i of a batch, so a batch must hold an "
                             f"even number of images; here one holds {smallest_batch} (--batch_size "
                             f"{args.batch_size}, {len(train_set)} train images over {ctx.world_size} process(es))")
        mixup = Mixup(num_classes, args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob,
                      args.smoothing, seed=args.seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    origin = f"resumed from {resumed.path}" if resumed else "random init" if args.random_init else args.checkpoint
    say(f"fine-tuning {pretrained.model_name} ({origin}): "
        f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes, lr {lr:.3g} "
        f"({describe_effective_batch(args, ctx)}), "
        f"layer decay {args.layer_decay}, drop path {args.drop_path}, "
        f"{'mixup/cutmix' if mixup else f'label smoothing {args.smoothing}'}, "
        f"RandAugment {args.aa if rand_augment else 'off'}, random erasing "
        f"{f'{args.reprob} ({args.remode})' if random_erasing else 'off'}")

    epoch_logs = EpochLogs(args, model, main=ctx.is_main)
    # the replicas' gradients averaged in the backward; the first process's weights are broadcast first
    trained = (DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
               if ctx.enabled else model)
    try:
        stats, best = _train(args, ctx, model, trained, optimizer, train_loader, val_loader, train_set, mixup,
                             autocast, lr, first_epoch, best, epoch_logs, out, log)
    finally:
        epoch_logs.close()
    say(f"fine-tuned top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  (max {best:.2f}%) "
        f"{val_images_said(stats)}")
    append_jsonl(log, {"final": True, "val_top1": stats["top1"], "val_top5": stats["top5"], "max_top1": best,
                       "n": stats["n"], "unreadable": stats["unreadable"]})
    return 0


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global torch seed of an epoch in one process (drop path draws from it): a resumed run's
    epochs draw what an uninterrupted run's drew, and the processes draw differently."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _train(args, ctx: DistributedContext, model, trained, optimizer, train_loader, val_loader, train_set, mixup,
           autocast, lr: float, first_epoch: int, best: float, epoch_logs: EpochLogs, out: Path | None,
           log: Path | None):
    """The epochs from ``first_epoch``; ``trained``: ``model``, or its DistributedDataParallel wrapper
    that the steps run through. -> (the last evaluation, the best top-1)."""
    device, say = ctx.device, speaker(ctx)
    steps_per_epoch = len(train_loader)
    for epoch in range(first_epoch, args.epochs):
        model.train()
        train_loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(args.seed, epoch, ctx.rank))
        if mixup is not None:
            mixup.reseed(args.seed, epoch, ctx.rank, MIXUP_STREAM)
        bar = progress(train_loader, f"finetune epoch {epoch + 1}/{args.epochs}", ctx.is_main)
        start, seen, loss_sum, lr_sum = time.perf_counter(), 0, torch.zeros((), device=device), 0.0
        optimizer.zero_grad(set_to_none=True)  # a partial accumulation left by the last epoch is dropped, as in the reference
        for step, (imgs, labels) in enumerate(bar):
            if step % args.accum_iter == 0:  # the reference sets the lr at the first batch of each step
                set_lr(optimizer, lr_at(epoch + step / steps_per_epoch, lr, args.min_lr, args.warmup_epochs,
                                        args.epochs))
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            steps_now = (step + 1) % args.accum_iter == 0
            with averaged_at_step_end(trained, steps_now):
                with autocast:
                    if mixup is not None:
                        imgs, soft = mixup(imgs, labels)
                        loss = soft_target_cross_entropy(trained(imgs).float(), soft)
                    else:
                        loss = F.cross_entropy(trained(imgs).float(), labels, label_smoothing=args.smoothing)
                (loss / args.accum_iter).backward()
            if steps_now:
                if args.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            lr_sum += max(group["lr"] for group in optimizer.param_groups)  # the reference logs the top lr
            seen += labels.shape[0]
            if step % 10 == 0:
                show_rate(bar, seen * ctx.world_size, start, loss.item(), optimizer.param_groups[-1]["lr"])
        with autocast:
            stats = evaluate(model, val_loader, device, bar=ctx.is_main)
        # the reference's epoch loss: every process's batches
        train_loss = sum_across_ranks([loss_sum.item()], device)[0] / ctx.world_size / max(steps_per_epoch, 1)
        record = {"epoch": epoch + 1, "train_loss": train_loss,
                  "lr": optimizer.param_groups[-1]["lr"], "val_top1": stats["top1"], "val_top5": stats["top5"],
                  "val_loss": stats["loss"]}
        if out:
            if stats["top1"] > best:
                save_checkpoint(out / CHECKPOINT_NAMES[1], model, None, epoch, args=args, top1=stats["top1"],
                                classes=train_set.classes)
            # last: what --resume needs, saved after the best so that a stop between the two loses nothing
            save_checkpoint(out / CHECKPOINT_NAMES[0], model, optimizer, epoch, args=args, top1=stats["top1"],
                            max_top1=max(best, stats["top1"]), classes=train_set.classes)
        best = max(best, stats["top1"])
        append_jsonl(log, {**record, "max_top1": best})
        epoch_logs.epoch(epoch, record["train_loss"], lr_sum / max(steps_per_epoch, 1), stats)
        say(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val top-1 {stats['top1']:.2f}% "
            f"top-5 {stats['top5']:.2f}% (max {best:.2f}%)")
    return stats, best


def _evaluate_saved(args, ctx: DistributedContext) -> int:
    def build(pretrained, size):
        if "head.weight" not in pretrained.state:
            raise ValueError(f"{args.checkpoint} is not a fine-tuned classifier (no head.weight)")
        return create_classifier(pretrained.model_name, pretrained.state["head.weight"].shape[0], img_size=size,
                                 global_pool="fc_norm.weight" in pretrained.state)

    stats = evaluate_saved(args, ctx, build)
    speaker(ctx)(f"fine-tuned top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  {val_images_said(stats)}")
    return 0
