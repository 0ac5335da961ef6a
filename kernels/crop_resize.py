"""Resized crops of a batch in two launches: crop, antialiased bicubic resize, round, flip, normalise.

Reference semantics (``fastmae.data.augment.resized_crops_reference``, the data pipeline's): PIL's
resize of each crop as PIL runs it, separably and horizontal first, each pass torch's antialiased
bicubic (``F.interpolate(mode="bicubic", antialias=True)``: PIL's filter, Keys' cubic with a = -0.5
stretched by the downscale factor) rounded half to even and clamped to 0..255, as PIL's uint8
intermediate and output are; mirrored when its flip is set; then normalised: (v - 255 mean) / (255 std).
Where bicubic's negative lobes overshoot 0..255 (sharp edges), one float pass instead of two differs
from PIL by up to 19 grey levels (the tests' black-and-white blocks); two passes differ by at most one.

Image by image that is several kernels and a few dozen microseconds of host work per crop: a thousand
launches per batch of 256, on the thread that also launches the training step. Here the batch's
source images lie one after another in one uint8 buffer and a small table says where each crop is;
two kernels do the whole batch (the horizontal pass into a uint8 buffer, then the vertical pass with
the rounding, flip and normalisation). Weights are computed per lane from
torch's formulas, in fp32; results equal the reference's except where fp32 round-off moves a value
across a rounding boundary (one grey level, rare).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fastmae.data.augment import CHANNELS, HEIGHT, WIDTH, check_crop_table
from fastmae.kernels._launch import cdiv, check_kernel_device, check_tensor, interpreting, next_power_of_2, num_warps_for

# ---------------------------------------------------------------------------------------------
# Triton kernels. Image b of the batch is [3, H_b, W_b] uint8 at src + table[b, 0]; its
# crop is rows top.. top+h, columns left.. left+w (columns of the table: fastmae.data.augment.crop_table).
# Pass 1 writes the crop's [3, h, S] rows, rounded to uint8, at tmp + table[b, 7].
# ---------------------------------------------------------------------------------------------


@triton.jit
def _keys_cubic(x):
    """The antialiasing filter of torch and PIL: Keys' cubic convolution with a = -0.5."""
    x = tl.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _tap_weight(tap, first, taps, center, invscale):
    return tl.where(tap < taps, _keys_cubic(((tap + first).to(tl.float32) - center + 0.5) * invscale), 0.0)


@triton.jit
def _round_to_uint8_range(v):
    """Round half to even, as torch.round (floor(v + 0.5) is exact for |v| < 2**22), then clamp to 0..255."""
    rounded = tl.floor(v + 0.5)
    rounded = tl.where((rounded - v == 0.5) & (rounded % 2.0 != 0.0), rounded - 1.0, rounded)
    return tl.minimum(tl.maximum(rounded, 0.0), 255.0)


@triton.jit
def _window(out_index, in_size, out_size, max_taps):
    """torch's antialiased window for output positions ``out_index`` along one axis: (first input
    index, number of taps, centre, 1 / stretch of the filter, sum of the tap weights)."""
    scale = in_size.to(tl.float32) / out_size
    support = tl.where(scale >= 1.0, 2.0 * scale, 2.0)  # interp_size / 2 = 2 for bicubic, times the stretch
    center = scale * (out_index.to(tl.float32) + 0.5)
    first = tl.maximum((center - support + 0.5).to(tl.int32), 0)  # truncation, as C's static_cast<int>
    taps = tl.minimum((center + support + 0.5).to(tl.int32), in_size) - first
    invscale = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
    total = tl.zeros_like(center)
    for tap in range(0, max_taps):
        total += _tap_weight(tap, first, taps, center, invscale)
    total = tl.where(total != 0.0, total, 1.0)  # lanes past the edge have no taps (torch skips the division too)
    return first, taps, center, invscale, total


@triton.jit
def _resize_rows_kernel(
    src_ptr,  # uint8, the batch's source images one after another, each [3, H_b, W_b]
    table_ptr,  # int64 [B, 9]: source offset, H, W, top, left, h, w, offset in tmp, flip
    tmp_ptr,  # uint8, each crop's [3, h_b, S] rows resized to S columns, at table[b, 7]
    S,
    max_taps,  # >= the taps of every window in the batch, along x
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    row = table_ptr + b * 9
    src_h = tl.load(row + 1)
    src_w = tl.load(row + 2)
    top = tl.load(row + 3)
    left = tl.load(row + 4)
    h = tl.load(row + 5).to(tl.int32)
    w = tl.load(row + 6).to(tl.int32)
    ys = tl.program_id(2) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    y_ok = ys < h
    xs = tl.arange(0, BLOCK_X)
    x_ok = xs < S
    first, taps, center, invscale, total = _window(xs, w, S, max_taps)
    source = src_ptr + tl.load(row + 0) + c * src_h * src_w + (top + ys.to(tl.int64))[:, None] * src_w + left
    acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    for tap in range(0, max_taps):
        weight = _tap_weight(tap, first, taps, center, invscale) / total
        ok = y_ok[:, None] & (x_ok & (tap < taps))[None, :]
        pixels = tl.load(source + (first + tap)[None, :], mask=ok, other=0).to(tl.float32)
        acc += pixels * weight[None, :]
    out = tmp_ptr + tl.load(row + 7) + (c * h + ys).to(tl.int64)[:, None] * S + xs[None, :]
    tl.store(out, _round_to_uint8_range(acc).to(tl.uint8), mask=y_ok[:, None] & x_ok[None, :])


@triton.jit
def _resize_columns_kernel(
    tmp_ptr,  # uint8, pass 1's rows
    table_ptr,  # int64 [B, 9]
    shift_ptr,  # fp32 [3]: 255 * mean
    scale_ptr,  # fp32 [3]: 255 * std
    out_ptr,  # fp32 [B, 3, S, S]
    S,
    max_taps,  # >= the taps of every window in the batch, along y
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    row = table_ptr + b * 9
    h = tl.load(row + 5).to(tl.int32)
    flip = tl.load(row + 8) != 0
    ys = tl.program_id(2) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    y_ok = ys < S
    xs = tl.arange(0, BLOCK_X)
    x_ok = xs < S
    first, taps, center, invscale, total = _window(ys, h, S, max_taps)
    rows = tmp_ptr + tl.load(row + 7) + (c * h).to(tl.int64) * S
    acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    for tap in range(0, max_taps):
        weight = _tap_weight(tap, first, taps, center, invscale) / total
        ok = (y_ok & (tap < taps))[:, None] & x_ok[None, :]
        values = tl.load(rows + (first + tap).to(tl.int64)[:, None] * S + xs[None, :], mask=ok, other=0).to(tl.float32)
        acc += values * weight[:, None]
    value = tl.div_rn(_round_to_uint8_range(acc) - tl.load(shift_ptr + c), tl.load(scale_ptr + c))
    out_x = tl.where(flip, S - 1 - xs, xs)
    out = out_ptr + ((b * 3 + c).to(tl.int64) * S + ys)[:, None] * S + out_x[None, :]
    tl.store(out, value, mask=y_ok[:, None] & x_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _max_taps(lengths: np.ndarray, size: int) -> int:
    """An upper bound on the taps of the windows that resize ``lengths`` to ``size``: 2 * support + 1."""
    return int(np.ceil(4 * max(lengths.max() / size, 1.0))) + 2


def resized_crops_triton(
    pixels: torch.Tensor,  # uint8 [sum of 3 H_b W_b] on the device
    table: torch.Tensor,  # int64 [B, 9] on the CPU (fastmae.data.augment.crop_table)
    size: int,
    shift: torch.Tensor,  # fp32 [3] on the device: 255 * mean
    scale: torch.Tensor,  # fp32 [3] on the device: 255 * std
) -> torch.Tensor:  # fp32 [B, 3, size, size] on the device
    """The batch's crops resized, flipped and normalised in two launches; the same values as
    ``fastmae.data.augment.resized_crops_reference`` up to fp32 round-off at rounding boundaries."""
    rows = check_crop_table(pixels, table, size)
    check_kernel_device(pixels.device)
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(name, t, (CHANNELS,), dtypes=(torch.float32,), device=pixels.device)
    heights = rows[:, HEIGHT]
    # pinned, so the copy is queued behind this stream's work instead of waiting for it
    device_table = (table.pin_memory() if pixels.device.type == "cuda" else table).to(pixels.device, non_blocking=True)
    tmp = torch.empty(int(CHANNELS * heights.sum() * size), dtype=torch.uint8, device=pixels.device)
    out = torch.empty((len(rows), CHANNELS, size, size), dtype=torch.float32, device=pixels.device)
    block_x = next_power_of_2(size)
    # the interpreter: few programs (each costs ~1 ms there); a GPU: ~4k lanes per program
    rows_block = next_power_of_2(int(heights.max())) if interpreting() else max(1, 4096 // block_x)
    columns_block = next_power_of_2(size) if interpreting() else max(1, 4096 // block_x)
    num_warps = num_warps_for(columns_block * block_x)
    _resize_rows_kernel[(len(rows), CHANNELS, cdiv(int(heights.max()), rows_block))](
        pixels, device_table, tmp, size, _max_taps(rows[:, WIDTH], size),
        BLOCK_Y=rows_block, BLOCK_X=block_x, num_warps=num_warps,
    )
    _resize_columns_kernel[(len(rows), CHANNELS, cdiv(size, columns_block))](
        tmp, device_table, shift, scale, out, size, _max_taps(heights, size),
        BLOCK_Y=columns_block, BLOCK_X=block_x, num_warps=num_warps,
    )
    return out
