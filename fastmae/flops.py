"""Analytic FLOP counts of MAE, per component, and the spec-sheet peaks of the GPUs we measure on.

Convention: matmul FLOPs, 2 per multiply-add, as ``torch.utils.flop_counter`` counts them and as
MFU is defined (PaLM, nanoGPT). Vector work (LayerNorm, GELU, softmax, residual adds, the loss) is
memory-bound and well under 1% of the matmuls for these models; ``elementwise=True`` adds an
estimate of it (constants below), which is why ``encoder_norm``, ``decoder_norm`` and ``loss`` are
0 by default.

Counts are per image for the model as it runs in training (``full_pred=False``): the patch
projection sees the K visible patches, the encoder 1+K tokens, the decoder 1+L tokens, and the
prediction head only the L-K removed patches. The paper's naive baseline ``encoder_mask_tokens``
embeds all L patches and runs the encoder on 1+L tokens. A reference-style model (conv over every
patch, head over every patch) is ``embed_all_patches=True, full_pred=True``.

Components (keys of ``component_flops``, in forward order):

- ``patch_embed``: the patch projection (a stride-p conv = one matmul over the embedded patches),
- ``encoder_blocks``: qkv, QK^T, AV, proj, fc1, fc2 of every encoder block,
- ``encoder_norm``: the final encoder LayerNorm (vector work only),
- ``decoder_embed_unshuffle``: ``decoder_embed`` on the encoder's tokens (the un-shuffle moves data),
- ``decoder_blocks``: as ``encoder_blocks`` for the decoder,
- ``decoder_norm``: the decoder LayerNorm (vector work only),
- ``prediction_head``: ``decoder_pred`` on the predicted patches,
- ``loss``: the per-patch (normalised) MSE (vector work only).

Training FLOPs are 3x forward (the backward pass costs two matmuls per forward matmul). The exact
backward count is slightly lower: the patch projection needs no input gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmae.masking import num_visible_patches

COMPONENTS = (
    "patch_embed",
    "encoder_blocks",
    "encoder_norm",
    "decoder_embed_unshuffle",
    "decoder_blocks",
    "decoder_norm",
    "prediction_head",
    "loss",
)
ENCODER_COMPONENTS = ("patch_embed", "encoder_blocks", "encoder_norm")
DECODER_COMPONENTS = ("decoder_embed_unshuffle", "decoder_blocks", "decoder_norm", "prediction_head")

# Vector FLOPs per element, rough but stated (only used with elementwise=True).
LAYERNORM_FLOPS_PER_ELEMENT = 8  # mean, variance, normalise, scale, shift
GELU_FLOPS_PER_ELEMENT = 8  # erf polynomial and the products around it
SOFTMAX_FLOPS_PER_SCORE = 5  # scale, max, exp, sum, divide
RESIDUAL_FLOPS_PER_ELEMENT = 1
LOSS_FLOPS_PER_ELEMENT = 3  # subtract, square, accumulate
NORM_PIX_FLOPS_PER_ELEMENT = 5  # mean, variance, normalise


@dataclass(frozen=True)
class TokenCounts:
    """How many patches/tokens each part of the model processes per image."""

    num_patches: int  # L
    num_visible: int  # K = int(L * (1 - mask_ratio))
    embedded_patches: int  # patches through the patch projection: K, or L
    encoder_tokens: int  # 1+K, or 1+L with mask tokens in the encoder
    decoder_tokens: int  # 1+L
    predicted_patches: int  # L-K in training, L with full_pred


def token_counts(config, mask_ratio: float = 0.75, encoder_mask_tokens: bool = False, *,
                 full_pred: bool = False, embed_all_patches: bool | None = None) -> TokenCounts:
    L = (config.img_size // config.patch_size) ** 2
    K = num_visible_patches(L, mask_ratio)
    if embed_all_patches is None:
        embed_all_patches = encoder_mask_tokens
    return TokenCounts(
        num_patches=L,
        num_visible=K,
        embedded_patches=L if (embed_all_patches or encoder_mask_tokens) else K,
        encoder_tokens=1 + (L if encoder_mask_tokens else K),
        decoder_tokens=1 + L,
        predicted_patches=L if full_pred else L - K,
    )


def block_flops(width: int, num_heads: int, tokens: int, mlp_ratio: float, elementwise: bool = False) -> float:
    """Forward FLOPs of one pre-norm ViT block on ``tokens`` tokens (per image)."""
    d, t = width, tokens
    hidden = int(d * mlp_ratio)
    flops = 2.0 * t * (3 * d * d + d * d + 2 * d * hidden)  # qkv, proj, fc1, fc2
    flops += 4.0 * t * t * d  # QK^T and AV over all heads
    if elementwise:
        flops += 2 * LAYERNORM_FLOPS_PER_ELEMENT * t * d
        flops += SOFTMAX_FLOPS_PER_SCORE * num_heads * t * t
        flops += GELU_FLOPS_PER_ELEMENT * t * hidden
        flops += 2 * RESIDUAL_FLOPS_PER_ELEMENT * t * d
    return flops


def component_flops(config, mask_ratio: float = 0.75, encoder_mask_tokens: bool = False, *,
                    full_pred: bool = False, embed_all_patches: bool | None = None,
                    elementwise: bool = False) -> dict[str, float]:
    """Forward FLOPs per image of each component (``COMPONENTS``) of the model ``config`` describes.

    config: ``MAEConfig`` (``model.config``). See the module docstring for the conventions.
    """
    n = token_counts(config, mask_ratio, encoder_mask_tokens, full_pred=full_pred,
                     embed_all_patches=embed_all_patches)
    D, Dd = config.embed_dim, config.decoder_embed_dim
    patch_dim = config.in_chans * config.patch_size**2
    flops = {
        "patch_embed": 2.0 * n.embedded_patches * patch_dim * D,
        "encoder_blocks": config.depth * block_flops(D, config.num_heads, n.encoder_tokens, config.mlp_ratio, elementwise),
        "encoder_norm": 0.0,
        "decoder_embed_unshuffle": 2.0 * n.encoder_tokens * D * Dd,
        "decoder_blocks": config.decoder_depth
        * block_flops(Dd, config.decoder_num_heads, n.decoder_tokens, config.mlp_ratio, elementwise),
        "decoder_norm": 0.0,
        "prediction_head": 2.0 * n.predicted_patches * Dd * patch_dim,
        "loss": 0.0,
    }
    if elementwise:
        flops["encoder_norm"] = float(LAYERNORM_FLOPS_PER_ELEMENT * n.encoder_tokens * D)
        flops["decoder_norm"] = float(LAYERNORM_FLOPS_PER_ELEMENT * n.predicted_patches * Dd)
        per_element = LOSS_FLOPS_PER_ELEMENT + (NORM_PIX_FLOPS_PER_ELEMENT if config.norm_pix_loss else 0)
        flops["loss"] = float(per_element * n.predicted_patches * patch_dim)
    return flops


def forward_flops_per_image(config, mask_ratio: float = 0.75, encoder_mask_tokens: bool = False, **kwargs) -> float:
    """Sum of ``component_flops`` (same keyword arguments)."""
    return sum(component_flops(config, mask_ratio, encoder_mask_tokens, **kwargs).values())


def train_flops_per_image(config, mask_ratio: float = 0.75, encoder_mask_tokens: bool = False, **kwargs) -> float:
    """Forward + backward = 3 x forward (the MFU convention)."""
    return 3.0 * forward_flops_per_image(config, mask_ratio, encoder_mask_tokens, **kwargs)


# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, FLOP/s.
# fp32 is the non-tensor-core rate; tf32 applies when torch.backends.cuda.matmul.allow_tf32 is on.
_PEAKS_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe alike
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM; same die as H100 SXM
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
}
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def gpu_family(device_name: str) -> str | None:
    """Map a ``torch.cuda.get_device_name()`` string to a key of the peak table, or None."""
    name = device_name.upper()
    if "H200" in name:
        return "H200 NVL" if "NVL" in name else "H200"
    if "H100" in name:
        if "NVL" in name:
            return "H100 NVL"
        if "PCIE" in name:
            return "H100 PCIe"
        return "H100 SXM"  # "NVIDIA H100 80GB HBM3"
    if "A100" in name:
        return "A100"
    return None


def device_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Spec-sheet dense peak FLOP/s of ``device_name`` for matmuls in ``dtype``; None when unknown (CPU,
    other GPUs). ``tf32=True`` with ``dtype=torch.float32`` gives the TF32 tensor-core rate."""
    family = gpu_family(device_name)
    if family is None or dtype not in _DTYPE_KEYS:
        return None
    key = "tf32" if (dtype == torch.float32 and tf32) else _DTYPE_KEYS[dtype]
    return _PEAKS_TFLOPS[family][key] * 1e12
