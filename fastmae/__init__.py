"""fastmae: the fastest Masked Autoencoder (MAE) pretraining engine, numerically the reference model."""

from fastmae.models import (
    MODEL_ARCHS,
    MaskedAutoencoderViT,
    create_model,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_ARCHS",
    "MaskedAutoencoderViT",
    "create_model",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
]
