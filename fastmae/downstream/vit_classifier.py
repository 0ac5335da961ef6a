"""The ViT classifier of the reference fine-tuning code (``models_vit.VisionTransformer``).

Same encoder parameters and names as the MAE (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.i.*``), so a pretrained MAE checkpoint loads into it with only the decoder left over, plus
the reference's head: with ``global_pool`` the patch tokens are averaged (cls excluded) and go
through ``fc_norm`` (the encoder's ``norm`` is deleted, as the reference does); without it the cls
token after ``norm`` is the feature. ``head`` is the linear classifier. Fine-tuned state_dicts have
the reference's keys and load into its code unchanged.

Unlike the MAE, ``pos_embed`` is a trainable parameter here (timm's VisionTransformer, which the
reference subclasses, trains it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from fastmae import kernels as ops
from fastmae.models import MODEL_ARCHS
from fastmae.pos_embed import sincos_2d
from fastmae.vit import Block, PatchEmbed, forward_blocks, init_vit_weights

ENCODER_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        global_pool: bool = False,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        attn: str = "sdpa",
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        drop_rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        block = functools.partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_eps=norm_eps, attn_backend=attn,
                                  kernels="auto")
        self.blocks = nn.ModuleList([block(embed_dim, num_heads, drop_path=r) for r in drop_rates])
        if not global_pool:
            self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes)
        if global_pool:
            # after the head, where models_vit adds it: the parameters' order, and with it the optimizer
            # state's, is the reference's, so fine-tuning checkpoints resume in either code
            self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # overwritten by pretrained weights, or by init_from_scratch (--random_init, the reference's timm init)
        self.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.patch_embed.grid_size).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> feature [N, D] (pooled patch tokens + fc_norm, or normed cls token)."""
        w, b = self.patch_embed.proj.weight, self.patch_embed.proj.bias
        path = ops.resolve_kernels("auto", imgs.device, w.dtype)
        # ids_keep=None: every patch, in order; cls + pos row 0 prepended (the reference's embedding)
        x = ops.visible_patch_embed(imgs, None, w, b, self.pos_embed, self.cls_token, self.patch_size, path)
        if self.global_pool:
            return self.fc_norm(forward_blocks(self.blocks, x)[:, 1:, :].mean(dim=1))
        return forward_blocks(self.blocks, x, self.norm)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> logits [N, num_classes]."""
        return self.head(self.forward_features(imgs))


def encoder_arch(name: str) -> dict:
    """Encoder settings of a named architecture: 'vit_base_patch16' or the MAE's 'mae_vit_base_patch16'."""
    mae_name = name if name.startswith("mae_") else f"mae_{name}"
    if mae_name not in MODEL_ARCHS:
        names = sorted(n[len("mae_"):] for n in MODEL_ARCHS)
        raise ValueError(f"unknown model {name!r}; choose from {names}")
    arch = {"img_size": 224, "mlp_ratio": 4.0, **MODEL_ARCHS[mae_name]}
    return {k: arch[k] for k in ENCODER_FIELDS}


def create_classifier(name: str, num_classes: int, **overrides) -> VisionTransformer:
    """A classifier with the encoder of a named MAE architecture; keyword arguments override."""
    return VisionTransformer(**{**encoder_arch(name), "num_classes": num_classes, **overrides})


def init_from_scratch(model: VisionTransformer) -> None:
    """Where the reference starts without --finetune: timm's VisionTransformer init (pos_embed, cls_token
    and every Linear trunc-normal std 0.02 with zero biases, LayerNorms 1 and 0, the patch projection
    as PyTorch makes a Conv2d). The head is part of it: main_finetune.py and main_linprobe.py re-init
    the head only for a loaded checkpoint."""
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    model.patch_embed.proj.reset_parameters()


def init_head(model: VisionTransformer, std: float) -> None:
    """Truncated-normal head weight, zero bias: std 2e-5 fine-tuning, 0.01 linear probe (reference)."""
    nn.init.trunc_normal_(model.head.weight, std=std)  # bounds +-2 absolute, as timm's (reference)
    nn.init.zeros_(model.head.bias)


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

