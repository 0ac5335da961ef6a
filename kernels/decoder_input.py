"""Decoder input: visible tokens back in their places, mask tokens elsewhere, + position embeddings.

Reference semantics (the MAE reference code): concatenate the visible tokens (without cls) with
L - K mask tokens, gather with ids_restore to put every token back in the original patch order,
put cls first again and add decoder_pos_embed.
"""

from __future__ import annotations

import torch


def decoder_unshuffle_reference(
    x: torch.Tensor,  # [N, 1+K, Dd]
    mask_token: torch.Tensor,  # [1, 1, Dd]
    ids_restore: torch.Tensor,  # [N, L] int64
    pos_embed: torch.Tensor,  # [1, 1+L, Dd]
) -> torch.Tensor:  # [N, 1+L, Dd]
    N, T, D = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.expand(N, L + 1 - T, D)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([x[:, :1, :], x_], dim=1) + pos_embed
