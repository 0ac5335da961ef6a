"""Hugging Face transformers' ViTMAEForPreTraining at a fastmae config, for the step benchmark.

Only used when transformers is importable (``pip install transformers``). HF's model embeds every
patch, masks by gather, runs the decoder's head on all L patches and weighs the loss by the mask,
as the reference does; it uses its own parameter layout and initialisation.
"""

from __future__ import annotations

import importlib.util

import torch.nn as nn

from fastmae.models import MAEConfig


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def build_hf_vitmae(config: MAEConfig, mask_ratio: float = 0.75, attn_implementation: str = "sdpa") -> nn.Module:
    if not transformers_available():
        raise ValueError("HF ViTMAE asked for, but transformers is not installed (pip install transformers)")
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf_config = ViTMAEConfig(
        image_size=config.img_size,
        patch_size=config.patch_size,
        num_channels=config.in_chans,
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=int(config.embed_dim * config.mlp_ratio),
        decoder_hidden_size=config.decoder_embed_dim,
        decoder_num_hidden_layers=config.decoder_depth,
        decoder_num_attention_heads=config.decoder_num_heads,
        decoder_intermediate_size=int(config.decoder_embed_dim * config.mlp_ratio),
        hidden_act="gelu",
        qkv_bias=True,
        layer_norm_eps=config.norm_eps,
        mask_ratio=mask_ratio,
        norm_pix_loss=config.norm_pix_loss,
        attn_implementation=attn_implementation,
    )
    return ViTMAEForPreTraining(hf_config)


class HFViTMAELoss(nn.Module):
    """Calls HF's model the way fastmae's is called: imgs [N, C, H, W] -> (loss, pred, mask)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None):
        if mask_ratio != self.hf_model.config.mask_ratio:
            raise ValueError(f"HF ViTMAE was built with mask_ratio {self.hf_model.config.mask_ratio}, called with {mask_ratio}")
        out = self.hf_model(pixel_values=imgs, noise=noise)
        return out.loss, out.logits, out.mask
