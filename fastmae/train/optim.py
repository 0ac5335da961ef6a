"""AdamW as in the MAE recipe: betas (0.9, 0.95), weight decay as the reference's timm ``add_weight_decay``.

Two groups, in the reference's order: [no decay: 1-D parameters (norms) and biases, decay: the rest,
weight matrices and the 3-D cls and mask tokens], each in the model's parameter order. Frozen
parameters (the fixed sin-cos position embeddings) are not given to the optimizer. With the same
groups, our checkpoints' AdamW state loads into the reference's optimizer and the reference's into ours.

Checkpoints saved before this grouping (fastmae up to November 2026: [decay, no decay], the tokens
not decayed) still resume: their state is matched to the parameters by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ADAMW_BETAS = (0.9, 0.95)


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim > 1 and not name.endswith(".bias")


def param_group_names(model: nn.Module) -> list[list[str]]:
    """[no decay, decay]: the trainable parameters' names, each group in the model's order."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [[name for name, p in named if not uses_weight_decay(name, p)],
            [name for name, p in named if uses_weight_decay(name, p)]]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, [no decay, decay], of the trainable parameters (the reference's)."""
    params = dict(model.named_parameters())
    no_decay, decay = param_group_names(model)
    return [{"params": [params[name] for name in no_decay], "weight_decay": 0.0},
            {"params": [params[name] for name in decay], "weight_decay": weight_decay}]


_EARLIER_NO_DECAY_NAMES = ("cls_token", "mask_token", "encoder_mask_token")


def _earlier_group_names(model: nn.Module) -> list[list[str]]:
    """The groups of fastmae checkpoints saved before the reference's grouping: [decay, no decay], with the
    tokens not decayed."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decayed = {name for name, p in named if uses_weight_decay(name, p) and name not in _EARLIER_NO_DECAY_NAMES}
    return [[name for name, _ in named if name in decayed], [name for name, _ in named if name not in decayed]]


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    """AdamW's moments and step counts from a saved optimizer state (ours, an earlier fastmae's or the
    reference main_pretrain.py's), matched to ``model``'s parameters by name; the group settings stay
    ``optimizer``'s. Raises ValueError where the saved groups are none of those layouts or do not fit."""
    sizes = [len(group["params"]) for group in saved["param_groups"]]
    for layout in (param_group_names(model), _earlier_group_names(model)):
        if [len(group) for group in layout] == sizes:
            names = [name for group in layout for name in group]
            break
    else:
        raise ValueError(f"its optimizer groups hold {sizes} parameters, the model trains "
                         f"{[len(group) for group in param_group_names(model)]} (no decay, decay)")
    saved_indices = [index for group in saved["param_groups"] for index in group["params"]]
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
