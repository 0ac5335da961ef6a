"""AdamW as in the MAE recipe: betas (0.9, 0.95), weight decay on weight matrices only.

Biases, normalisation weights, the cls and mask tokens (and any other 1-D parameter) get no weight
decay; frozen parameters (the fixed sin-cos position embeddings) are not given to the optimizer.
The reference's timm ``add_weight_decay`` decays the 3-D token tensors; we follow the paper's text
and the usual ViT practice of not decaying them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ADAMW_BETAS = (0.9, 0.95)
NO_DECAY_NAMES = ("cls_token", "mask_token", "encoder_mask_token", "pos_embed", "decoder_pos_embed")


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim > 1 and not name.endswith(".bias") and name.split(".")[-1] not in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, [decay, no decay], of the trainable parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if uses_weight_decay(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = ADAMW_BETAS) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused implementation where torch has one for the device."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
