"""Patch layouts. Two orders exist and both are the reference's:

- target order (``patchify``): per patch, row-major over (i, j) with channels last,
  index = (i * p + j) * C + c. This is what ``pred`` and the loss use.
- projection order (``patch_pixels``): per patch, (c, i, j), which is the flattened conv weight
  [D, C, p, p] of ``patch_embed.proj``, so a patch times weight.view(D, -1).T equals the conv.
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, L, p*p*C] in target order."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int = 3) -> torch.Tensor:
    """[N, L, p*p*C] in target order -> imgs [N, C, H, W] (square grid)."""
    N, L, _ = x.shape
    p = patch_size
    h = w = int(round(L**0.5))
    if h * w != L:
        raise ValueError(f"{L} patches do not form a square grid")
    x = x.reshape(N, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, in_chans, h * p, w * p)


def patch_pixels(imgs: torch.Tensor, patch_size: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, K, C*p*p] in projection order; ids [N, K] picks patches (None: all)."""
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, C * p * p)
    if ids is None:
        return x
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
