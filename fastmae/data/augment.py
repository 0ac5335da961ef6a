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

from fastmae.data.sources import as_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_SCALE = (0.2, 1.0)  # the MAE recipe (main_pretrain.py), not torchvision's default 0.08
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
HFLIP_PROB = 0.5


def _checked_crop_request(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                          rng: np.random.Generator | None) -> np.random.Generator:
    """Raise ValueError for an empty image or a scale / ratio range that is not positive and increasing;
    -> the generator to draw from (a fresh one when none is given)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale {scale} and ratio {ratio} must be positive, increasing ranges")
    return np.random.default_rng() if rng is None else rng


def sample_resized_crop(height: int, width: int, scale: tuple[float, float] = CROP_SCALE,
                        ratio: tuple[float, float] = CROP_RATIO,
                        rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """A crop box (top, left, h, w) of an image of ``height`` x ``width``.

    Ten tries at an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, the central crop with the aspect ratio clamped to ``ratio``.
    """
    rng = _checked_crop_request(height, width, scale, ratio, rng)
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


def sample_clamped_resized_crop(height: int, width: int, scale: tuple[float, float] = CROP_SCALE,
                                ratio: tuple[float, float] = CROP_RATIO,
                                rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """A crop box (top, left, h, w), as the reference's linear probe draws it (util/crop.py, after
    BYOL's TF code): one draw of area and aspect ratio, each side clamped to the image's. Its crops
    are larger on average than ``sample_resized_crop``'s, whose misses fall back to a central crop."""
    rng = _checked_crop_request(height, width, scale, ratio, rng)
    target_area = height * width * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    # at least a pixel: a tiny image's draw can round to nothing
    w = max(1, min(int(round(math.sqrt(target_area * aspect_ratio))), width))
    h = max(1, min(int(round(math.sqrt(target_area / aspect_ratio))), height))
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return top, left, h, w


def random_crop_flip(image: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = CROP_SCALE,
                     ratio: tuple[float, float] = CROP_RATIO, hflip_prob: float = HFLIP_PROB,
                     sample_box=sample_resized_crop) -> tuple[Image.Image, bool]:
    """The random draws of RandomResizedCrop + flip on a PIL image: (its RGB crop, not yet resized;
    whether to flip the resized crop). The flip is drawn after the box, as torchvision draws them.
    ``sample_box``: torchvision's draw, or ``sample_clamped_resized_crop``."""
    image = as_rgb(image)
    top, left, h, w = sample_box(image.height, image.width, scale, ratio, rng)
    return image.crop((left, top, left + w, top + h)), bool(rng.random() < hflip_prob)


def random_resized_crop_flip(image: Image.Image, size: int, rng: np.random.Generator,
                             scale: tuple[float, float] = CROP_SCALE,
                             ratio: tuple[float, float] = CROP_RATIO,
                             hflip_prob: float = HFLIP_PROB, sample_box=sample_resized_crop) -> np.ndarray:
    """A PIL image -> uint8 array [size, size, 3]: resized crop (bicubic), then a random flip."""
    crop, flip = random_crop_flip(image, rng, scale, ratio, hflip_prob, sample_box)
    # crop then resize, as torchvision's resized_crop on PIL images
    pixels = np.array(crop.resize((size, size), Image.BICUBIC), dtype=np.uint8)  # a writable copy
    if flip:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


# Columns of a crop table, int64 [B, 9], one row per crop of a batch whose source images lie one after
# another in one uint8 buffer as [3, H_b, W_b] (``crop_table``). TMP_OFFSET is where the Triton kernel
# keeps the crop's rows between its two passes.
SRC_OFFSET, SRC_HEIGHT, SRC_WIDTH, TOP, LEFT, HEIGHT, WIDTH, TMP_OFFSET, FLIP = range(9)
TABLE_COLUMNS = 9
CHANNELS = 3


def crop_table(image_shapes, boxes, flips, size: int) -> torch.Tensor:
    """image_shapes int [B, 2] (H, W) of images stored one after another as [3, H, W] uint8; boxes
    int [B, 4] (top, left, h, w) inside them; flips bool [B] -> the crop table, int64 [B, 9] on the CPU."""
    image_shapes = np.asarray(image_shapes, dtype=np.int64).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    flips = np.asarray(flips).reshape(-1)
    if not len(image_shapes) == len(boxes) == len(flips):
        raise ValueError(f"{len(image_shapes)} image shapes, {len(boxes)} boxes and {len(flips)} flips: "
                         "give one of each per crop")
    table = np.empty((len(boxes), TABLE_COLUMNS), dtype=np.int64)
    src_sizes = CHANNELS * image_shapes[:, 0] * image_shapes[:, 1]
    tmp_sizes = CHANNELS * boxes[:, 2] * size
    table[:, SRC_OFFSET] = np.cumsum(src_sizes) - src_sizes
    table[:, SRC_HEIGHT:SRC_WIDTH + 1] = image_shapes
    table[:, TOP:WIDTH + 1] = boxes
    table[:, TMP_OFFSET] = np.cumsum(tmp_sizes) - tmp_sizes
    table[:, FLIP] = flips.astype(bool)
    return torch.from_numpy(table)


def check_crop_table(pixels: torch.Tensor, table: torch.Tensor, size: int) -> np.ndarray:
    """The table's rows as a NumPy array, checked against the pixel buffer and the output size (on the
    host, where the table is made: a crop outside its image would read another image's pixels, not fail)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not (isinstance(table, torch.Tensor) and table.device.type == "cpu" and table.dtype == torch.int64
            and table.ndim == 2 and table.shape[1] == TABLE_COLUMNS and table.shape[0] > 0):
        raise ValueError(f"table must be a CPU int64 tensor [B >= 1, {TABLE_COLUMNS}] (crop_table), got "
                         f"{getattr(table, 'dtype', type(table).__name__)} {list(getattr(table, 'shape', []))}")
    if not (isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.ndim == 1
            and pixels.is_contiguous()):
        raise ValueError(f"pixels must be a contiguous 1-d uint8 tensor, got "
                         f"{getattr(pixels, 'dtype', type(pixels).__name__)} {list(getattr(pixels, 'shape', []))}")
    rows = table.contiguous().numpy()
    src_h, src_w, top, left, h, w = (rows[:, k] for k in (SRC_HEIGHT, SRC_WIDTH, TOP, LEFT, HEIGHT, WIDTH))
    bad = (h < 1) | (w < 1) | (top < 0) | (left < 0) | (top + h > src_h) | (left + w > src_w)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise ValueError(f"crop {b}: box (top {top[b]}, left {left[b]}, {h[b]} x {w[b]}) is not inside its "
                         f"{src_h[b]} x {src_w[b]} image")
    ends = rows[:, SRC_OFFSET] + CHANNELS * src_h * src_w
    if rows[:, SRC_OFFSET].min() < 0 or ends.max() > pixels.numel():
        raise ValueError(f"the table's images reach element {ends.max()} of a pixel buffer of {pixels.numel()}")
    # the GPU kernels' scratch rows: laid out for one output size, they overlap (or run past the
    # buffer) at another
    tmp_sizes = CHANNELS * h * size
    if not np.array_equal(rows[:, TMP_OFFSET], np.cumsum(tmp_sizes) - tmp_sizes):
        raise ValueError(f"the table's scratch offsets (column {TMP_OFFSET}) are not those of crops resized to "
                         f"{size}: make it with crop_table(..., size={size})")
    return rows


def resized_crops_reference(pixels: torch.Tensor, table: torch.Tensor, size: int, shift: torch.Tensor,
                            scale: torch.Tensor) -> torch.Tensor:
    """pixels uint8 [sum of 3 H_b W_b], table int64 [B, 9] (crop_table), shift = 255 mean and scale =
    255 std fp32 [3] -> float32 [B, 3, size, size]: each crop as torchvision's resized crop of a PIL
    image, mirrored if flipped, normalised. The resize is PIL's antialiased bicubic as PIL runs it:
    horizontal, rounded and clamped to uint8, then vertical, rounded and clamped (at most a grey level
    from PIL's own, whose weights are fixed-point)."""
    rows = check_crop_table(pixels, table, size)
    out = torch.empty((len(rows), CHANNELS, size, size), dtype=torch.float32, device=pixels.device)
    for b, (offset, src_h, src_w, top, left, h, w, _, flip) in enumerate(rows.tolist()):
        image = pixels[offset : offset + CHANNELS * src_h * src_w].view(CHANNELS, src_h, src_w)
        crop = image[:, top : top + h, left : left + w].unsqueeze(0).float()
        # one axis at a time (the other's size kept: its weights are then exactly the identity)
        horizontal = F.interpolate(crop, size=(h, size), mode="bicubic", align_corners=False, antialias=True)
        horizontal = horizontal.round_().clamp_(0, 255)
        resized = F.interpolate(horizontal, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
        out[b] = resized.flip(-1) if flip else resized
    # the rounding once per batch, not per crop: on a GPU without Triton the host's launches are the cost
    return out.round_().clamp_(0, 255).sub_(shift.view(1, -1, 1, 1)).div_(scale.view(1, -1, 1, 1))


def resized_crops(pixels: torch.Tensor, table: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  kernels: str = "auto") -> torch.Tensor:
    """The GPU loaders' augmentation of a batch: pixels uint8 [sum of 3 H_b W_b] on the device holding
    the batch's images one after another, table int64 [B, 9] on the CPU (``crop_table``) -> float32
    [B, 3, size, size] normalised, as torchvision's resized crop + flip of PIL images + normalisation.

    kernels "auto": on CUDA two Triton launches for the whole batch (``fastmae.kernels.crop_resize``),
    else ``resized_crops_reference``, a few kernels per crop. Nothing is read back from the device.
    """
    from fastmae.kernels import resolve_kernels

    shift, scale = _normalization_constants(tuple(map(float, mean)), tuple(map(float, std)), pixels.device)
    if resolve_kernels(kernels, pixels.device) == "triton":
        from fastmae.kernels.crop_resize import resized_crops_triton

        return resized_crops_triton(pixels, table, size, shift.view(-1), scale.view(-1))
    return resized_crops_reference(pixels, table, size, shift.view(-1), scale.view(-1))


def resize_center_crop(image: Image.Image, size: int, resize_to: int | None = None) -> np.ndarray:
    """The evaluation view, as torchvision's Resize(resize_to, bicubic) then CenterCrop(size): the shorter
    side to ``resize_to`` (default ``size``), the longer in proportion, truncated; the central
    ``size`` square, its offsets rounded. uint8 [size, size, 3]."""
    image = as_rgb(image)
    resize_to = size if resize_to is None else resize_to
    if resize_to < size:
        raise ValueError(f"cannot crop {size} px from an image resized to {resize_to} px")
    if image.width <= image.height:
        width, height = resize_to, int(resize_to * image.height / image.width)
    else:
        width, height = int(resize_to * image.width / image.height), resize_to
    image = image.resize((width, height), Image.BICUBIC)
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
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
