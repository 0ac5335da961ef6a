"""MAE loss: per-patch MSE against the (optionally normalised) pixels, averaged over removed patches.

Reference semantics (the MAE reference code): target = patchify(imgs); with norm_pix_loss each
patch is normalised by its own mean and UNBIASED variance, (t - mean) / sqrt(var + 1e-6); the loss
is the per-patch mean of squared errors, averaged with the mask as weights.
"""

from __future__ import annotations

import torch

from fastmae.patches import patchify

NORM_PIX_EPS = 1e-6


def masked_patch_loss_reference(
    pred: torch.Tensor,  # [N, M, p*p*C]
    imgs: torch.Tensor,  # [N, C, H, W]
    patch_size: int,
    norm_pix_loss: bool,
    patch_ids: torch.Tensor | None = None,  # [N, M] int64, or None: M == L in patch order
    weight: torch.Tensor | None = None,  # [N, M], or None: every patch weighs 1
) -> torch.Tensor:  # scalar
    target = patchify(imgs, patch_size)
    if patch_ids is not None:
        target = torch.gather(target, 1, patch_ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum()
