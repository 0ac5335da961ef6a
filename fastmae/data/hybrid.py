"""The hybrid loader: PIL decodes and crops in worker processes, the device resizes, flips and
normalises.

On a GPU machine without DALI, the CPU loader's workers spend about half their time on the bicubic
resize; nvJPEG through torchvision decodes on one CPU thread. Here the workers only decode and
crop (the draws of the CPU loader: same boxes, same flips, same replacements of unreadable files),
and each batch's crops travel to the device in one flat buffer, where ``augment.resized_crops``
resizes, flips and normalises them as the torchvision loader does (antialiased bicubic; within a
grey level or two of PIL's): on CUDA two Triton launches for the whole batch. On a CPU device the
reference runs on the host, so the tests cover the loader; the kernel is tested on its own.
"""

from __future__ import annotations

import numpy as np
import torch

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD, crop_table, random_crop_flip, resized_crops
from fastmae.data.loader import CPULoader, _AugmentedItems, batch_buffer, replacements


class _CroppedItems(_AugmentedItems):
    """key -> ((uint8 [h, w, 3] crop, flip), names of unreadable items passed over)."""

    def augment(self, image, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        crop, flip = random_crop_flip(image, rng, self.scale, self.ratio)
        return np.asarray(crop), flip


def _collate_crops(samples: list[tuple[tuple[np.ndarray, bool], list[str]]]):
    """-> (uint8 [sum of 3 h w] the crops one after another, channels first, int64 [B, 2] their (h, w),
    bool [B] flips, ``replacements``): one buffer, so a batch is one copy to the device."""
    crops = [crop for (crop, _), _ in samples]
    sizes = torch.tensor([crop.shape[:2] for crop in crops], dtype=torch.int64)
    flat = batch_buffer(int(3 * sizes.prod(1).sum()))
    # each crop copied once, channels first (so the device reads it as one dense block) straight
    # into the buffer the main process receives
    out, offset = flat.numpy(), 0
    for crop in crops:
        h, w, _ = crop.shape
        np.copyto(out[offset : offset + 3 * h * w].reshape(3, h, w), crop.transpose(2, 0, 1))
        offset += 3 * h * w
    flips = torch.tensor([flip for (_, flip), _ in samples], dtype=torch.bool)
    return flat, sizes, flips, replacements(samples)


class HybridLoader(CPULoader):
    """``ImageBatches``: float32 [B, 3, S, S] on ``device``, decoded and cropped by PIL workers."""

    items = _CroppedItems
    collate = staticmethod(_collate_crops)

    def images(self, flat: torch.Tensor, sizes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        flat = flat.to(self.device, non_blocking=True)  # pinned by the DataLoader on CUDA
        boxes = np.zeros((len(sizes), 4), dtype=np.int64)
        boxes[:, 2:] = sizes.numpy()  # each crop is a whole image of the buffer
        table = crop_table(sizes.numpy(), boxes, flips.numpy(), self.cfg.input_size)
        return resized_crops(flat, table, self.cfg.input_size, IMAGENET_MEAN, IMAGENET_STD)
