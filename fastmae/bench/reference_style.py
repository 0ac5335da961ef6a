"""MAE the way the reference code runs it, as the comparison point for fastmae's speed.

Written from the paper and the reference code's description (models_mae.py, main_pretrain.py):
the stride-p convolution embeds every patch, the kept ones are then picked by ``gather`` after an
``argsort`` of the noise; attention is softmax(QK^T)V written out; the decoder predicts all L
patches and the loss weighs them with the mask (the un-shuffle and the loss are the plain-PyTorch
reference paths of ``fastmae.kernels``, i.e. the reference code's own ops); training runs under fp16 autocast with a gradient
scaler and torch's default AdamW (multi-tensor on CUDA, not fused), as main_pretrain.py builds it. The parameter layout is fastmae's (which is
the reference's), so both load the same state_dict and, for the same noise, give the same loss.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from fastmae import kernels as ops
from fastmae.models import MAEConfig, MaskedAutoencoderViT
from fastmae.vit import Block, PatchEmbed


class ReferenceStyleMAE(nn.Module):
    def __init__(self, config: MAEConfig):
        super().__init__()
        c = config
        self.config = config
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, c.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(c.embed_dim, c.num_heads, c.mlp_ratio, norm_eps=c.norm_eps, attn_backend="math") for _ in range(c.depth)]
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, c.decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, norm_eps=c.norm_eps, attn_backend="math")
             for _ in range(c.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=c.norm_eps)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size**2 * c.in_chans)

    @classmethod
    def initialised(cls, config: MAEConfig) -> "ReferenceStyleMAE":
        """With the reference initialisation (taken from a fastmae model of the same config)."""
        model = cls(config)
        model.load_state_dict(MaskedAutoencoderViT(**dataclasses.asdict(config), kernels="torch").state_dict())
        return model

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """x [N, L, D] -> (x_kept [N, K, D], mask [N, L], ids_restore [N, L])."""
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_kept, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # every patch goes through the conv
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D] -> pred [N, L, p*p*C]: the head runs on every patch."""
        x = self.decoder_embed(x)
        # the reference's un-shuffle: append mask tokens, gather by ids_restore, add positions
        x = ops.decoder_unshuffle(x, self.mask_token, ids_restore, self.decoder_pos_embed, path="torch")
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reference's loss: per-patch MSE over all L patches, averaged with the mask as weights."""
        return ops.masked_patch_loss(pred, imgs, self.config.patch_size, self.config.norm_pix_loss, None, mask, path="torch")

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """-> (loss, pred [N, L, p*p*C], mask [N, L]), as the reference."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
