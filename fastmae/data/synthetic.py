"""Generated image files: an ImageNet-like JPEG set for benchmarks, position-coded images for
augmentation statistics, and one file per kind of bad data for robustness tests."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# ImageNet's typical photo: about 500x375 (4:3), stored as JPEG of quality ~90 (about 110 KB).
IMAGENET_LIKE_SIZE = (500, 375)  # (width, height)
IMAGENET_LIKE_QUALITY = 90


def natural_like_image(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] uint8 with a photo's spectrum: large smooth shapes plus fine texture, so JPEG
    sizes and decode costs resemble real photos (pure noise or flat colour would not)."""
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3), dtype=np.float32)
    smooth = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC), dtype=np.float32
    )
    texture = rng.normal(0.0, 18.0, size=(height, width, 3)).astype(np.float32)
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = IMAGENET_LIKE_QUALITY, subsampling: int = -1) -> bytes:
    """pixels: [H, W, 3] or [H, W] uint8 -> JPEG bytes (subsampling -1: PIL's default 4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


def write_jpeg_folder(
    root: str | os.PathLike,
    num_images: int,
    *,
    size: tuple[int, int] = IMAGENET_LIKE_SIZE,
    quality: int = IMAGENET_LIKE_QUALITY,
    num_classes: int = 0,
    seed: int = 0,
    threads: int | None = None,
) -> list[Path]:
    """Write num_images JPEGs of about `size` (width, height; +-10% per image, as photos vary).
    num_classes > 0 gives the ImageFolder layout root/class_k/img.jpg, otherwise a flat folder.
    Image k depends on (seed, k) only, so ``threads`` (default: one per CPU) changes no file."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    root = Path(root)
    paths = [(root / f"class_{index % num_classes:04d}" if num_classes > 0 else root) / f"img_{index:06d}.jpg"
             for index in range(num_images)]
    for folder in {path.parent for path in paths}:
        folder.mkdir(parents=True, exist_ok=True)

    def write(index: int) -> None:
        rng = np.random.default_rng([seed, index])
        width = int(size[0] * rng.uniform(0.9, 1.1))
        height = int(size[1] * rng.uniform(0.9, 1.1))
        paths[index].write_bytes(encode_jpeg(natural_like_image(width, height, rng), quality))

    # NumPy's generators and PIL's encoder release the GIL: threads scale with the cores
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        list(pool.map(write, range(num_images)))
    return paths


def position_coded_image(width: int, height: int, blue: int = 128) -> np.ndarray:
    """[H, W, 3] uint8 whose red channel codes the column and green the row, so the crop window
    and flip an augmentation applied can be read back from its output (see crop_window_of).
    Pixel i covers the continuous coordinate [i, i+1); its code is round((i + 0.5) / W * 255)."""
    if not (2 <= width <= 256 and 2 <= height <= 256):
        raise ValueError(f"position codes need 2..256 pixels per side for 8-bit codes, got {width}x{height}")
    columns = np.round((np.arange(width) + 0.5) / width * 255).astype(np.uint8)
    rows = np.round((np.arange(height) + 0.5) / height * 255).astype(np.uint8)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = columns[None, :]
    pixels[..., 1] = rows[:, None]
    pixels[..., 2] = blue
    return pixels


def crop_window_of(rgb: np.ndarray, width: int, height: int, margin: int = 2) -> dict[str, float]:
    """Read back from one augmented position-coded image (rgb: [3, S, S] in 0..255) the crop
    window it shows, as fractions of the source image, and whether it was flipped.

    Output column c (centre c + 0.5) samples source x = x0 + (c + 0.5) * crop_w / S, so the red
    code, mapped back to x, is a line in c whose slope is crop_w / S (negative when flipped). The
    fit skips `margin` border columns, where resampling filters clamp at the crop's edge."""
    size = rgb.shape[-1]
    centres = np.arange(margin, size - margin) + 0.5
    x_of_column = rgb[0, :, margin : size - margin].mean(axis=0) / 255.0 * width
    y_of_row = rgb[1, margin : size - margin, :].mean(axis=1) / 255.0 * height
    slope_x, _ = np.polyfit(centres, x_of_column, 1)
    slope_y, _ = np.polyfit(centres, y_of_row, 1)
    crop_w, crop_h = abs(slope_x) * size, abs(slope_y) * size
    return {
        "area_fraction": (crop_w * crop_h) / (width * height),
        "aspect_ratio": crop_w / crop_h,
        "flipped": float(slope_x < 0),
    }


def bad_image_bytes(seed: int = 0) -> dict[str, bytes]:
    """One file's bytes per kind of bad or unusual input, keyed by a file name that says what
    it is. Names starting with 'bad_' cannot be decoded and must be skipped; the others are odd
    but valid images that must decode to RGB."""
    rng = np.random.default_rng(seed)
    photo = natural_like_image(96, 72, rng)
    good = encode_jpeg(photo)
    image = Image.fromarray(photo)

    def saved(img: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, format=fmt)
        return buffer.getvalue()

    scan_garbage = rng.integers(0, 256, size=len(good) - 700, dtype=np.uint8).tobytes()
    return {
        "bad_truncated.jpg": good[: len(good) // 2],
        "bad_header_only.jpg": good[:180],
        "bad_corrupt_scan.jpg": good[:350] + scan_garbage + good[-350:],
        "bad_not_an_image.jpg": b"this is a text file with a .jpg name\n" * 8,
        "bad_empty.jpg": b"",
        "grayscale.jpg": saved(image.convert("L"), "JPEG"),
        "cmyk.jpg": saved(image.convert("CMYK"), "JPEG"),
        "tiny_1x1.jpg": encode_jpeg(photo[:1, :1]),
        "tiny_3x5.jpg": encode_jpeg(photo[:5, :3]),
        "rgb.png": saved(image, "PNG"),
        "rgba.png": saved(image.convert("RGBA"), "PNG"),
        "palette.png": saved(image.convert("P"), "PNG"),
        "png_named.jpg": saved(image, "PNG"),
        # 16-bit grey (PIL mode I;16): PIL's convert("RGB") clips it at 255, nearly all white
        "grey16.png": saved(Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257), "PNG"),
    }


def write_bad_images(root: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write bad_image_bytes() into root (flat); returns name -> path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in bad_image_bytes(seed).items():
        paths[name] = root / name
        paths[name].write_bytes(data)
    return paths
