"""The plain-PyTorch references: the semantics each fused op implements (the reference code's model,
``models_mae.py``), and the path ``kernels="torch"`` (or "auto" without CUDA or Triton) runs.

They live apart from the Triton files so that they import without Triton: a CPU-only install runs
the model through them. Each op's file imports its own reference, and the tests compare the two
(the loaders' resize, ``crop_resize.py``, has its reference in ``fastmae.data.augment``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmae.patches import patch_pixels, patchify

NORM_PIX_EPS = 1e-6  # the reference code's: (target - mean) / (var + 1.e-6)**.5


# ---- Encoder input (kernels/encoder_input.py) ----


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
    # in the weight's dtype, as the Triton launcher reads them (under autocast, F.linear casts both anyway)
    patches = patch_pixels(imgs, patch_size, ids_keep).to(weight.dtype)  # [N, K, C*p*p]
    x = F.linear(patches, weight.reshape(D, -1), bias)
    pos = pos_embed[0, 1:]
    x = x + (pos.unsqueeze(0) if ids_keep is None else pos[ids_keep])
    cls = (cls_token + pos_embed[:, :1]).expand(N, -1, -1)
    return torch.cat([cls, x], dim=1)


# ---- Decoder input (kernels/decoder_input.py) ----


def decoder_unshuffle_reference(
    x: torch.Tensor,  # [N, 1+K, Dd]
    mask_token: torch.Tensor,  # [1, 1, Dd]
    ids_restore: torch.Tensor,  # [N, L] int64
    pos_embed: torch.Tensor,  # [1, 1+L, Dd]
) -> torch.Tensor:  # [N, 1+L, Dd]
    N, T, D = x.shape
    L = ids_restore.shape[1]
    if not 1 <= T <= L + 1:  # expand(N, -1, D) would keep one mask token and drop a token without a word
        raise ValueError(f"x shape {list(x.shape)}: expected [N, 1+K, D] with 0 <= K <= L = {L}")
    mask_tokens = mask_token.expand(N, L + 1 - T, D)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([x[:, :1, :], x_], dim=1) + pos_embed


# ---- Loss (kernels/patch_loss.py) ----


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
    return patch_target_loss(pred, target, norm_pix_loss, weight)


def patch_target_loss(
    pred: torch.Tensor,  # [N, M, P]
    target: torch.Tensor,  # [N, M, P], the patches' pixels
    norm_pix_loss: bool,
    weight: torch.Tensor | None = None,  # [N, M], or None: every patch weighs 1
) -> torch.Tensor:  # scalar
    """The loss against patches already taken from the images (the reference's forward_loss after its patchify)."""
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum()


# ---- Residual add + LayerNorm (kernels/layer_norm.py) ----


def add_layer_norm_reference(
    x: torch.Tensor,  # [..., D]
    branch: torch.Tensor | None,  # [..., D] or None
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor,  # [D]
    eps: float,
    out_dtype: torch.dtype | None = None,  # None: the residual's dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # (residual, out)
    residual = x if branch is None else x + branch
    if residual.dtype == weight.dtype == bias.dtype:
        out = F.layer_norm(residual, residual.shape[-1:], weight, bias, eps)
    else:  # CUDA's LayerNorm takes one dtype (CPU's computes mixed ones in fp32): fp32, one rounding at the end
        out = F.layer_norm(residual.float(), residual.shape[-1:], weight.float(), bias.float(), eps)
    return residual, out.to(out_dtype or residual.dtype)
