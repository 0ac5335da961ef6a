"""Encoder input: patch projection of the visible patches only, + position embeddings, + cls.

Reference semantics (the MAE reference code): conv patch embedding of all L patches, + pos_embed
rows 1.., gather the kept patches, prepend cls_token + pos_embed row 0. Projecting only the K kept
patches gives the same numbers (to round-off) for a quarter of the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmae.patches import patch_pixels


def visible_patch_embed_reference(
    imgs: torch.Tensor,  # [N, C, H, W]
    ids_keep: torch.Tensor | None,  # [N, K] int64, or None for all L patches
    weight: torch.Tensor,  # [D, C, p, p]
    bias: torch.Tensor,  # [D]
    pos_embed: torch.Tensor,  # [1, 1+L, D]
    cls_token: torch.Tensor,  # [1, 1, D]
    patch_size: int,
) -> torch.Tensor:  # [N, 1+K, D]
    N = imgs.shape[0]
    D = weight.shape[0]
    patches = patch_pixels(imgs, patch_size, ids_keep)  # [N, K, C*p*p]
    x = F.linear(patches, weight.reshape(D, -1), bias)
    pos = pos_embed[0, 1:]
    x = x + (pos.unsqueeze(0) if ids_keep is None else pos[ids_keep])
    cls = (cls_token + pos_embed[:, :1]).expand(N, -1, -1)
    return torch.cat([cls, x], dim=1)
