"""Fixed 2-D sine-cosine position embeddings, laid out exactly as the MAE reference code.

Quirk kept on purpose: the reference builds its grid with ``np.meshgrid(w, h)``, so the first half
of the channels encodes the column (width) index and the second half the row index. Checkpoints
trained with the reference depend on this order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: sin of every frequency, then cos of every frequency."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """[(1 if cls_token) + grid_size**2, dim] float64, cls row all zeros, patches row-major."""
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64),
        torch.arange(grid_size, dtype=torch.float64),
        indexing="ij",
    )
    # First half: column index (the reference's meshgrid(w, h) puts w first).
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize a [1, extra + G*G, D] table to [1, extra + num_patches, D] (bicubic, as the reference)."""
    old_grid = math.isqrt(pos_embed.shape[-2] - num_extra_tokens)
    new_grid = math.isqrt(num_patches)
    if old_grid**2 != pos_embed.shape[-2] - num_extra_tokens or new_grid**2 != num_patches:
        raise ValueError(
            f"position embeddings of shape {tuple(pos_embed.shape)} do not hold a square grid "
            f"that can be resized to {num_patches} patches"
        )
    if old_grid == new_grid:
        return pos_embed
    extra, tokens = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.shape[-1]
    tokens = tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    tokens = F.interpolate(tokens, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([extra, tokens], dim=1)
