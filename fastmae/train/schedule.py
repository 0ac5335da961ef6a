"""The learning-rate schedule of the MAE recipe (the reference ``util/lr_sched.py``).

Per iteration, not per epoch: linear warm-up from 0 to the peak over ``warmup_epochs``, then a
half-cycle cosine from the peak to ``min_lr`` at ``epochs``. ``epoch`` is fractional
(epoch + batch index / batches per epoch), evaluated at the first micro-batch of each optimizer step.
"""

from __future__ import annotations

import math

import torch


def base_batch_lr(blr: float, effective_batch_size: int) -> float:
    """The linear scaling rule of the paper: lr = blr x effective batch / 256."""
    return blr * effective_batch_size / 256


def lr_at(epoch: float, peak_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return peak_lr
    progress = min((epoch - warmup_epochs) / (epochs - warmup_epochs), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, honouring a per-group ``lr_scale`` (layer decay in fine-tuning). An lr held
    as a tensor (a CUDA-graph step's, ``fastmae.train.cuda_graph``) is filled in place, without a sync."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
