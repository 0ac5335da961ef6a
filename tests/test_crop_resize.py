"""The GPU loaders' batched crop + resize + flip + normalise kernel (fastmae.kernels.crop_resize)
against its reference (fastmae.data.augment.resized_crops_reference): on CPU through the Triton
interpreter, on CUDA with the gpu marker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD, crop_table, resized_crops, resized_crops_reference
from fastmae.kernels._launch import interpreting

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="Triton on CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
SHIFT = torch.tensor(IMAGENET_MEAN).mul(255.0)
SCALE = torch.tensor(IMAGENET_STD).mul(255.0)
GREY_LEVEL = (1 / SCALE).max().item()  # one grey level in normalised units


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def smooth_images(shapes, seed=0):
    """uint8 [3, H, W] images like photographs (smooth gradients plus texture), so that resampling
    filters and round-off show up as they do on real data, not only on noise."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in shapes:
        y, x = np.mgrid[0:h, 0:w]
        base = 128 + 100 * np.sin(x[None] / (3 + 5 * rng.random((3, 1, 1))) + y[None] / (4 + 5 * rng.random((3, 1, 1))))
        images.append(torch.from_numpy(np.clip(base + rng.normal(0, 12, (3, h, w)), 0, 255).astype(np.uint8)))
    return images


def batch(shapes, boxes, flips, size, device):
    images = smooth_images(shapes)
    pixels = torch.cat([image.reshape(-1) for image in images]).to(device)
    return pixels, crop_table(shapes, boxes, flips, size)


# (image H, W), crop box (top, left, h, w): up- and downscaling, 4x and more (wide windows), crops of
# one row or one column, a crop touching the image's far edges, a whole image
CASES = [
    ((40, 50), (3, 5, 30, 37)),
    ((9, 11), (1, 2, 6, 7)),
    ((120, 90), (0, 0, 120, 90)),
    ((70, 80), (69, 10, 1, 50)),
    ((33, 21), (0, 20, 33, 1)),
    ((64, 64), (10, 12, 54, 52)),
    ((17, 130), (2, 3, 15, 127)),
]


@pytest.mark.parametrize("size", [16, 15])
def test_triton_matches_reference(device, size):
    shapes, boxes = zip(*CASES)
    flips = [b % 2 == 1 for b in range(len(CASES))]
    pixels, table = batch(shapes, boxes, flips, size, device)
    shift, scale = SHIFT.to(device), SCALE.to(device)
    from fastmae.kernels.crop_resize import resized_crops_triton

    ours = resized_crops_triton(pixels, table, size, shift, scale).cpu()
    expected = resized_crops_reference(pixels.cpu(), table, size, SHIFT, SCALE)
    assert ours.shape == expected.shape == (len(CASES), 3, size, size) and ours.dtype == torch.float32
    diff = (ours - expected).abs()
    # the same integers but where fp32 round-off puts a value on the other side of .5
    assert diff.max() <= GREY_LEVEL * 1.001, f"max difference {diff.max() / GREY_LEVEL:.2f} grey levels"
    assert (diff == 0).float().mean() > 0.99
    mirrored = (ours[1::2].flip(-1) - expected[1::2]).abs().mean()
    assert mirrored > 10 * diff.mean() + 0.1  # a flip applied the wrong way round would show


def sharp_images(shapes, seed=0):
    """uint8 [3, H, W] images of black and white 4-pixel blocks (as text or line art): bicubic's negative
    lobes overshoot 0..255 at every edge, where PIL's uint8 rows between its two passes clip them."""
    rng = np.random.default_rng(seed)
    return [torch.from_numpy((rng.random((3, h // 4 + 1, w // 4 + 1)) > 0.5).repeat(4, 1).repeat(4, 2)[:, :h, :w]
                             .astype(np.uint8) * 255) for h, w in shapes]


def pil_resized_crops(images, boxes, flips, size):
    """The CPU loader's augmentation, PIL's own: crop, resize(BICUBIC) to uint8, mirror; as float."""
    from PIL import Image

    out = []
    for image, (top, left, h, w), flip in zip(images, boxes, flips):
        crop = Image.fromarray(image.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h))
        resized = torch.from_numpy(np.array(crop.resize((size, size), Image.BICUBIC))).permute(2, 0, 1).float()
        out.append(resized.flip(-1) if flip else resized)
    return torch.stack(out)


@pytest.mark.parametrize("images", [smooth_images, sharp_images])
@pytest.mark.parametrize("path", ["reference", *DEVICES])  # the PyTorch path; Triton on CPU (interpreter) and CUDA
def test_resized_crops_are_pils_within_a_grey_level(images, path):
    """As PIL resizes: where one antialiased bicubic pass in float differs from PIL by up to 19 grey levels at
    sharp edges (PIL rounds its horizontal pass to uint8 before the vertical one), ours differ by at most one."""
    device = "cpu" if path == "reference" else path
    shapes, boxes = zip(*CASES)
    flips = [True, False] * 3 + [True]
    source = images(shapes)
    pixels = torch.cat([image.reshape(-1) for image in source]).to(device)
    table = crop_table(shapes, boxes, flips, 16)
    got = resized_crops(pixels, table, 16, IMAGENET_MEAN, IMAGENET_STD, kernels="torch" if path == "reference" else "triton")
    grey_levels = got.cpu() * SCALE.view(3, 1, 1) + SHIFT.view(3, 1, 1)
    diff = (grey_levels - pil_resized_crops(source, boxes, flips, 16)).abs()
    assert diff.max() < 1.001, f"{diff.max():.2f} grey levels from PIL"
    assert (diff < 1e-3).float().mean() > 0.98


def test_bad_tables_are_clear_errors():
    pixels, table = batch([(10, 12)], [(0, 0, 10, 12)], [False], 8, "cpu")
    outside = table.clone()
    outside[0, 3] = 1  # top 1 + height 10 > 10 rows
    with pytest.raises(ValueError, match="crop 0: box .* is not inside its 10 x 12 image"):
        resized_crops(pixels, outside, 8)
    with pytest.raises(ValueError, match="reach element 360 of a pixel buffer of 300"):
        resized_crops(pixels[:300], table, 8)
    with pytest.raises(ValueError, match="table must be a CPU int64 tensor"):
        resized_crops(pixels, table[:, :8], 8)
    with pytest.raises(ValueError, match="pixels must be a contiguous 1-d uint8 tensor"):
        resized_crops(pixels.float(), table, 8)
    with pytest.raises(ValueError, match="size must be a positive int"):
        resized_crops(pixels, table, 0)
    # a table laid out for 8-pixel crops: at 16 the crops' scratch rows overlap, at 4 they end early
    two, two_table = batch([(10, 12), (10, 12)], [(0, 0, 10, 12), (1, 1, 8, 8)], [False, True], 8, "cpu")
    for size in (16, 4):
        with pytest.raises(ValueError, match=rf"scratch offsets \(column 7\) are not those of crops resized to {size}"):
            resized_crops(two, two_table, size)
    with pytest.raises(ValueError, match="one of each per crop"):
        crop_table([(10, 12), (10, 12)], [(0, 0, 10, 12)], [False], 8)
