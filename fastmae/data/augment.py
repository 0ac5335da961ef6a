"""The paper's pretraining augmentation: RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip,
ImageNet mean/std normalisation.

``sample_resized_crop`` is torchvision's ``RandomResizedCrop.get_params`` algorithm on a NumPy
generator. Every loader (this CPU one, the DALI and torchvision GPU ones) draws its crop boxes from
it, so all loaders share one augmentation distribution and a seeded run is reproducible.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_SCALE = (0.2, 1.0)  # the MAE recipe (main_pretrain.py), not torchvision's default 0.08
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
HFLIP_PROB = 0.5


def sample_resized_crop(height: int, width: int, scale: tuple[float, float] = CROP_SCALE,
                        ratio: tuple[float, float] = CROP_RATIO,
                        rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """A crop box (top, left, h, w) of an image of ``height`` x ``width``.

    Ten tries at an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, the central crop with the aspect ratio clamped to ``ratio``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale {scale} and ratio {ratio} must be positive, increasing ranges")
    rng = np.random.default_rng() if rng is None else rng
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback to a central crop, as torchvision
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w = width
        h = int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        h = height
        w = int(round(h * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_crop_flip(image: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = CROP_SCALE,
                     ratio: tuple[float, float] = CROP_RATIO,
                     hflip_prob: float = HFLIP_PROB) -> tuple[Image.Image, bool]:
    """The random draws of RandomResizedCrop + flip on a PIL image: (its RGB crop, not yet resized;
    whether to flip the resized crop). The flip is drawn after the box, as torchvision draws them."""
    image = image.convert("RGB")
    top, left, h, w = sample_resized_crop(image.height, image.width, scale, ratio, rng)
    return image.crop((left, top, left + w, top + h)), bool(rng.random() < hflip_prob)


def random_resized_crop_flip(image: Image.Image, size: int, rng: np.random.Generator,
                             scale: tuple[float, float] = CROP_SCALE,
                             ratio: tuple[float, float] = CROP_RATIO,
                             hflip_prob: float = HFLIP_PROB) -> np.ndarray:
    """A PIL image -> uint8 array [size, size, 3]: resized crop (bicubic), then a random flip."""
    crop, flip = random_crop_flip(image, rng, scale, ratio, hflip_prob)
    # crop then resize, as torchvision's resized_crop on PIL images
    pixels = np.array(crop.resize((size, size), Image.BICUBIC), dtype=np.uint8)  # a writable copy
    if flip:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def resized_crops(images: list[torch.Tensor], boxes: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
    """images: B x uint8 [3, H_i, W_i] on one device; boxes: [B, 4] (top, left, h, w); flips: bool [B]
    -> uint8 [B, 3, size, size] on that device, as torchvision's resized_crop + hflip on PIL images:
    bicubic with antialiasing, rounded and clamped to 0..255 (PIL resizes to uint8). The loaders that
    resize on the GPU use it; it reads nothing back from the device and copies nothing to it."""
    # a few kernels per image, the rounding once per batch: on a GPU the host's launches are the cost
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32, device=images[0].device)
    for row, (image, (top, left, height, width), flip) in enumerate(zip(images, boxes.tolist(), flips.tolist())):
        crop = image[:, top : top + height, left : left + width].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
        out[row] = resized.flip(-1) if flip else resized
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The evaluation view: shorter side resized to ``size`` (bicubic), central square; uint8 [size, size, 3]."""
    image = image.convert("RGB")
    scale = size / min(image.width, image.height)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def normalize(batch_uint8: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, 3, S, S] (any device) -> float32 [B, 3, S, S], (x/255 - mean) / std."""
    shift, scale = _normalization_constants(tuple(map(float, mean)), tuple(map(float, std)), batch_uint8.device)
    return batch_uint8.float().sub_(shift).div_(scale)


@functools.lru_cache(maxsize=16)
def _normalization_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    """(255 mean, 255 std) as [1, C, 1, 1] tensors on ``device``, made once: building them per batch
    would copy from pageable host memory, which makes the host wait for the GPU on every step."""
    shift = torch.tensor(mean, device=device).mul(255.0).view(1, -1, 1, 1)
    scale = torch.tensor(std, device=device).mul(255.0).view(1, -1, 1, 1)
    return shift, scale
