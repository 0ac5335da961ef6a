"""Reconstructions as the paper shows them (He et al., Fig. 2-4): masked input, reconstruction with
the visible patches pasted back, original; one row per image and mask ratio.

Everything is computed in the model's normalised space and de-normalised only for display. A
norm-pix model predicts each patch normalised by its own mean and variance, so its prediction is
mapped back with the statistics of the true patch (unbiased variance, eps 1e-6, as the loss), the
way the paper's figures were made. Removed patches of the masked input are shown as the zero of
the normalised space (the dataset mean colour), as the reference demo notebook does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fastmae.atomic_file import atomic_write
from fastmae.checkpoint import unwrap_model
from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastmae.patches import patchify, unpatchify

NORM_PIX_EPS = 1e-6  # the loss's eps, so de-normalising inverts exactly what was predicted
COLUMN_TITLES = ("masked", "reconstruction + visible", "original")


@dataclass
class Reconstruction:
    """All [N, C, H, W] in the model's normalised input space."""

    masked: torch.Tensor  # removed patches set to 0
    pasted: torch.Tensor  # prediction on removed patches, input on visible ones
    prediction: torch.Tensor  # prediction everywhere (de-normalised per patch for norm-pix models)
    original: torch.Tensor
    mask: torch.Tensor  # [N, L], 1 = removed


def denormalize_patch_prediction(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target [N, L, p*p*C] -> pred * sqrt(var + eps) + mean with the target patch's statistics."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference loss
    return pred * (var + NORM_PIX_EPS).sqrt() + mean


@torch.no_grad()
def reconstruct(model: torch.nn.Module, imgs: torch.Tensor, mask_ratio: float,
                noise: torch.Tensor | None = None) -> Reconstruction:
    """imgs [N, C, H, W] normalised, noise [N, L] or None -> the three panels of the paper's figure."""
    mae = unwrap_model(model)
    param = next(mae.parameters())
    imgs = imgs.to(device=param.device, dtype=torch.float32)
    if noise is not None:
        noise = noise.to(param.device)
    was_training = mae.training
    mae.eval()
    try:
        # in the model's dtype (a bf16 or float64 model); the panels are float32
        _, pred, mask = mae(imgs.to(param.dtype), mask_ratio=mask_ratio, noise=noise)  # [N, L, p*p*C], [N, L]
    finally:
        mae.train(was_training)
    p, C = mae.patch_size, imgs.shape[1]
    pred = pred.float()
    if getattr(mae, "norm_pix_loss", False):
        pred = denormalize_patch_prediction(pred, patchify(imgs, p))
    prediction = unpatchify(pred, p, C)
    removed = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * C).float(), p, C)  # [N, C, H, W]
    return Reconstruction(
        masked=imgs * (1 - removed),
        pasted=imgs * (1 - removed) + prediction * removed,
        prediction=prediction,
        original=imgs,
        mask=mask,
    )


def to_uint8_hwc(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [N, C, H, W] -> displayable uint8 [N, H, W, 3] (grey images repeated to RGB)."""
    C = imgs.shape[1]
    if len(mean) != C or len(std) != C:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values, the images {C} channels")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=imgs.device).view(1, C, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=imgs.device).view(1, C, 1, 1)
    pixels = ((imgs.float() * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    if C == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    elif C != 3:
        raise ValueError(f"only 1- or 3-channel images can be shown, got {C} channels")
    return pixels


def _stats_for(channels: int, mean: Sequence[float], std: Sequence[float]):
    """ImageNet defaults on a grey model: the channel average, so a 1-channel model still displays."""
    if channels == 1 and len(mean) == 3 and tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD:
        return (sum(mean) / 3,), (sum(std) / 3,)
    return tuple(mean), tuple(std)


def reconstruction_grid(model: torch.nn.Module, imgs: torch.Tensor, mask_ratios: Sequence[float] = (0.75,),
                        noise: torch.Tensor | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, tile: int = 160) -> Image.Image:
    """The figure as a PIL image: a title row, then per image and mask ratio one row of three tiles.

    Tiles are upscaled with nearest neighbour to at least ``tile`` pixels so patch borders stay
    visible on small images. The same noise is used for every ratio, so higher ratios hide a
    superset of the patches hidden at lower ones (argsort keeps the smallest noise).
    """
    if imgs.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(imgs.shape)}")
    if len(mask_ratios) == 0:
        raise ValueError("give at least one mask ratio")
    mean, std = _stats_for(imgs.shape[1], mean, std)
    H, W = imgs.shape[-2:]
    scale = max(1, -(-tile // max(H, W)))  # ceil division
    th, tw = H * scale, W * scale
    gap, label_w = 4, 56
    font = ImageFont.load_default()
    title_h = 18

    rows: list[tuple[str, list[np.ndarray]]] = []
    if noise is None:  # one draw for all ratios, so the rows of an image are nested masks
        noise = torch.rand(imgs.shape[0], unwrap_model(model).num_patches)
    recons = {r: reconstruct(model, imgs, r, noise) for r in mask_ratios}
    for i in range(imgs.shape[0]):
        for r in mask_ratios:
            rec = recons[r]
            panels = [to_uint8_hwc(t[i:i + 1], mean, std)[0] for t in (rec.masked, rec.pasted, rec.original)]
            rows.append((f"{round(100 * r)}%", panels))

    width = label_w + 3 * tw + 4 * gap
    height = title_h + len(rows) * (th + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMN_TITLES):
        draw.text((label_w + gap + c * (tw + gap), 3), title, fill="black", font=font)
    for r_idx, (label, panels) in enumerate(rows):
        y = title_h + r_idx * (th + gap)
        draw.text((4, y + th // 2 - 6), label, fill="black", font=font)
        for c, panel in enumerate(panels):
            img = Image.fromarray(panel).resize((tw, th), Image.NEAREST)
            canvas.paste(img, (label_w + gap + c * (tw + gap), y))
    return canvas


def save_reconstructions(model: torch.nn.Module, imgs: torch.Tensor, path: str | os.PathLike,
                         mask_ratios: Sequence[float] = (0.75,), noise: torch.Tensor | None = None,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Path:
    """Write the paper-style reconstruction figure of ``imgs`` [N, C, H, W] (normalised) as a PNG."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"reconstructions are written as PNG; {path} does not end in .png")
    grid = reconstruction_grid(model, imgs, mask_ratios, noise, mean, std)
    return atomic_write(path, lambda f: grid.save(f, format="PNG"))
