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


def reference_param_names(model: nn.Module) -> list[str]:
    """The trainable parameters' names in the order of the reference optimizer's state: timm's
    ``add_weight_decay`` groups [no decay (1-D parameters and biases), decay], each in the model's order."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_decay = {name for name, p in named if p.ndim <= 1 or name.endswith(".bias")}
    return [name for name, _ in named if name in no_decay] + [name for name, _ in named if name not in no_decay]


def load_reference_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    """AdamW's moments and step counts from the optimizer of a reference (main_pretrain.py) checkpoint,
    matched by parameter name: its groups split and order the parameters otherwise than ``param_groups``.
    Raises ValueError where they do not fit the model."""
    names = reference_param_names(model)
    saved_indices = [index for group in saved["param_groups"] for index in group["params"]]
    if len(saved_indices) != len(names):
        raise ValueError(f"its optimizer holds {len(saved_indices)} parameters, the model trains {len(names)}")
    saved_state = dict(zip(names, (saved["state"].get(index) for index in saved_indices)))
    name_of = {id(p): name for name, p in model.named_parameters()}
    ours = optimizer.state_dict()
    state = {}
    for group, our_group in zip(optimizer.param_groups, ours["param_groups"]):
        for param, index in zip(group["params"], our_group["params"]):
            entry = saved_state[name_of[id(param)]]
            if entry is None:  # no step has touched it
                continue
            if entry["exp_avg"].shape != param.shape:
                raise ValueError(f"its AdamW state of {name_of[id(param)]} has shape {list(entry['exp_avg'].shape)}, "
                                 f"the parameter {list(param.shape)}")
            step = entry["step"]  # an int in the reference's torch 1.8, a tensor since
            state[index] = {**entry, "step": step if torch.is_tensor(step) else torch.tensor(float(step))}
    optimizer.load_state_dict({"state": state, "param_groups": ours["param_groups"]})


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = ADAMW_BETAS) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused implementation where torch has one for the device."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
