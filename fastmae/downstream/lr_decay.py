"""Layer-wise learning-rate decay for ViT fine-tuning (the reference's ``util/lr_decay.param_groups_lrd``).

Layer ids: cls_token, pos_embed and patch_embed are layer 0, block i is layer i + 1, everything
after the blocks (fc_norm / norm, head) is layer depth + 1. A layer's lr scale is
``layer_decay ** (depth + 1 - layer_id)``, so the head learns at the full rate and the patch
embedding at ``layer_decay ** (depth + 1)`` of it. 1-D parameters (biases, norms) and the names
in ``no_weight_decay`` get no weight decay.
"""

from __future__ import annotations

import torch.nn as nn


def vit_layer_id(name: str, num_layers: int) -> int:
    """num_layers = depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, no_weight_decay: set[str] | None = None,
                     layer_decay: float = 0.75) -> list[dict]:
    """Optimizer parameter groups, one per (layer, decay / no decay), each with an ``lr_scale``."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if not hasattr(model, "blocks"):
        raise ValueError("layer-wise lr decay needs a ViT with a `blocks` list")
    no_weight_decay = no_weight_decay or set()
    num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in no_weight_decay)
        layer_id = vit_layer_id(name, num_layers)
        key = f"layer_{layer_id}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"lr_scale": layer_decay ** (num_layers - layer_id),
                           "weight_decay": weight_decay if decay else 0.0, "params": [], "names": []}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def optimizer_state_in_group_order(saved: dict, groups: list[dict]) -> dict:
    """An AdamW state saved with ``param_groups_lrd`` groups whose parameters came in another order ->
    the same state in the order of ``groups``, matched by the groups' names. fastmae before the
    classifier took the reference's order put fc_norm before the head: its fine-tuning checkpoints
    resume. A state without names (the reference's), or of other groups, is returned as it is, for
    ``load_state_dict`` to take or refuse."""
    saved_groups = saved["param_groups"]
    current = [group["names"] for group in groups]
    if not all("names" in group for group in saved_groups) or [g["names"] for g in saved_groups] == current:
        return saved
    by_names = {frozenset(group["names"]): group for group in saved_groups}
    if set(by_names) != {frozenset(names) for names in current}:
        return saved
    saved_index = {name: index for group in saved_groups for name, index in zip(group["names"], group["params"])}
    state, param_groups, next_index = {}, [], 0
    for names in current:
        indices = list(range(next_index, next_index + len(names)))
        next_index += len(names)
        for name, index in zip(names, indices):
            if saved_index[name] in saved["state"]:
                state[index] = saved["state"][saved_index[name]]
        param_groups.append({**by_names[frozenset(names)], "names": list(names), "params": indices})
    return {"state": state, "param_groups": param_groups}
