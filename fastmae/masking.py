"""Per-sample random masking, exactly as the MAE reference code.

noise [N, L] uniform; ``ids_shuffle = argsort(noise)`` ascending, so the patches with the smallest
noise are kept; ``ids_restore = argsort(ids_shuffle)``; the first ``len_keep = int(L * (1 - r))``
entries of ids_shuffle are kept. ``mask`` is 0 for kept and 1 for removed patches, in the original
patch order. Everything stays on the device: no host synchronisation, no data-dependent shapes.

The gathers and the un-shuffle that use these indices live in ``fastmae.kernels``
(``visible_patch_embed``, ``decoder_unshuffle``), each with its PyTorch reference beside the Triton
kernel.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


@dataclass
class Masking:
    ids_keep: torch.Tensor  # [N, K] int64, kept patches in shuffled order
    ids_masked: torch.Tensor  # [N, L-K] int64, removed patches in shuffled order
    ids_restore: torch.Tensor  # [N, L] int64, position of each patch in the shuffled order
    mask: torch.Tensor  # [N, L] float32, 1 = removed

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """len_keep of the reference, with a clear error where no patch would stay visible. mask_ratio: a
    Python or numpy number, or a 0-d tensor (read once, on the host)."""
    if isinstance(mask_ratio, torch.Tensor) and mask_ratio.ndim == 0 and mask_ratio.is_floating_point():
        mask_ratio = float(mask_ratio)
    elif isinstance(mask_ratio, numbers.Real) and not isinstance(mask_ratio, bool):
        mask_ratio = float(mask_ratio)
    if not isinstance(mask_ratio, float) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches} (len_keep = {len_keep})"
        )
    return len_keep


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Masking:
    len_keep = num_visible_patches(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    elif tuple(noise.shape) != (batch, num_patches):
        raise ValueError(f"noise must have shape [N, L] = [{batch}, {num_patches}], got {list(noise.shape)}")
    # contiguous: argsort keeps a transposed noise's strides, and the kernels read index rows densely
    ids_shuffle = torch.argsort(noise, dim=1).contiguous()
    ids_restore = torch.argsort(ids_shuffle, dim=1).contiguous()
    mask = (ids_restore >= len_keep).to(torch.float32)
    return Masking(
        ids_keep=ids_shuffle[:, :len_keep],
        ids_masked=ids_shuffle[:, len_keep:],
        ids_restore=ids_restore,
        mask=mask,
    )
